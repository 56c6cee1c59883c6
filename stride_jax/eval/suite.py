"""The faithfulness suite: tasks, every attribution method on them, LDS and cost side by side.

A :class:`TaskConfig` names one task (``digits``, ``pretrain`` or ``finetune``, see
:mod:`stride_jax.tasks`), its ground-truth settings, STRIDE's configuration for it and the
baselines' settings. :func:`run_method` times one method on a built task the same way for every
method (wall clock from the trained model to the ``[Q, n]`` scores, compile time included)
through the one method registry (:mod:`stride_jax.methods`, also behind ``stride-jax attribute
--method``), and :func:`counterfactual` retrains without each query's top-k examples.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from stride_jax import methods as _methods
from stride_jax.attributor import AttributeConfig
from stride_jax.config import SEED_RANGE, check_ranges, option
from stride_jax.errors import ConfigError
from stride_jax.eval.groundtruth import GroundTruthConfig
from stride_jax.steering import LMFunctions
from stride_jax.tasks._base import Task
from stride_jax.tasks.digits import DigitsConfig
from stride_jax.tasks.lm import FinetuneTaskConfig, PretrainTaskConfig

# One registry (stride_jax.methods) serves the CLI, this suite and the benchmarks.
METHODS = _methods.METHODS
GRADIENT_METHODS = _methods.GRADIENT_METHODS


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """One task of the faithfulness benchmark and how each method runs on it."""

    kind: Literal["digits", "pretrain", "finetune"] = option("digits", "which task")
    digits: DigitsConfig = option(DigitsConfig(), "task (c): MLP on scikit-learn's digits")
    pretrain: PretrainTaskConfig = option(PretrainTaskConfig(), "task (a): LM from scratch")
    finetune: FinetuneTaskConfig = option(FinetuneTaskConfig(), "task (b): LM fine-tuning")
    groundtruth: GroundTruthConfig = option(GroundTruthConfig(), "retraining ground truth")
    stride: AttributeConfig = option(AttributeConfig(), "STRIDE's configuration on this task")
    baselines: _methods.MethodsConfig = option(_methods.MethodsConfig(),
                                               "the other methods' settings (EK-FAC, TRAK, ...; "
                                               "stride_jax.methods)")
    seed: int = option(0, "seed of the methods' randomness (projections, sampled labels)")

    def __post_init__(self) -> None:
        check_ranges(self, {"seed": SEED_RANGE})


def build_task(cfg: TaskConfig) -> Task:
    """Train the task's model (deterministic in the config) and wire up its retraining."""
    if cfg.kind == "digits":
        from stride_jax.tasks.digits import build_digits_task
        return build_digits_task(cfg.digits)
    if cfg.kind == "pretrain":
        from stride_jax.tasks.lm import build_pretrain_task
        return build_pretrain_task(cfg.pretrain)
    if cfg.kind == "finetune":
        from stride_jax.tasks.lm import build_finetune_task
        return build_finetune_task(cfg.finetune)
    raise ConfigError(f"unknown task kind {cfg.kind!r}; use digits, pretrain or finetune")


def task_lm(task: Task, layer: int | None) -> LMFunctions:
    """The task's model as :class:`LMFunctions` reading ``layer`` (None: ~2/3 depth)."""
    return _methods.task_lm(task, layer)


MethodResult = _methods.MethodResult


def run_method(method: str, task: Task, cfg: TaskConfig, *, workdir=None,
               progress: bool = False, cache: dict | None = None) -> MethodResult:
    """Scores ``[Q, n]`` of one method (or mixture) on ``task`` (positive: the example lowers
    the loss), through the registry :func:`stride_jax.methods.run_method` with STRIDE's
    settings ``cfg.stride``, the others' ``cfg.baselines`` and the seed ``cfg.seed``."""
    return _methods.run_method(method, task, cfg.stride, methods=cfg.baselines, seed=cfg.seed,
                               workdir=workdir, progress=progress, cache=cache)


def counterfactual(task: Task, scores_qn: np.ndarray, *, k: int, queries: np.ndarray,
                   num_random: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Retrain without each query's top-``k`` proponents, and without ``k`` random examples.

    Returns the query losses ``base [Qc]``, ``top [Qc]`` (query ``q``'s loss after removing its
    own top-k) and ``random [R, Qc]``; all retrains use the task's recipe on ``n - k`` rows.
    """
    n = task.n
    if not 1 <= k < n:
        raise ConfigError(f"counterfactual k={k} must lie in 1 .. {n - 1}")
    queries = np.asarray(queries)
    keep_top = []
    for q in queries:
        drop = np.argsort(-scores_qn[q], kind="stable")[:k]
        keep_top.append(np.setdiff1d(np.arange(n), drop))
    rng = np.random.default_rng(seed)
    keep_rand = [np.sort(rng.permutation(n)[: n - k]) for _ in range(num_random)]
    top = task.retrain(np.stack(keep_top))[np.arange(len(queries)), queries]
    rand = task.retrain(np.stack(keep_rand))[:, queries]
    return {"base": task.base_query_losses[queries], "top": top, "random": rand}
