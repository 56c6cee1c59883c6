"""Every error a user can fix, under one base: :class:`StrideError`.

A ``StrideError`` says what is wrong with an input (a setting, a file, a model, a run directory)
and how to fix it, in one line. The CLI prints exactly that line and exits with status 2; any
other exception is a bug in stride-jax and keeps its traceback. Library users catch
``StrideError`` (or one subclass) the same way::

    try:
        att = Attributor(model, train_rows, config)
    except stride_jax.StrideError as e:
        print(e)

``StrideError`` subclasses ``ValueError``, so code that caught ``ValueError`` keeps working. A few
errors also keep the built-in class of their kind: :class:`DiskFullError` is an ``OSError``
(errno ``ENOSPC``), :class:`MissingDependencyError` a ``ModuleNotFoundError`` and the non-finite
errors are ``FloatingPointError``\\ s.

This module imports nothing from stride-jax, so every module can raise these.
"""

from __future__ import annotations

__all__ = [
    "CheckpointMismatchError",
    "ConfigError",
    "DataError",
    "DiskFullError",
    "GGUFError",
    "HFConfigError",
    "HFWeightsError",
    "MemoryBudgetError",
    "MissingDependencyError",
    "ModelError",
    "NonFiniteError",
    "NonFiniteLossError",
    "NonFiniteOperatorLossError",
    "OutputLockedError",
    "OutputPathError",
    "SafetensorsError",
    "StaleArtifactError",
    "StrideError",
]


class StrideError(ValueError):
    """An input stride-jax cannot use; the message names it and the fix."""


# -- settings and inputs --------------------------------------------------------------------------
class ConfigError(StrideError):
    """A config file, override, setting or argument is invalid; the message says which and why."""


class DataError(StrideError):
    """Input data (documents, token rows, score or run files) is unreadable or inconsistent."""


class ModelError(StrideError):
    """A model does not fit what attribution needs (its functions' shapes, vocabulary, layers,
    context length)."""


class MemoryBudgetError(StrideError):
    """No setting of the result-neutral chunk sizes fits a stage into the memory budget."""


class MissingDependencyError(StrideError, ModuleNotFoundError):
    """An optional package is not installed; the message names the extra to install."""


# -- checkpoints and files --------------------------------------------------------------------------
class HFConfigError(StrideError):
    """An HF ``config.json`` we cannot represent faithfully."""


class HFWeightsError(StrideError):
    """Missing, unused or mis-shaped weights in an HF checkpoint."""


class GGUFError(StrideError):
    """A GGUF file we cannot read or convert."""


class SafetensorsError(StrideError):
    """A malformed or truncated safetensors file."""


class StaleArtifactError(StrideError):
    """A stage directory was made with different arguments or inputs."""


class CheckpointMismatchError(StrideError):
    """An operator checkpoint was made by another run."""


class OutputPathError(ConfigError):
    """An output path that cannot be written; the message says why and what to pass instead."""


class OutputLockedError(StrideError):
    """Another live process holds the output directory."""


class DiskFullError(StrideError, OSError):
    """A write failed for lack of disk space; the previous file (if any) is intact."""


# -- results that would be wrong ----------------------------------------------------------------
class NonFiniteError(StrideError, FloatingPointError):
    """A computation produced NaN or inf; nothing non-finite is ever written as a result."""


class NonFiniteOperatorLossError(NonFiniteError):
    """An operator's training loss became NaN or inf."""


class NonFiniteLossError(NonFiniteError):
    """The pretraining loss became NaN or inf."""
