"""The data-selection task: pick the pool rows that help a target domain, fine-tune on them.

Setup (built on task (b), :func:`stride_jax.tasks.lm.build_finetune_task`):

* **base model**: the pretraining task's model trained on all its rows (hamlet + macbeth), as
  the fine-tuning task's base;
* **candidate pool** (``n`` rows): the fine-tuning task's train rows of Shakespeare's poems (the
  sonnets, "A Lover's Complaint", "The Rape of Lucrece"; same split) *mixed* with about as many
  rows of other plays (default: The Tempest, Twelfth Night, A Midsummer Night's Dream), which are
  distractors for a poem target; the pool is in a fixed random order so that nothing downstream
  can profit from "poems first" (ties in a ranking are broken by position);
* **targets** (``Q`` rows): the first ``num_queries`` held-out poem rows of the fine-tuning
  task's split, the queries that selection aggregates over;
* **held-out evaluation rows** (``E``): the remaining held-out poem rows, never used to select,
  to check that a selection helps the target *domain* and not only the ``Q`` rows it was chosen
  for.

The attributed model is the base fine-tuned on the whole pool with the fine-tuning recipe, so
STRIDE and the gradient baselines attribute the same model (``Task.params``); a selection
``S`` (``k`` pool indices) is evaluated by fine-tuning the *base* on ``S`` alone with the same
recipe (:meth:`Trainer.retrain_losses`, ``ceil(epochs k / batch)`` steps, same data-order key)
and reading the per-row target losses. ``Task.retrain`` gives the ``[p, Q]`` target losses of
``p`` selections of one size; :attr:`SelectionTask.retrain_all` gives ``[p, Q + E]`` (targets,
then held-out rows) from the same fine-tunes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax.config import SEED_RANGE, check_ranges, option, to_dict
from stride_jax.data import TokenizedSet, shakespeare_plays, split_ids, tokenize_documents
from stride_jax.errors import ConfigError, DataError
from stride_jax.recipes.pretrain import OptimConfig
from stride_jax.steering._adapter import params_fingerprint
from stride_jax.tasks._base import Task
from stride_jax.tasks._retrain import Trainer
from stride_jax.tasks.lm import (FinetuneTaskConfig, _first_queries, _lm_functions, _make_task,
                                 _pretrain_parts, _row_data)

__all__ = ["SelectionTask", "SelectionTaskConfig", "assemble_selection_task",
           "build_selection_task"]


@dataclasses.dataclass(frozen=True)
class SelectionTaskConfig:
    """The data-selection task: a poem target, a pool of poem rows mixed with play rows."""

    finetune: FinetuneTaskConfig = option(
        FinetuneTaskConfig(), "base model, target works, held-out split, fine-tuning recipe and "
                              "number of targets (finetune.num_queries), as in task (b)")
    distractors: tuple[str, ...] = option(
        ("tempest", "twelfth_night", "midsummer_nights_dream"),
        "embedded plays whose rows are mixed into the pool as distractors (not the base's plays)")
    distractor_ratio: float = option(1.0, "distractor rows per target-domain row in the pool "
                                          "(capped by the rows the distractor plays have)")
    max_target_rows: int | None = option(None, "cap on the target-domain rows in the pool (a "
                                               "random sample; null: all train rows of the works)")
    num_eval: int | None = option(None, "held-out target rows (after the targets) whose loss is "
                                        "reported but never used to select; null: all of them")
    pool_seed: int = option(0, "seed of the row samples and of the pool's order")

    def __post_init__(self) -> None:
        check_ranges(self, {"distractor_ratio": ">= 0", "max_target_rows": ">= 1",
                            "num_eval": ">= 0", "pool_seed": SEED_RANGE})


@dataclasses.dataclass
class SelectionTask(Task):
    """A :class:`Task` whose pool is labelled by domain, with held-out evaluation rows.

    Attributes (besides :class:`Task`'s; ``train`` is the pool, ``queries`` the targets):
      in_domain: bool ``[n]``, True for pool rows of the target works.
      eval_rows: the held-out target rows never used to select (``E`` rows, maybe 0).
      retrain_all: ``[p, k]`` selections -> ``[p, Q + E]`` losses after fine-tuning the base on
        each (targets first); ``retrain`` is its first ``Q`` columns.
      pretrained_losses: ``[Q + E]`` losses of the base model before any fine-tuning.
      full_losses: ``[Q + E]`` losses of the attributed model (base fine-tuned on the pool).
    """

    in_domain: np.ndarray = None  # type: ignore[assignment]
    eval_rows: TokenizedSet | None = None
    retrain_all: Callable[[np.ndarray], np.ndarray] | None = None
    pretrained_losses: np.ndarray | None = None
    full_losses: np.ndarray | None = None

    @property
    def num_eval(self) -> int:
        return 0 if self.eval_rows is None else len(self.eval_rows)


def _concat(a: TokenizedSet, b: TokenizedSet) -> TokenizedSet:
    if a.seq_len != b.seq_len:
        raise DataError(f"rows of {a.seq_len} and {b.seq_len} tokens cannot share a pool")
    return TokenizedSet(ids=list(a.ids) + list(b.ids),
                        input_ids=np.concatenate([a.input_ids, b.input_ids]),
                        attention_mask=np.concatenate([a.attention_mask, b.attention_mask]),
                        loss_mask=np.concatenate([a.loss_mask, b.loss_mask]),
                        source_ids=list(a.source_ids) + list(b.source_ids))


def _sample(rows: TokenizedSet, m: int, rng: np.random.Generator) -> TokenizedSet:
    if m >= len(rows):
        return rows
    return rows.subset(np.sort(rng.choice(len(rows), m, replace=False)))


def build_selection_task(cfg: SelectionTaskConfig = SelectionTaskConfig()) -> SelectionTask:
    """The selection task (module docstring); deterministic in ``cfg``."""
    ft = cfg.finetune
    clash = set(cfg.distractors) & (set(ft.base.corpus.plays) | set(ft.works))
    if clash:
        raise ConfigError(f"distractor play(s) {sorted(clash)} are also pretraining plays or "
                          f"target works; choose other plays (stride_jax.data.list_plays())")
    if not cfg.distractor_ratio >= 0:
        raise ConfigError(f"distractor_ratio={cfg.distractor_ratio} must be >= 0")
    if cfg.max_target_rows is not None and cfg.max_target_rows < 1:
        raise ConfigError(f"max_target_rows={cfg.max_target_rows} must be >= 1 (or null)")

    # The base: the pretraining task's model on all its rows (as build_finetune_task).
    corpus, mcfg, graphdef, init_params = _pretrain_parts(ft.base)
    base = Trainer(_lm_functions(graphdef)[0], init_params, _row_data(corpus.train), ft.base.optim,
                   key=jax.random.fold_in(jax.random.key(ft.base.seed), 1),
                   eval_fn=lambda p: jnp.zeros(()))
    base_params = base.train(checkpoints=1)[0]

    # Target-domain rows split as in task (b): train rows join the pool, held-out rows are
    # the targets and the evaluation rows.
    seq_len = ft.base.corpus.seq_len
    rows = tokenize_documents(shakespeare_plays(list(ft.works)), corpus.tokenizer, seq_len,
                              mode="chunk")
    parts = split_ids(rows.ids, {"train": 1.0 - ft.heldout_fraction,
                                 "heldout": ft.heldout_fraction}, seed=ft.seed)
    heldout = rows.subset(sorted(parts["heldout"]))
    targets = _first_queries(heldout, ft.num_queries)
    taken = set(targets.ids)
    rest = [i for i in range(len(heldout))
            if heldout.ids[i] not in taken and heldout.loss_mask[i].sum() > 0]
    if cfg.num_eval is not None:
        rest = rest[: max(0, cfg.num_eval)]
    eval_rows = heldout.subset(rest) if rest else None

    rng = np.random.default_rng(cfg.pool_seed)
    in_rows = rows.subset(sorted(parts["train"]))
    if cfg.max_target_rows is not None:
        in_rows = _sample(in_rows, cfg.max_target_rows, rng)
    m_out = int(round(cfg.distractor_ratio * len(in_rows)))
    if m_out > 0:
        out_all = tokenize_documents(shakespeare_plays(list(cfg.distractors)), corpus.tokenizer,
                                     seq_len, mode="chunk")
        pool = _concat(in_rows, _sample(out_all, m_out, rng))
    else:
        pool = in_rows
    pool = pool.subset(rng.permutation(len(pool)))
    in_domain = np.isin(np.asarray(pool.source_ids), list(ft.works))

    stamp = {"task": "selection", "config": to_dict(cfg), "base": params_fingerprint(base_params)}
    return assemble_selection_task(graphdef=graphdef, base_params=base_params, pool=pool,
                                   in_domain=in_domain, targets=targets, eval_rows=eval_rows,
                                   optim=ft.optim, seed=ft.seed, stamp=stamp,
                                   num_layers=mcfg.num_layers, tok=corpus.tokenizer)


def assemble_selection_task(*, graphdef, base_params, pool: TokenizedSet, in_domain: np.ndarray,
                            targets: TokenizedSet, eval_rows: TokenizedSet | None,
                            optim: OptimConfig, seed: int, stamp: dict, num_layers: int,
                            tok, name: str = "selection") -> SelectionTask:
    """A :class:`SelectionTask` from a base model (an nnx ``graphdef`` and its parameters) and rows.

    The attributed model is ``base_params`` fine-tuned on all of ``pool`` with ``optim`` (by
    :func:`stride_jax.tasks.lm._make_task`, data-order key ``fold_in(key(seed), 1)``); selections
    are fine-tuned from ``base_params`` by a :class:`Trainer` with the same recipe and key.
    :func:`build_selection_task` calls this with the Shakespeare rows; tests with synthetic ones.
    """
    in_domain = np.asarray(in_domain, bool)
    if in_domain.shape != (len(pool),):
        raise DataError(f"in_domain has shape {in_domain.shape}; expected ({len(pool)},), one "
                        f"flag per pool row")
    task = _make_task(name, graphdef=graphdef, init_params=base_params, train=pool,
                      queries=targets, optim=optim, seed=seed, stamp=stamp,
                      num_layers=num_layers, tok=tok)
    # One trainer (the same recipe, initialisation and data-order key as the attributed model's)
    # evaluates targets and held-out rows together, so each selection is fine-tuned once.
    batch_loss, _, row_losses = _lm_functions(graphdef)
    both = targets if eval_rows is None or len(eval_rows) == 0 else _concat(targets, eval_rows)
    both_data = jax.tree.map(jnp.asarray, _row_data(both))
    eval_fn = jax.jit(lambda p: row_losses(p, both_data))
    trainer = Trainer(batch_loss, base_params, _row_data(pool), optim,
                      key=jax.random.fold_in(jax.random.key(seed), 1), eval_fn=eval_fn)
    Q = len(targets)
    fields = {f.name: getattr(task, f.name) for f in dataclasses.fields(Task)}
    fields["retrain"] = lambda subsets_pk: trainer.retrain_losses(subsets_pk)[:, :Q]
    return SelectionTask(**fields, in_domain=in_domain,
                         eval_rows=None if both is targets else eval_rows,
                         retrain_all=trainer.retrain_losses,
                         pretrained_losses=np.asarray(eval_fn(base_params), np.float64),
                         full_losses=np.asarray(eval_fn(task.params), np.float64))
