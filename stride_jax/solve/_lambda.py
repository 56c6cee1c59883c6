"""Choosing lambda: lambda_max, warm-started paths, cross-validation over subsets, target support.

lambda_max. For the Lasso ``1/2 ||y_c - M_c w||^2 + lam ||w||_1`` the optimality condition at
w = 0 is ||M_c^T y_c||_inf <= lam, so ``lambda_max_q = ||M_c^T y_c,q||_inf`` is the smallest
lam whose solution is exactly zero (M^T y without an intercept).

Paths. A geometric grid ``lambda_max_q * min_ratio^(l / (L - 1))``, l = 0..L-1, solved from the
top down, each solve warm-started at the previous solution (Friedman, Hastie and Tibshirani,
J. Stat. Softw. 2010): the support grows slowly along the grid, so each step is cheap.

Cross-validation over subsets. The rows of M (subsets) are the samples of this regression. The
K subsets are split at random into ``folds`` folds; for each fold, the Lasso is fitted on the
other subsets' rows of M and y and scored by the mean squared error of M_held w + b on the
held-out rows; each query keeps the lam with the lowest error averaged over all held-out
subsets. Our objective sums squares over subsets (it is K times scikit-learn's mean-based one),
so a training fold with K_train subsets is solved at lam * K_train / K, the value that matches
lam on all K subsets.

Target support. The largest grid lam whose solution has at least ``target_support`` nonzeros
(the prototype found a support of about 50 as good as cross-validation; DESIGN.md 1b).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax.parallel import place_queries, query_devices
from stride_jax.solve._fista import LassoResult, compute_dtype, fista
from stride_jax.solve._jaxopt import jaxopt_lasso
from stride_jax.solve._ops import SparseOps, prepare_targets, sparse_ops
from stride_jax.subsets import Design

__all__ = [
    "CVResult",
    "LassoPath",
    "cross_validate_lambda",
    "iter_lasso_path",
    "lambda_grid",
    "lambda_max",
    "lasso_path",
    "select_lambda_cv",
    "select_lambda_support",
]

log = logging.getLogger(__name__)

Solver = Literal["fista", "jaxopt"]


def _solver_fn(solver: str):
    if solver == "fista":
        return fista
    if solver == "jaxopt":
        return jaxopt_lasso
    raise ValueError(f"unknown solver {solver!r}; choose 'fista' or 'jaxopt'")


@jax.jit
def _abs_max_corr(ops: SparseOps, y_kq):
    return jnp.max(jnp.abs(ops.rmatvec(y_kq)), axis=0)


def lambda_max(design: Design, y_qk: Any, fit_intercept: bool = True, *,
               query_chunk: int = 256) -> np.ndarray:
    """float64 [Q]: the smallest lam whose Lasso solution is w = 0, per query.

    ``||M_c^T (y_q - mean(y_q))||_inf`` with an intercept, ``||M^T y_q||_inf`` without. Computed
    with the solvers' own arithmetic, so solving at exactly this lam returns w = 0.
    """
    y_c, _ = prepare_targets(y_qk, design.num_subsets, fit_intercept)
    dtype = compute_dtype()
    ops = sparse_ops(design, dtype)
    Q = y_c.shape[0]
    out = np.empty(Q)
    D = query_devices()
    chunk = -(-max(1, min(int(query_chunk), Q)) // D) * D
    for start in range(0, Q, chunk):
        blk = y_c[start:start + chunk]
        pad = chunk - blk.shape[0]
        y_kq = place_queries(np.pad(blk, ((0, pad), (0, 0))).T, 1, dtype)
        out[start:start + blk.shape[0]] = np.asarray(_abs_max_corr(ops, y_kq))[: blk.shape[0]]
    return out


def lambda_grid(lam_max_q: np.ndarray, grid_size: int = 20, min_ratio: float = 1e-3) -> np.ndarray:
    """[L, Q] geometric grid from ``lam_max_q`` down to ``min_ratio * lam_max_q``.

    A query with lambda_max = 0 (constant responses) gets a grid at 1e-30 instead: any positive
    lam gives it w = 0.
    """
    if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 1:
        raise ValueError(f"grid_size must be a positive integer, got {grid_size!r}")
    if not 0 < min_ratio <= 1:
        raise ValueError(f"min_ratio must lie in (0, 1], got {min_ratio!r}")
    ratios = np.geomspace(1.0, min_ratio, grid_size) if grid_size > 1 else np.ones(1)
    top = np.maximum(np.asarray(lam_max_q, np.float64), 1e-30)
    return ratios[:, None] * top[None, :]


class LassoPath(NamedTuple):
    """Solutions along a grid: lams_lq [L, Q], w_lqn float32 [L, Q, n], and per grid point and
    query intercept_lq, objective_lq, num_iters_lq, converged_lq."""

    lams_lq: np.ndarray
    w_lqn: np.ndarray
    intercept_lq: np.ndarray
    objective_lq: np.ndarray
    num_iters_lq: np.ndarray
    converged_lq: np.ndarray


def iter_lasso_path(
    design: Design, y_qk: Any, lams_lq: np.ndarray, *, fit_intercept: bool = True,
    solver: Solver = "fista", **solver_kw: Any,
) -> Iterator[LassoResult]:
    """Yield the solution at each row of ``lams_lq`` [L, Q], warm-starting from the previous one.

    Keeps one solution in memory at a time (a whole path is L x Q x n floats).
    """
    solve = _solver_fn(solver)
    lams_lq = np.asarray(lams_lq, np.float64)
    if lams_lq.ndim != 2:
        raise ValueError(f"lams_lq must have shape [L, Q], got {lams_lq.shape}")
    w0 = solver_kw.pop("w0", None)
    for lam_q in lams_lq:
        res = solve(design, y_qk, lam_q, fit_intercept=fit_intercept, w0=w0, **solver_kw)
        w0 = res.w_qn
        yield res


def lasso_path(
    design: Design, y_qk: Any, *, lams_lq: np.ndarray | None = None, grid_size: int = 20,
    min_ratio: float = 1e-3, fit_intercept: bool = True, solver: Solver = "fista",
    **solver_kw: Any,
) -> LassoPath:
    """Solve along a grid (default: :func:`lambda_grid` from :func:`lambda_max`), warm-started.

    Holds L x Q x n floats; for large problems iterate :func:`iter_lasso_path` instead.
    """
    if lams_lq is None:
        lams_lq = lambda_grid(lambda_max(design, y_qk, fit_intercept), grid_size, min_ratio)
    results = list(iter_lasso_path(design, y_qk, lams_lq, fit_intercept=fit_intercept,
                                   solver=solver, **solver_kw))
    return LassoPath(
        np.asarray(lams_lq, np.float64),
        np.stack([r.w_qn for r in results]),
        np.stack([r.intercept_q for r in results]),
        np.stack([r.objective_q for r in results]),
        np.stack([r.num_iters_q for r in results]),
        np.stack([r.converged_q for r in results]),
    )


@jax.jit
def _predict(ops: SparseOps, w_nq):
    return ops.matvec(w_nq)


def _fold_ids(num_subsets: int, folds: int, key: jax.Array) -> list[np.ndarray]:
    if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= num_subsets:
        raise ValueError(
            f"folds must be an integer in [2, K={num_subsets}], got {folds!r}")
    perm = np.asarray(jax.random.permutation(key, num_subsets))
    return [np.sort(perm[f::folds]) for f in range(folds)]


class CVResult(NamedTuple):
    """Cross-validation over subsets: the grid lams_lq [L, Q], the mean held-out squared error
    cv_error_lq [L, Q] (inf where the path stopped early), and per query the chosen lam_q and
    its grid index best_index_q."""

    lams_lq: np.ndarray
    cv_error_lq: np.ndarray
    lam_q: np.ndarray
    best_index_q: np.ndarray


def cross_validate_lambda(
    design: Design, y_qk: Any, *, folds: int = 3, key: jax.Array, grid_size: int = 20,
    min_ratio: float = 1e-3, lams_lq: np.ndarray | None = None, fit_intercept: bool = True,
    patience: int | None = 3, solver: Solver = "fista", **solver_kw: Any,
) -> CVResult:
    """K-fold cross-validation over subsets (see the module docstring), per query.

    The grid is relative to the full-data lambda_max. The path is walked from the top, every fold
    warm-started from its previous solution; with ``patience`` set, it stops once every query's
    CV error has exceeded its best so far for ``patience`` grid points in a row (CV curves are
    U-shaped; the small-lam end, where solutions are densest, is the expensive part).
    """
    K = design.num_subsets
    y_c, _ = prepare_targets(y_qk, K, fit_intercept)
    y = np.asarray(y_qk, np.float64).reshape(y_c.shape)
    Q = y_c.shape[0]
    if lams_lq is None:
        lams_lq = lambda_grid(lambda_max(design, y_qk, fit_intercept), grid_size, min_ratio)
    lams_lq = np.asarray(lams_lq, np.float64)
    if lams_lq.ndim != 2 or lams_lq.shape[1] != Q:
        raise ValueError(f"lams_lq must have shape [L, Q={Q}], got {lams_lq.shape}")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int)
                                 or patience < 1):
        raise ValueError(f"patience must be a positive integer or None, got {patience!r}")
    solve = _solver_fn(solver)
    fold_sets = _fold_ids(K, folds, key)
    dtype = compute_dtype()
    splits = []
    for held in fold_sets:
        train = np.setdiff1d(np.arange(K), held, assume_unique=True)
        held_design = design.take_subsets(held)
        splits.append((design.take_subsets(train), y[:, train], sparse_ops(held_design, dtype),
                       y[:, held], train.size / K))
    L = lams_lq.shape[0]
    err_lq = np.full((L, Q), np.inf)
    warm: list[np.ndarray | None] = [None] * len(splits)
    best = np.full(Q, np.inf)
    worse_for = np.zeros(Q, np.int64)
    stopped = np.zeros(Q, bool)
    for l in range(L):
        sq_err = np.zeros(Q)
        for f, (d_train, y_train, held_ops, y_held, scale) in enumerate(splits):
            res = solve(d_train, y_train, lams_lq[l] * scale, fit_intercept=fit_intercept,
                        w0=warm[f], **solver_kw)
            warm[f] = res.w_qn
            w_nq = np.pad(res.w_qn.T, ((0, 0), (0, -Q % query_devices())))
            pred = np.asarray(_predict(held_ops, place_queries(w_nq, 1, dtype)),
                              np.float64).T[:Q]
            pred += res.intercept_q[:, None]
            sq_err += np.sum((y_held - pred) ** 2, axis=1)
        # A query whose patience has run out ignores later grid points, so its choice does not
        # depend on which queries share its batch (query chunks, processes).
        err_lq[l] = np.where(stopped, np.inf, sq_err / K)
        improved = err_lq[l] < best
        best = np.where(improved, err_lq[l], best)
        worse_for = np.where(improved, 0, worse_for + 1)
        if patience is not None:
            stopped |= worse_for >= patience
            if stopped.all():
                log.debug("CV path stopped at grid point %d of %d", l + 1, L)
                break
    idx = np.argmin(err_lq, axis=0)
    return CVResult(lams_lq, err_lq, lams_lq[idx, np.arange(Q)], idx)


def select_lambda_cv(
    design: Design, y_qk: Any, *, folds: int = 3, key: jax.Array, grid_size: int = 20,
    min_ratio: float = 1e-3, fit_intercept: bool = True, patience: int | None = 3,
    solver: Solver = "fista", **solver_kw: Any,
) -> np.ndarray:
    """Per-query lam [Q] with the lowest cross-validated error over subsets
    (:func:`cross_validate_lambda`)."""
    return cross_validate_lambda(
        design, y_qk, folds=folds, key=key, grid_size=grid_size, min_ratio=min_ratio,
        fit_intercept=fit_intercept, patience=patience, solver=solver, **solver_kw).lam_q


def select_lambda_support(
    design: Design, y_qk: Any, target_support: int, *, grid_size: int = 20,
    min_ratio: float = 1e-3, fit_intercept: bool = True, solver: Solver = "fista",
    **solver_kw: Any,
) -> np.ndarray:
    """Per query, the largest grid lam whose solution has >= ``target_support`` nonzeros.

    Walks the warm-started path from lambda_max down and stops once every query has reached the
    target. A query that never does gets the smallest grid lam (logged).
    """
    if isinstance(target_support, bool) or not isinstance(target_support, int) or target_support < 1:
        raise ValueError(f"target_support must be a positive integer, got {target_support!r}")
    lams_lq = lambda_grid(lambda_max(design, y_qk, fit_intercept), grid_size, min_ratio)
    Q = lams_lq.shape[1]
    chosen = np.full(Q, np.nan)
    for l, res in enumerate(iter_lasso_path(design, y_qk, lams_lq, fit_intercept=fit_intercept,
                                            solver=solver, **solver_kw)):
        hit = np.isnan(chosen) & (np.count_nonzero(res.w_qn, axis=1) >= target_support)
        chosen[hit] = lams_lq[l, hit]
        if not np.isnan(chosen).any():
            break
    missing = np.isnan(chosen)
    if missing.any():
        log.warning("%d of %d queries never reached a support of %d on the grid; using the "
                    "smallest lam (lower min_ratio to go further)", int(missing.sum()), Q,
                    target_support)
        chosen[missing] = lams_lq[-1, missing]
    return chosen
