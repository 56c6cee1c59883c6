#!/usr/bin/env bash
# Install everything the tests need into ./.venv, then run the default test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test,smollm2 bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
