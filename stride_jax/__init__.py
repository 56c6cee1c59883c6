"""stride-jax: training-data attribution for language models by steering operators (STRIDE).

What a user needs is importable from here::

    from stride_jax import Attributor, AttributeConfig, LMFunctions, TokenizedSet, from_hf

Names are imported on first use (``import stride_jax`` does not import JAX); the errors of
:mod:`stride_jax.errors` are imported at once.
"""

from __future__ import annotations

import importlib
from typing import Any

from stride_jax.errors import (  # noqa: F401 - re-exported
    CheckpointMismatchError, ConfigError, DataError, DiskFullError, HFConfigError, HFWeightsError,
    MemoryBudgetError, ModelError, NonFiniteError, StaleArtifactError, StrideError)

__version__ = "0.1.0"

# name -> the module that defines it (imported when the name is first used)
_LAZY = {
    # the facade, its config and its result
    "Attributor": "stride_jax.attributor",
    "AttributeConfig": "stride_jax.attributor",
    "Attribution": "stride_jax.attribution",
    "TopScores": "stride_jax.attribution",
    # configs in Python: load_config(AttributeConfig, path, ["train.epochs=5"]), with_overrides
    "load_config": "stride_jax.config",
    "with_overrides": "stride_jax.config",
    "dump_config": "stride_jax.config",
    # models: stride-jax's own (from/to an HF directory) or any JAX model as pure functions
    "from_hf": "stride_jax.model.hf",
    "to_hf": "stride_jax.model.hf",
    "CausalLM": "stride_jax.model.transformer",
    "LMFunctions": "stride_jax.steering",
    "params_fingerprint": "stride_jax.steering",
    # bring your own measurement (logits and final_hidden sites)
    "Measurement": "stride_jax.measure",
    "MeasureInputs": "stride_jax.measure",
    "mean_logprob_change": "stride_jax.measure",
    "sum_logprob_change": "stride_jax.measure",
    # data: documents -> token rows
    "TokenizedSet": "stride_jax.data",
    "Document": "stride_jax.data",
    "read_documents": "stride_jax.data",
    "iter_documents": "stride_jax.data",
    "write_jsonl": "stride_jax.data",
    "tokenize_documents": "stride_jax.data",
    "tokenize_to_disk": "stride_jax.data",
    "load_tokenized": "stride_jax.data",
    "split_ids": "stride_jax.data",
    "load_tokenizer": "stride_jax.tokenizer",
}

__all__ = sorted([
    "__version__", *_LAZY,
    "CheckpointMismatchError", "ConfigError", "DataError", "DiskFullError", "HFConfigError",
    "HFWeightsError", "MemoryBudgetError", "ModelError", "NonFiniteError", "StaleArtifactError",
    "StrideError",
])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value   # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'stride_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
