"""The faithfulness suite: tasks, every attribution method on them, LDS and cost side by side.

A :class:`TaskConfig` names one task (``digits``, ``pretrain`` or ``finetune``, see
:mod:`stride_jax.tasks`), its ground-truth settings, STRIDE's configuration for it and the
baselines' settings. :func:`run_method` times one method on a built task the same way for every
method (wall clock from the trained model to the ``[Q, n]`` scores, compile time included), and
:func:`counterfactual` retrains without each query's top-k examples.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal, NamedTuple

import jax
import numpy as np

from stride_jax.attributor import AttributeConfig, Attributor
from stride_jax.config import SEED_RANGE, check_ranges, option
from stride_jax.errors import ConfigError
from stride_jax.eval.groundtruth import GroundTruthConfig
from stride_jax.steering import LMFunctions, from_causal_lm, resolve_layer
from stride_jax.tasks._base import Task
from stride_jax.tasks.digits import DigitsConfig
from stride_jax.tasks.lm import FinetuneTaskConfig, PretrainTaskConfig

METHODS = ("stride", "influence", "trak", "logra", "tracin", "graddot", "repsim", "bm25")
GRADIENT_METHODS = ("influence", "trak", "logra", "tracin", "graddot")


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """Settings of the baselines (each gets the same model, data and queries as STRIDE)."""

    trak_dim: int = option(2048, "TRAK projection dimension k")
    logra_rank: int = option(16, "LoGra projection rank per side of each layer")
    damping: float | None = option(None, "Fisher/Gram damping; null: damping_fraction x the mean "
                                         "eigenvalue")
    damping_fraction: float = option(0.1, "relative damping used when damping is null")
    chunk: int = option(32, "examples per per-example-gradient chunk")
    repsim_layer: Literal["final", "reader"] = option("final", "hidden state compared by repsim")

    def __post_init__(self) -> None:
        check_ranges(self, {"trak_dim": ">= 1", "logra_rank": ">= 1", "damping": "> 0",
                            "damping_fraction": "> 0", "chunk": ">= 1"},
                     fixes={"damping": "or null: damping_fraction x the mean eigenvalue"})


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """One task of the faithfulness benchmark and how each method runs on it."""

    kind: Literal["digits", "pretrain", "finetune"] = option("digits", "which task")
    digits: DigitsConfig = option(DigitsConfig(), "task (c): MLP on scikit-learn's digits")
    pretrain: PretrainTaskConfig = option(PretrainTaskConfig(), "task (a): LM from scratch")
    finetune: FinetuneTaskConfig = option(FinetuneTaskConfig(), "task (b): LM fine-tuning")
    groundtruth: GroundTruthConfig = option(GroundTruthConfig(), "retraining ground truth")
    stride: AttributeConfig = option(AttributeConfig(), "STRIDE's configuration on this task")
    baselines: BaselineConfig = option(BaselineConfig(), "the baselines' settings")
    seed: int = option(0, "seed of the methods' randomness (projections)")

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
    from stride_jax.steering import SteeringConfig
    layer = resolve_layer(SteeringConfig(layer=layer), task.num_layers)
    if callable(task.model) and not hasattr(task.model, "config"):
        return task.model(layer)
    return from_causal_lm(task.model, layer)


class MethodResult(NamedTuple):
    scores_qn: np.ndarray
    seconds: float
    info: dict


def run_method(method: str, task: Task, cfg: TaskConfig, *, workdir=None,
               progress: bool = False) -> MethodResult:
    """Scores ``[Q, n]`` of one method on ``task`` (positive: the example lowers the loss)."""
    from stride_jax.baselines import gradient as G
    b = cfg.baselines
    key = jax.random.fold_in(jax.random.key(cfg.seed), METHODS.index(method)
                             if method in METHODS else 99)
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    common = dict(train=task.train_examples, queries=task.query_examples)
    if method == "stride":
        lm = task_lm(task, cfg.stride.steering.layer)
        att = Attributor(lm, task.train, cfg.stride, workdir=workdir, progress=progress)
        result = att.attribute(task.queries)
        scores = result.scores_qn
        info = {"num_subsets": att.num_subsets, "layer": lm.layer,
                "nonzeros_per_query": float((scores != 0).sum(1).mean())}
    elif method == "influence":
        scores = G.influence(task.example_loss, task.params, damping=b.damping,
                             damping_fraction=b.damping_fraction, chunk=b.chunk, **common)
    elif method == "trak":
        scores = G.trak(task.example_loss, task.params, proj_dim=b.trak_dim, damping=b.damping,
                        damping_fraction=b.damping_fraction, key=key, chunk=b.chunk, **common)
    elif method == "logra":
        scores = G.logra(task.example_loss, task.params, rank=b.logra_rank, damping=b.damping,
                         damping_fraction=b.damping_fraction, key=key, chunk=b.chunk, **common)
    elif method == "tracin":
        scores = G.tracin(task.example_loss, task.checkpoints, weights=task.checkpoint_lrs,
                          chunk=b.chunk, **common)
    elif method == "graddot":
        scores = G.graddot(task.example_loss, task.params, chunk=b.chunk, **common)
    elif method == "repsim":
        from stride_jax.baselines.similarity import cosine_scores, pooled_features
        lm = task_lm(task, None)

        def feats(rows):
            return pooled_features(lm.features, lm.params, rows.input_ids, rows.attention_mask,
                                   rows.attention_mask, which=b.repsim_layer)

        scores = cosine_scores(feats(task.queries), feats(task.train))
    elif method == "bm25":
        if task.train_docs is None:
            raise ConfigError(f"bm25 needs token sequences; the {task.name} task has none")
        from stride_jax.baselines.text import bm25_scores
        scores = bm25_scores(task.train_docs, task.query_docs)
    else:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    seconds = time.perf_counter() - t0
    scores = np.asarray(scores, np.float32)
    if scores.shape != (task.num_queries, task.n):
        raise AssertionError(f"{method} returned scores of shape {scores.shape}")
    return MethodResult(scores, seconds, info)


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
