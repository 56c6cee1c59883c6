"""Evaluation metrics for attribution scores: LDS and counterfactual removal.

Sign convention: ``scores_qn[q, i] > 0`` means training example ``i`` lowers query ``q``'s loss.

* :func:`lds` - the Linear Datamodeling Score (Ilyas et al. 2022, "Datamodels"; Park et al. 2023,
  "TRAK", Sec. 2.2): how well additive scores rank the losses of models retrained on subsets;
* :func:`counterfactual_summary` - the loss increase from removing the top-k attributed examples
  against removing k random ones;
* :func:`spearman` and :func:`summarize` (mean, std and percentile-bootstrap CI over queries).

Everything here is NumPy in float64: these run once per evaluation on small matrices.
"""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple

import numpy as np
from scipy.stats import rankdata

from stride_jax.errors import DataError

__all__ = ["LDSResult", "Summary", "counterfactual_summary", "lds", "spearman", "summarize"]

logger = logging.getLogger(__name__)

# Bootstrap resamples are drawn in blocks so that memory stays ~8 MB however many queries.
_BOOTSTRAP_BLOCK_ELEMS = 1 << 20


def spearman(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman rank correlation of ``a`` and ``b`` along ``axis`` (float64, vectorised).

        rho(a, b) = corr(rank(a), rank(b))     (Pearson correlation of the ranks)

    Ties get average ranks, as in :func:`scipy.stats.spearmanr`. ``a`` and ``b`` are broadcast
    together; the result has ``axis`` removed. It is NaN where either side is constant along
    ``axis`` (the correlation is undefined) or contains a NaN.
    """
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    ra = np.moveaxis(rankdata(a, axis=axis), axis, -1)
    rb = np.moveaxis(rankdata(b, axis=axis), axis, -1)
    # Ranks of a constant vector are all equal, so the centred ranks are exactly zero and the
    # denominator is exactly zero: no tolerance needed to detect the undefined case.
    ra = ra - ra.mean(-1, keepdims=True)
    rb = rb - rb.mean(-1, keepdims=True)
    num = (ra * rb).sum(-1)
    den = np.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return np.clip(rho, -1.0, 1.0)


class Summary(NamedTuple):
    """Mean of per-query values with a percentile-bootstrap confidence interval (NaNs dropped)."""

    mean: float
    std: float
    ci_low: float
    ci_high: float
    n: int


def summarize(values: np.ndarray, *, bootstrap: int = 1000, confidence: float = 0.95,
              seed: int = 0) -> Summary:
    """Mean, sample std (ddof=1) and percentile-bootstrap CI of the mean of the finite ``values``.

    The CI is the ``(1 - c)/2`` and ``(1 + c)/2`` quantiles of the means of ``bootstrap``
    resamples (with replacement) of the finite values (Efron & Tibshirani 1993, Ch. 13).
    ``bootstrap=0`` skips it (NaN bounds). With no finite values everything is NaN and ``n=0``.
    """
    if bootstrap < 0:
        raise DataError(f"bootstrap must be >= 0 (got {bootstrap}); use 0 to skip the CI")
    if not 0.0 < confidence < 1.0:
        raise DataError(f"confidence must be in (0, 1) (got {confidence}), e.g. 0.95")
    v = np.asarray(values, np.float64).ravel()
    v = v[np.isfinite(v)]
    n = v.size
    if n == 0:
        return Summary(math.nan, math.nan, math.nan, math.nan, 0)
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if n > 1 else 0.0
    if bootstrap == 0:
        return Summary(mean, std, math.nan, math.nan, n)
    rng = np.random.default_rng(seed)
    block = max(1, _BOOTSTRAP_BLOCK_ELEMS // n)
    means = np.concatenate([v[rng.integers(0, n, (min(block, bootstrap - s), n))].mean(1)
                            for s in range(0, bootstrap, block)])
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Summary(mean, std, float(lo), float(hi), n)


def _json_float(x: float) -> float | None:
    # JSON has no NaN; None (null) is what readers of the file can parse.
    return float(x) if math.isfinite(x) else None


class LDSResult(NamedTuple):
    """Per-query LDS and its summary over queries (see :func:`lds`)."""

    per_query: np.ndarray  # [Q] float64, NaN where the correlation is undefined
    mean: float
    std: float
    ci_low: float
    ci_high: float
    num_queries: int  # queries with a defined LDS
    num_subsets: int
    confidence: float

    def format(self, digits: int = 3) -> str:
        """E.g. ``LDS 0.412 ± 0.101 (95% CI 0.390–0.430, 100 queries, 256 subsets)``."""
        d = digits
        undefined = self.per_query.size - self.num_queries
        extra = f", {undefined} undefined" if undefined else ""
        return (f"LDS {self.mean:.{d}f} ± {self.std:.{d}f} ({self.confidence * 100:g}% CI "
                f"{self.ci_low:.{d}f}–{self.ci_high:.{d}f}, {self.num_queries} queries{extra}, "
                f"{self.num_subsets} subsets)")

    def __str__(self) -> str:
        return self.format()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; NaNs become ``None``."""
        return {"mean": _json_float(self.mean), "std": _json_float(self.std),
                "ci_low": _json_float(self.ci_low), "ci_high": _json_float(self.ci_high),
                "num_queries": int(self.num_queries), "num_subsets": int(self.num_subsets),
                "confidence": float(self.confidence),
                "per_query": [_json_float(x) for x in self.per_query.tolist()]}


def _first(idx: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in idx[:limit])
    return f"[{shown}{', ...' if idx.size > limit else ''}] ({idx.size} in all)"


def _validate_lds(scores_qn: np.ndarray, masks_sn: np.ndarray, losses_sq: np.ndarray) -> None:
    for name, x, shape in (("scores_qn", scores_qn, "[Q, n]"), ("masks_sn", masks_sn, "[S, n]"),
                           ("losses_sq", losses_sq, "[S, Q]")):
        if x.ndim != 2:
            raise DataError(f"{name} must be 2-D {shape}; got shape {x.shape}")
    (q, n), (s, n_m), (s_l, q_l) = scores_qn.shape, masks_sn.shape, losses_sq.shape
    if n_m != n:
        raise DataError(f"masks_sn {masks_sn.shape} and scores_qn {scores_qn.shape} disagree on "
                        f"the number of training examples ({n_m} vs {n}); masks_sn must be "
                        f"[S, n] over the same training examples, in the same order, as scores_qn")
    if (s_l, q_l) != (s, q):
        hint = (" (it looks like [Q, S]: pass losses_sq.T)" if (s_l, q_l) == (q, s) else "")
        raise DataError(f"losses_sq must be [S, Q] = [{s}, {q}] (subsets of masks_sn x queries "
                        f"of scores_qn); got {losses_sq.shape}{hint}")
    if s < 3:
        raise DataError(f"LDS needs at least 3 subsets to rank (got S={s}); retrain on more "
                        f"subsets (typically 100+)")
    if masks_sn.dtype != np.bool_:
        bad = ~np.isin(masks_sn, (0, 1))
        if bad.any():
            rows = np.flatnonzero(bad.any(1))
            raise DataError(f"masks_sn must be boolean or 0/1; subsets {_first(rows)} hold other "
                            f"values (e.g. {masks_sn[bad][0]!r}); pass membership masks, not "
                            f"counts or weights")
    bad_q = np.flatnonzero(~np.isfinite(scores_qn).all(1))
    if bad_q.size:
        raise DataError(f"scores_qn has NaN/inf in queries {_first(bad_q)}; fix or drop those "
                        f"queries before evaluating")
    bad = ~np.isfinite(losses_sq)
    if bad.any():
        raise DataError(f"losses_sq has NaN/inf in subsets {_first(np.flatnonzero(bad.any(1)))}"
                        f" (queries {_first(np.flatnonzero(bad.any(0)))}); a retrained model "
                        f"probably diverged: retrain it or drop the subset")


def lds(scores_qn: np.ndarray, masks_sn: np.ndarray, losses_sq: np.ndarray, *,
        bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> LDSResult:
    """Linear Datamodeling Score of attribution scores against retrained-model losses.

    For subsets ``S_1 .. S_S`` of the training set (``masks_sn[s, i] = 1`` iff ``i in S_s``), a
    model retrained on each, and its loss ``L_q(S_s) = losses_sq[s, q]`` on query ``q``:

        g_q(S_s)  = sum_{i in S_s} scores_qn[q, i]          (additive predicted effect)
        LDS(q)    = rho_s( g_q(S_s), -L_q(S_s) )            (Spearman over the S subsets)
        LDS       = mean_q LDS(q)

    The loss is negated because a positive score means the example *lowers* the loss, so good
    scores predict a large ``g`` where the loss is small (LDS near +1). A query whose
    *predictions* are constant over the subsets (all-zero scores, an empty Lasso solution)
    predicts nothing: it scores ``LDS(q) = 0`` and stays in the mean, because leaving it out
    would reward a method for abstaining on its hardest queries. A query whose retrained *losses* are constant has no ground truth:
    ``LDS(q)`` is NaN and it is left out of the mean, std and the percentile-bootstrap CI over
    queries (:func:`summarize`).

    Reference: Park et al. 2023, "TRAK: Attributing Model Behavior at Scale", Sec. 2.2.
    """
    scores_qn = np.asarray(scores_qn)
    masks_sn = np.asarray(masks_sn)
    losses_sq = np.asarray(losses_sq)
    _validate_lds(scores_qn, masks_sn, losses_sq)
    pred_sq = masks_sn.astype(np.float64) @ scores_qn.astype(np.float64).T
    per_query = spearman(pred_sq, -losses_sq.astype(np.float64), axis=0)
    flat_pred = np.all(pred_sq == pred_sq[:1], axis=0)
    flat_loss = np.all(losses_sq == losses_sq[:1], axis=0)
    per_query[flat_pred & ~flat_loss] = 0.0
    if flat_pred.any():
        logger.info("constant predictions (e.g. all-zero scores) for queries %s: counted as "
                    "LDS 0", _first(np.flatnonzero(flat_pred)))
    undefined = np.flatnonzero(np.isnan(per_query))
    if undefined.size:
        logger.warning("LDS is undefined (constant retrained losses) for queries %s; they are "
                       "left out of the mean", _first(undefined))
    summ = summarize(per_query, bootstrap=bootstrap, confidence=confidence, seed=seed)
    return LDSResult(per_query=per_query, mean=summ.mean, std=summ.std, ci_low=summ.ci_low,
                     ci_high=summ.ci_high, num_queries=summ.n, num_subsets=masks_sn.shape[0],
                     confidence=confidence)


def counterfactual_summary(loss_base_q: np.ndarray, loss_removed_top_q: np.ndarray,
                           loss_removed_random_q: np.ndarray, *, bootstrap: int = 1000,
                           confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Loss increase from removing the top-k attributed examples vs k random ones, per query.

        up_top(q)  = L_q(D minus top_k(q)) - L_q(D)
        up_rand(q) = L_q(D minus random_k) - L_q(D)
        diff(q)    = up_top(q) - up_rand(q)

    Good scores make ``diff`` positive: removing the strongest proponents hurts the query more
    than removing as many random examples. ``loss_removed_random_q`` may be ``[R, Q]`` for ``R``
    random draws, which are averaged first. Returns (NaNs as ``None``) the mean increases, the
    mean ``diff`` with its percentile-bootstrap CI over queries, the fraction of queries with
    ``diff > 0``, and the number of queries.
    """
    base = np.asarray(loss_base_q, np.float64)
    top = np.asarray(loss_removed_top_q, np.float64)
    rand = np.asarray(loss_removed_random_q, np.float64)
    if rand.ndim == 2:
        rand = rand.mean(0)
    if base.ndim != 1 or top.shape != base.shape or rand.shape != base.shape:
        raise DataError(f"losses must be [Q] (random may be [R, Q]) with the same Q; got base "
                        f"{base.shape}, top {top.shape}, random {np.shape(loss_removed_random_q)}")
    for name, x in (("loss_base_q", base), ("loss_removed_top_q", top),
                    ("loss_removed_random_q", rand)):
        bad = np.flatnonzero(~np.isfinite(x))
        if bad.size:
            raise DataError(f"{name} has NaN/inf at queries {_first(bad)}; drop those queries")
    up_top, up_rand = top - base, rand - base
    diff = summarize(up_top - up_rand, bootstrap=bootstrap, confidence=confidence, seed=seed)
    return {"mean_increase_top": _json_float(float(up_top.mean())) if base.size else None,
            "mean_increase_random": _json_float(float(up_rand.mean())) if base.size else None,
            "mean_difference": _json_float(diff.mean),
            "difference_ci_low": _json_float(diff.ci_low),
            "difference_ci_high": _json_float(diff.ci_high),
            "fraction_top_greater": float((up_top > up_rand).mean()) if base.size else None,
            "num_queries": int(base.size), "confidence": float(confidence)}
