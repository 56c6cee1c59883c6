"""Data selection: rank a candidate pool by its aggregate influence on a set of target queries.

An attribution run gives ``S [Q, n]``: ``S[q, i] > 0`` means training on pool example ``i``
lowers target query ``q``'s loss. Selection keeps the ``k`` examples with the largest aggregate
value ``v [n]`` over the targets; the aggregates (:func:`aggregate`) are

* ``"mean"``: :math:`v_i = \\frac1Q \\sum_q S_{qi}`, the first-order predicted drop of the mean
  target loss when ``i`` is added (for additive scores). It is dominated by the queries with the
  largest score scale.
* ``"zscore"`` (default): each query's scores are standardised by their own spread first,

  .. math::
      z_{qi} = \\frac{S_{qi} - \\mu_q}{\\sigma_q}, \\qquad
      \\mu_q = \\frac1n \\sum_i S_{qi}, \\quad
      \\sigma_q = \\sqrt{\\frac1n \\sum_i (S_{qi} - \\mu_q)^2}, \\qquad
      v_i = \\frac1Q \\sum_q z_{qi},

  so every query gets one vote of the same weight. STRIDE's per-query scale depends on the
  solver's penalty chosen per query (Lasso vs ridge, its ``lam``), and a gradient method's on the
  query's gradient norm; neither says how much that query matters. A query whose scores are all
  equal (``sigma_q = 0``, e.g. an all-zero Lasso solution) contributes 0. Since ``mu_q`` shifts
  every example alike, the ranking equals that of :math:`\\sum_q S_{qi} / \\sigma_q`; ``v`` is
  invariant to rescaling any one query's scores by a positive factor.
* ``"rank"``: :math:`v_i = \\frac1Q \\sum_q \\frac{r_{qi} - 1}{n - 1}` with ``r_qi`` the rank of
  ``S_qi`` among query ``q``'s scores (1 = lowest, ties get their average rank; ``n = 1`` gives
  0), a Borda count in ``[0, 1]``, invariant to any increasing transform of each query's scores.

:func:`select_top` then keeps the indices of the ``k`` largest values, ties broken by the lower
index. Both are pure NumPy functions; ``stride-jax select`` applies them to a run directory and
:mod:`stride_jax.tasks.selection` / ``benchmarks/selection.py`` measure whether fine-tuning on
the selection lowers the target loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from stride_jax.attribution import Attribution, topk_texts
from stride_jax.errors import ConfigError, DataError

__all__ = ["AGGREGATES", "aggregate", "load_run", "select_run", "select_top", "zscore"]

Aggregate = Literal["zscore", "mean", "rank"]
AGGREGATES: tuple[str, ...] = ("zscore", "mean", "rank")


def _ranks01(s_qn: np.ndarray) -> np.ndarray:
    """Per row, average ranks of the values scaled to ``[0, 1]`` (0: lowest)."""
    Q, n = s_qn.shape
    if n == 1:
        return np.zeros_like(s_qn, np.float64)
    out = np.empty((Q, n), np.float64)
    for q in range(Q):
        row = s_qn[q]
        order = np.argsort(row, kind="stable")
        sorted_vals = row[order]
        # Average rank of each run of equal values (0-based positions).
        starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
        ends = np.r_[starts[1:], n]
        avg = (starts + ends - 1) / 2.0
        ranks = np.repeat(avg, ends - starts)
        out[q, order] = ranks
    return out / (n - 1)


def aggregate(scores_qn: np.ndarray, how: str = "zscore") -> np.ndarray:
    """One value per pool example, ``[n]`` float64, from scores ``[Q, n]`` (module docstring).

    Args:
      scores_qn: ``scores[q, i] > 0`` means example ``i`` lowers query ``q``'s loss. A 1-D array
        is taken as one query.
      how: ``"zscore"`` (per-query standardised mean), ``"mean"`` or ``"rank"`` (mean per-query
        rank in ``[0, 1]``). Larger values are better for the targets in every case.
    """
    if how not in AGGREGATES:
        raise ConfigError(f"unknown aggregate {how!r}; use one of {', '.join(AGGREGATES)}")
    s = np.asarray(scores_qn, np.float64)
    if s.ndim == 1:
        s = s[None]
    if s.ndim != 2 or s.shape[0] < 1 or s.shape[1] < 1:
        raise DataError(f"scores must be a [queries, pool] array with at least one of each, got "
                        f"shape {np.shape(scores_qn)}")
    if not np.isfinite(s).all():
        bad = np.argwhere(~np.isfinite(s))[0]
        raise DataError(f"scores hold {int((~np.isfinite(s)).sum())} NaN/inf value(s) (first: "
                        f"query {bad[0]}, example {bad[1]}); rerun the attribution that wrote "
                        f"them")
    if how == "mean":
        return s.mean(0)
    if how == "rank":
        return _ranks01(s).mean(0)
    return zscore(s).mean(0)


def zscore(scores_qn: np.ndarray) -> np.ndarray:
    """Per-query standardisation ``z_qi = (S_qi - mu_q) / sigma_q``, float64 ``[Q, n]`` (module
    docstring); a query whose scores are all equal gets 0 everywhere. Also what mixtures of
    methods (:mod:`stride_jax.methods`) sum."""
    s = np.asarray(scores_qn, np.float64)
    mu = s.mean(1, keepdims=True)
    sd = s.std(1, keepdims=True)
    # A constant query carries no ranking information: it contributes 0, not NaN. The tolerance
    # is relative, so round-off in an "all equal" row does not become a huge z-score.
    flat = sd <= 1e-12 * np.maximum(np.abs(mu), np.finfo(np.float64).tiny)
    return np.where(flat, 0.0, (s - mu) / np.where(flat, 1.0, sd))


def select_top(values_n: np.ndarray, k: int) -> np.ndarray:
    """Indices (int64 ``[k]``) of the ``k`` largest values, best first; ties: lower index first.

    Raises ``ValueError`` unless ``values_n`` is a finite 1-D array and ``1 <= k <= n``.
    """
    v = np.asarray(values_n, np.float64)
    if v.ndim != 1:
        raise DataError(f"values must be 1-D (one per pool example), got shape {v.shape}; "
                        f"aggregate [queries, pool] scores first")
    n = v.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ConfigError(f"k={k!r} must be an integer number of examples (1 <= k <= n={n})")
    if not 1 <= k <= n:
        raise ConfigError(f"k={k} is out of range for a pool of n={n} examples; choose "
                          f"1 <= k <= {n}")
    if not np.isfinite(v).all():
        raise DataError(f"values hold {int((~np.isfinite(v)).sum())} NaN/inf entries; "
                        f"the scores they came from are broken")
    return np.argsort(-v, kind="stable")[: int(k)].astype(np.int64)


# ---------------------------------------------------------------------------------------------
# A finished attribution run (``stride-jax select``)
# ---------------------------------------------------------------------------------------------
_RUN_HINT = ("pass the --out directory of `stride-jax attribute` (or `stride-jax score`), which "
             "holds scores.npy and ids.json")


def load_run(run_dir) -> tuple[np.ndarray, list[str], list[str], dict[str, str]]:
    """``(scores [Q, n], query_ids, pool_ids, texts)`` of a run directory
    (:meth:`stride_jax.attribution.Attribution.load`; it must hold the dense scores).

    ``texts`` maps pool ids to their text where ``topk.jsonl`` lists them (only the examples
    some query ranked among its top proponents or opponents; empty without the file).
    Missing or inconsistent files raise one-line ``FileNotFoundError`` / ``DataError``.
    """
    if Path(run_dir).is_file():   # Attribution.load would take it for a scores file
        raise DataError(f"{run_dir} is a file, not a run directory; {_RUN_HINT}")
    run = Attribution.load(run_dir, hint=_RUN_HINT)
    if run.scores_qn is None:
        raise DataError(f"{run_dir} kept only each query's top scores (scores=topk); selection "
                        f"aggregates every score: rerun the attribution with scores=dense")
    return run.scores_qn, run.query_ids, run.train_ids, topk_texts(run_dir)


def select_run(run_dir, k: int, *, how: str = "zscore", out=None) -> tuple[list[dict], Path]:
    """Select the top-``k`` pool examples of a run for its queries; write ``selected.jsonl``.

    Each line: ``rank`` (1 = best), ``id``, ``index`` (position in the pool), ``value`` (the
    aggregate) and ``text`` where ``topk.jsonl`` has it. ``out`` defaults to
    ``run_dir/selected.jsonl``. Returns the records and the path written.
    """
    from stride_jax.io.atomic import atomic_write_text, json_text
    from stride_jax.io.outdir import check_output_file
    path = Path(out) if out is not None else Path(run_dir) / "selected.jsonl"
    if out is not None or Path(run_dir).is_dir():   # else load_run says what is wrong
        check_output_file(path, example="selected.jsonl")   # before any work
    scores, _, pool_ids, texts = load_run(run_dir)
    values = aggregate(scores, how)
    n = len(pool_ids)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ConfigError(f"--k {k} is out of range: the run's pool has n={n} examples, so "
                          f"choose 1 <= k <= {n}")
    idx = select_top(values, int(k))
    recs = []
    for r, i in enumerate(idx, 1):
        rec = {"rank": r, "id": pool_ids[i], "index": int(i), "value": float(values[i])}
        if pool_ids[i] in texts:
            rec["text"] = texts[pool_ids[i]]
        recs.append(rec)
    atomic_write_text(path, "".join(json_text(r, what=str(path), ensure_ascii=False) + "\n"
                                    for r in recs))
    return recs, path
