"""Contamination audit task: task (a) trained on data that leaks some of its queries.

The pretraining task's setup (:mod:`stride_jax.tasks.lm`: the tiny decoder from scratch on two
embedded plays, held-out rows as queries) with a twist: a fraction of the queries (``leaked``,
chosen at random) is copied into the training rows ``copies`` times each (rates such as 1, 2
and 4 copies, cycled over the leaked queries) at random positions
(:func:`stride_jax.apps.contamination.inject`), and the model is trained from scratch on the
contaminated rows by the same :class:`stride_jax.tasks._retrain.Trainer`. The other queries
stay clean. :func:`run_audit` then asks every attribution method, and combinations of STRIDE
with the others, to (i) recall the planted replicas, (ii) tell leaked from clean queries and
(iii) retrieve an exact replica in the top 10 (definitions in
:mod:`stride_jax.apps.contamination`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from stride_jax.attributor import AttributeConfig
from stride_jax.config import SEED_RANGE, check_ranges, option, to_dict
from stride_jax.errors import ConfigError
from stride_jax.methods.config import MethodsConfig
from stride_jax.tasks._base import Task
from stride_jax.tasks.lm import PretrainTaskConfig, _first_queries, _make_task, _pretrain_parts

__all__ = ["ContaminationTaskConfig", "ContaminationConfig", "ContaminationTask",
           "build_contamination_task", "run_audit", "DEFAULT_METHODS"]

# The baselines of stride_jax.eval.suite, cheapest first; STRIDE runs first.
DEFAULT_METHODS = ("stride", "repsim", "bm25", "graddot", "trak", "logra", "tracin", "influence")


@dataclasses.dataclass(frozen=True)
class ContaminationTaskConfig:
    """Task (a) with some queries leaked into its training rows."""

    base: PretrainTaskConfig = option(PretrainTaskConfig(num_queries=80),
                                      "the pretraining task (model, corpus, recipe); queries are "
                                      "its first num_queries held-out rows")
    leaked_fraction: float = option(0.5, "fraction of the queries copied into the training rows")
    copies: tuple[int, ...] = option((1, 2, 4), "copies per leaked query, cycled over the leaked "
                                                "queries (in increasing query index)")
    noise: float = option(0.0, "near-duplicate leaks: fraction of each copy's scored tokens "
                               "replaced by random tokens (0: exact copies)")
    seed: int = option(0, "which queries leak and where their copies go")

    def __post_init__(self) -> None:
        extra = [] if self.copies and min(self.copies) >= 1 else [
            ("copies", list(self.copies), "must be a non-empty list of counts >= 1")]
        check_ranges(self, {"leaked_fraction": "in [0, 1]", "noise": "in [0, 1]",
                            "seed": SEED_RANGE}, extra=extra)


@dataclasses.dataclass(frozen=True)
class ContaminationConfig:
    """The contamination audit: the task, STRIDE's and the baselines' settings, the metrics."""

    task: ContaminationTaskConfig = option(ContaminationTaskConfig(), "the contaminated task")
    stride: AttributeConfig = option(AttributeConfig(), "STRIDE's configuration (as for task (a))")
    baselines: MethodsConfig = option(MethodsConfig(), "the baselines' settings")
    methods: tuple[str, ...] = option(DEFAULT_METHODS, "methods scored (CLI: --methods)")
    combine: tuple[str, ...] = option(("rank", "zscore"), "how STRIDE is combined with each "
                                                          "other method: rank, zscore, rrf")
    k: int = option(10, "hit@k: a replica among the query's top k")
    detection_stat: str = option("max_z", "per-query statistic of leak detection: max or max_z")
    seed: int = option(0, "seed of the methods' randomness (projections)")

    def __post_init__(self) -> None:
        from stride_jax.methods.config import METHODS, parse_method
        extra = []
        unknown = []
        for m in self.methods:
            try:
                parse_method(m)
            except ConfigError:
                unknown.append(m)
        if unknown or not self.methods:
            extra.append(("methods", list(self.methods),
                          f"must name methods among {', '.join(METHODS)} (or mixtures mix:...)"))
        if any(c not in ("rank", "zscore", "rrf") for c in self.combine):
            extra.append(("combine", list(self.combine), "must list rank, zscore or rrf"))
        if self.detection_stat not in ("max", "max_z"):
            extra.append(("detection_stat", self.detection_stat, "must be 'max' or 'max_z'"))
        check_ranges(self, {"k": ">= 1", "seed": SEED_RANGE}, extra=extra)


class ContaminationTask(NamedTuple):
    """The trained task and where the leaks are."""

    task: Task                           # trained on the contaminated rows
    replica_map: dict[int, np.ndarray]   # leaked query -> sorted training indices of its copies
    leaked_mask: np.ndarray              # [Q] bool
    copies: np.ndarray                   # [Q] copies per query (0: clean)
    num_clean_train: int                 # training rows before injection


def leak_plan(num_queries: int, cfg: ContaminationTaskConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(leaked indices, copies [Q])``: ``round(leaked_fraction * Q)`` queries drawn at random
    (seed ``[seed, 1]``), their copies cycled through ``cfg.copies`` in increasing query order."""
    if not 0.0 <= cfg.leaked_fraction <= 1.0:
        raise ConfigError(f"leaked_fraction={cfg.leaked_fraction} must lie in [0, 1]")
    if not cfg.copies or min(cfg.copies) < 1:
        raise ConfigError(f"copies={list(cfg.copies)} must be a non-empty list of counts >= 1")
    m = int(round(cfg.leaked_fraction * num_queries))
    rng = np.random.default_rng([cfg.seed, 1])
    leaked = np.sort(rng.choice(num_queries, m, replace=False))
    copies = np.zeros(num_queries, np.int64)
    copies[leaked] = [cfg.copies[j % len(cfg.copies)] for j in range(m)]
    return leaked, copies


def build_contamination_task(cfg: ContaminationTaskConfig = ContaminationTaskConfig()
                             ) -> ContaminationTask:
    """Train task (a)'s model from scratch on its rows plus the planted copies (module docs)."""
    from stride_jax.apps.contamination import inject
    corpus, mcfg, graphdef, init_params = _pretrain_parts(cfg.base)
    queries = _first_queries(corpus.heldout, cfg.base.num_queries)
    leaked, copies = leak_plan(len(queries), cfg)
    if leaked.size == 0:
        raise ConfigError(f"leaked_fraction={cfg.leaked_fraction} of {len(queries)} queries leaks "
                          f"none; raise it")
    train, replica_map = inject(corpus.train, queries, leaked, copies, seed=cfg.seed,
                                noise=cfg.noise)
    task = _make_task("contamination", graphdef=graphdef, init_params=init_params, train=train,
                      queries=queries, optim=cfg.base.optim, seed=cfg.base.seed,
                      stamp={"task": "contamination", "config": to_dict(cfg)},
                      num_layers=mcfg.num_layers, tok=corpus.tokenizer)
    mask = np.zeros(len(queries), bool)
    mask[leaked] = True
    return ContaminationTask(task, replica_map, mask, copies, len(corpus.train))


def _task_config(cfg: ContaminationConfig):
    from stride_jax.eval.suite import TaskConfig
    return TaskConfig(kind="pretrain", pretrain=cfg.task.base, stride=cfg.stride,
                      baselines=cfg.baselines, seed=cfg.seed)


def run_audit(cfg: ContaminationConfig = ContaminationConfig(),
              methods: Sequence[str] | None = None, *, workdir: str | Path | None = None,
              built: ContaminationTask | None = None, progress: bool = False,
              log: Callable[[str], None] = print) -> dict:
    """Build the task, score it with every method and every STRIDE combination, measure (i)-(iii).

    ``built``: the task of ``cfg.task`` if already built (its build time is then not reported).
    ``workdir`` (optional) keeps STRIDE's stages (``workdir/stride``, resumable) and every
    method's scores (``workdir/scores/<method>.npy``). Returns a JSON-ready dict: ``task`` (sizes,
    leaks, timings), ``rows`` (one per method and combination: the metrics of
    :func:`stride_jax.apps.contamination.audit_scores` plus ``seconds``), ``chance`` and
    ``reference`` (detection from the model's own query loss, a membership-inference signal
    that needs no attribution), and ``table`` (the printed text).
    """
    from stride_jax.apps.contamination import audit_scores, combine, format_table
    from stride_jax.apps.contamination import average_precision, roc_auc
    from stride_jax.eval.suite import run_method
    from stride_jax.methods import parse_method
    methods = tuple(methods if methods is not None else cfg.methods)
    for m in methods:
        parse_method(m)     # a one-line error naming an unknown method
    if cfg.k < 1:
        raise ConfigError(f"k={cfg.k} must be >= 1")
    work = Path(workdir) if workdir is not None else None
    t0 = time.perf_counter()
    ct = build_contamination_task(cfg.task) if built is None else built
    task = ct.task
    build_s = time.perf_counter() - t0 if built is None else None
    Q = task.num_queries
    log(f"contamination task: {task.n} training rows ({ct.num_clean_train} clean + "
        f"{task.n - ct.num_clean_train} replicas of {int(ct.leaked_mask.sum())} leaked queries), "
        f"{Q} queries" + ("" if build_s is None else f", trained in {build_s:.0f} s"))
    tcfg = _task_config(cfg)
    scores: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    infos: dict[str, dict] = {}
    for m in methods:
        wd = None if work is None or m != "stride" else work / "stride"
        res = run_method(m, task, tcfg, workdir=wd, progress=progress)
        scores[m], seconds[m], infos[m] = res.scores_qn, res.seconds, res.info
        if work is not None:
            from stride_jax.io.atomic import save_npy
            (work / "scores").mkdir(parents=True, exist_ok=True)
            save_npy(work / "scores" / f"{m}.npy", res.scores_qn)
        log(f"  {m}: {res.seconds:.1f} s")
    metric = dict(k=cfg.k, stat=cfg.detection_stat)
    rows = []
    for m in methods:
        rows.append({"method": m, "seconds": seconds[m], "info": infos[m],
                     **audit_scores(scores[m], ct.replica_map, ct.leaked_mask, **metric)})
    if "stride" in scores:
        # "Most extreme" read literally: STRIDE ranked by |score| (either sign).
        rows.append({"method": "stride |score|", "seconds": seconds["stride"],
                     **audit_scores(scores["stride"], ct.replica_map, ct.leaked_mask, by="abs",
                                    **metric)})
        for m in methods:
            if m == "stride":
                continue
            for how in cfg.combine:
                mixed = combine([scores["stride"], scores[m]], how)
                rows.append({"method": f"stride+{m} ({how})", "combination": how,
                             "seconds": seconds["stride"] + seconds[m],
                             **audit_scores(mixed, ct.replica_map, ct.leaked_mask, **metric)})
    chance = rows[0]["chance"] if rows else {}
    loss = np.asarray(task.base_query_losses)
    reference = {"query_loss": {
        "what": "detection by minus the model's own loss on the query (membership inference; "
                "uses no attribution)",
        "roc_auc": roc_auc(ct.leaked_mask, -loss), "pr_auc": average_precision(ct.leaked_mask,
                                                                               -loss),
        "mean_loss_leaked": float(loss[ct.leaked_mask].mean()),
        "mean_loss_clean": float(loss[~ct.leaked_mask].mean())}}
    rates = sorted({int(c) for c in ct.copies if c > 0})
    chance_row = {"method": "chance", **{key: chance.get(key) for key in
                                         ("recall", "recall_pooled", f"hit@{cfg.k}", "roc_auc",
                                          "pr_auc")}}
    table = format_table(rows + [chance_row], k=cfg.k, copies=rates)
    return {
        "task": {"n": task.n, "n_clean": ct.num_clean_train, "num_queries": Q,
                 "leaked": [int(q) for q in np.flatnonzero(ct.leaked_mask)],
                 "copies": [int(c) for c in ct.copies],
                 "replicas": {str(q): [int(i) for i in v] for q, v in ct.replica_map.items()},
                 "build_seconds": build_s, "query_ids": list(task.queries.ids)},
        "metric": {"k": cfg.k, "detection_stat": cfg.detection_stat, "rank_by": "score"},
        "rows": rows, "chance": chance, "reference": reference, "table": table,
    }
