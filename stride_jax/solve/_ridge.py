"""Ridge regression of the responses on the design, in closed form over subsets, and its CV.

For each query q::

    (w_q, b_q) = argmin_{w, b} 1/2 ||y_q - M w - b 1||^2 + alpha_q / 2 ||w||^2

(b_q unpenalised, optional; the same minimiser as scikit-learn's ``Ridge(alpha)``, whose loss is
twice ours). As for the Lasso (:mod:`._ops`), the intercept is eliminated by centring:
with P = I - 1 1^T / K, M_c = P M and y_c = P y, the problem over w alone is the ridge of y_c
on M_c, and b_q = mean(y_q) - mean(M w_q) afterwards.

Dual (kernel) form. With n >> K the K x K Gram matrix over subsets is the small one::

    G = M M^T  (G[k, l] = |S_k n S_l|, built from the sparse design),   G_c = P G P
    w = M_c^T (G_c + alpha I)^{-1} y_c = M^T c,   c = (G_c + alpha I)^{-1} y_c

(c is centred, since G_c 1 = 0 and 1^T y_c = 0, so M_c^T c = M^T c). G_c does not depend on the
query, so it is eigendecomposed once, G_c = V diag(e) V^T, and every query and every alpha costs
a diagonal rescaling: c = V diag(1 / (e + alpha)) V^T y_c. Nothing n x n is ever formed; memory is
K x K (fine for K up to several thousand) plus n x ``query_chunk`` for M^T c. All of it runs in
float64 on the host (numpy / scipy.sparse): the answer is exact, not iterative.

Alpha grid. Geometric, ``ratio_min .. ratio_max`` (1e-3 .. 1e3) times the mean eigenvalue of
G_c, trace(G_c) / K = (nnz - sum_i c_i^2 / K) / K (c_i the example counts; nnz / K without an
intercept), shared by every query (ridge solutions scale with y, so no per-query scale is needed).

Cross-validation over subsets, with the same fold assignment as the Lasso's
(:func:`._lambda.cross_validate_lambda`, same ``key``). A training fold T (K_T subsets) is solved
at alpha * K_T / K, the value whose per-subset penalty matches alpha on all K subsets (again as
the Lasso). Everything follows from the full Gram G: with G_T the centred Gram of T,
c_T = (G_T + alpha_T I)^{-1} P_T y_T, the held-out prediction is

    M_H w + b = (G[H, T] - 1 mean_rows(G[T, T])) c_T + mean(y_T)

so each fold costs one |T| x |T| eigendecomposition and a matrix product per alpha for all queries.
The score is the held-out squared error summed over all folds and divided by K, the Lasso CV's.

Threads. The dense algebra runs with single-threaded BLAS/LAPACK (via ``threadpoolctl`` when it is
installed): right after JAX/XLA work, multithreaded OpenBLAS ``eigh`` measured 10-60x slower than
single-threaded on a 2-core machine shared with another job (349 x 349: 2 s against 0.03 s; 2000 x 2000: 18 s against
1.5 s).
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import jax
import numpy as np
import scipy.sparse as sp

from stride_jax.solve._ops import _cache, intercepts, prepare_targets
from stride_jax.subsets import Design

__all__ = [
    "RidgeCVResult",
    "RidgeResult",
    "cross_validate_ridge",
    "ridge",
    "ridge_alpha_grid",
    "subset_gram",
]


try:
    from threadpoolctl import threadpool_limits as _threadpool_limits
except ImportError:  # optional: without it BLAS keeps its own thread count
    _threadpool_limits = None


def _serial_blas() -> contextlib.AbstractContextManager:
    if _threadpool_limits is None:
        return contextlib.nullcontext()
    return _threadpool_limits(limits=1, user_api="blas")


def _csr(design: Design) -> sp.csr_matrix:
    entry = _cache(design)
    if "csr" not in entry:
        entry["csr"] = sp.csr_matrix(
            (np.ones(design.nnz), design.cols, design.indptr),
            shape=(design.num_subsets, design.num_examples))
    return entry["csr"]


def subset_gram(design: Design) -> np.ndarray:
    """float64 [K, K]: G = M M^T, the overlaps |S_k n S_l| of the subsets (cached per design).

    Built by a sparse product (cost sum_i c_i^2, c_i the example counts), never densifying M.
    """
    entry = _cache(design)
    if "gram" not in entry:
        m = _csr(design)
        g = np.asarray((m @ m.T).toarray(), np.float64)
        g.setflags(write=False)
        entry["gram"] = g
    return entry["gram"]


def _centre(g: np.ndarray) -> np.ndarray:
    """P G P for a symmetric G, P = I - 1 1^T / K."""
    row = g.mean(axis=0)
    return g - row[None, :] - row[:, None] + row.mean()


def _eigh(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e, v = np.linalg.eigh(g)
    return np.maximum(e, 0.0), v  # G is PSD: round-off negatives would only hurt 1 / (e + alpha)


def _full_eigen(design: Design, fit_intercept: bool) -> tuple[np.ndarray, np.ndarray]:
    entry = _cache(design)
    key = ("ridge_eigh", bool(fit_intercept))
    if key not in entry:
        g = subset_gram(design)
        entry[key] = _eigh(_centre(g) if fit_intercept else g)
    return entry[key]


def _mean_eigenvalue(design: Design, fit_intercept: bool) -> float:
    """trace(G_c) / K (trace(G) / K without an intercept), from the example counts alone."""
    K = design.num_subsets
    counts = design.example_counts.astype(np.float64)
    trace = float(design.nnz) - (float(counts @ counts) / K if fit_intercept else 0.0)
    return trace / K


def ridge_alpha_grid(design: Design, *, grid_size: int = 13, ratio_min: float = 1e-3,
                     ratio_max: float = 1e3, fit_intercept: bool = True) -> np.ndarray:
    """float64 [A]: ``grid_size`` alphas from ``ratio_max`` down to ``ratio_min`` times the mean
    eigenvalue of the (centred) subset Gram, trace(G_c) / K (large alpha first, as the Lasso
    grid; a design whose Gram vanishes gets scale 1)."""
    if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 1:
        raise ValueError(f"grid_size must be a positive integer, got {grid_size!r}")
    if not (np.isfinite(ratio_min) and np.isfinite(ratio_max) and 0 < ratio_min <= ratio_max):
        raise ValueError(
            f"need 0 < ratio_min <= ratio_max < inf, got ratio_min={ratio_min!r}, "
            f"ratio_max={ratio_max!r}")
    scale = _mean_eigenvalue(design, fit_intercept)
    if not scale > 0:
        scale = 1.0
    if grid_size == 1:
        return np.array([np.sqrt(ratio_min * ratio_max) * scale])
    return np.geomspace(ratio_max, ratio_min, grid_size) * scale


def _check_chunk(query_chunk: int) -> None:
    if isinstance(query_chunk, bool) or not isinstance(query_chunk, int) or query_chunk < 1:
        raise ValueError(f"query_chunk must be a positive integer, got {query_chunk!r}")


def _broadcast_alpha(alpha: Any, num_queries: int) -> np.ndarray:
    a = np.asarray(alpha, np.float64)
    if a.ndim == 0:
        a = np.full(num_queries, float(a))
    if a.shape != (num_queries,):
        raise ValueError(f"alpha must be a scalar or have shape [Q={num_queries}], got {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ValueError("ridge alpha must be positive and finite (alpha = 0 is least squares, "
                         "which has no unique solution when n > K)")
    return a


class RidgeResult(NamedTuple):
    """Per-query ridge solutions: w_qn float32 [Q, n], intercept_q float64 [Q] (0 without
    intercept), alpha_q [Q] the penalty used, objective_q [Q] the value of
    1/2 ||y - M w - b||^2 + alpha / 2 ||w||^2 at the solution."""

    w_qn: np.ndarray
    intercept_q: np.ndarray
    alpha_q: np.ndarray
    objective_q: np.ndarray


def ridge(design: Design, y_qk: Any, alpha: Any, *, fit_intercept: bool = True,
          query_chunk: int = 256) -> RidgeResult:
    """Exact per-query ridge regression of ``y_qk`` [Q, K] (or [K]) on the design, in dual form.

    ``alpha``: a positive scalar or one per query [Q]. See the module docstring for the math.
    ``query_chunk`` bounds the n x chunk float64 block of M^T c; it does not change the results
    beyond float round-off.
    """
    _check_chunk(query_chunk)
    K, n = design.num_subsets, design.num_examples
    y_c, y_mean = prepare_targets(y_qk, K, fit_intercept)
    Q = y_c.shape[0]
    alpha_q = _broadcast_alpha(alpha, Q)
    with _serial_blas():
        return _ridge(design, y_c, y_mean, alpha_q, fit_intercept, query_chunk)


def _ridge(design: Design, y_c: np.ndarray, y_mean: np.ndarray, alpha_q: np.ndarray,
           fit_intercept: bool, query_chunk: int) -> RidgeResult:
    Q, n = y_c.shape[0], design.num_examples
    e, v = _full_eigen(design, fit_intercept)
    mt = _csr(design).T.tocsr()  # n x K
    w_out = np.empty((Q, n), np.float32)
    b = np.zeros(Q)
    obj = np.empty(Q)
    for start in range(0, Q, query_chunk):
        stop = min(start + query_chunk, Q)
        z = v.T @ y_c[start:stop].T  # [K, q]
        f = 1.0 / (e[:, None] + alpha_q[None, start:stop])
        c = v @ (z * f)  # [K, q]: (G_c + alpha I)^{-1} y_c
        if fit_intercept:
            c -= c.mean(axis=0, keepdims=True)  # exactly centred (it is, up to round-off)
        w = np.asarray(mt @ c).T  # [q, n] float64
        # at the optimum r = y_c - G_c c = alpha c and ||w||^2 = c^T G_c c, so the objective is
        # alpha / 2 c^T y_c = alpha / 2 sum_j z_j^2 / (e_j + alpha)
        obj[start:stop] = 0.5 * alpha_q[start:stop] * np.sum(z * z * f, axis=0)
        if fit_intercept:
            b[start:stop] = intercepts(design, w, y_mean[start:stop])
        w_out[start:stop] = w
    return RidgeResult(w_out, b, alpha_q, obj)


class RidgeCVResult(NamedTuple):
    """Cross-validation of the ridge over subsets: the grid alphas_a [A] (shared by all queries),
    the mean held-out squared error cv_error_aq [A, Q] (summed over folds, divided by K, as
    :class:`._lambda.CVResult`), and per query the chosen alpha_q, its nearest grid index
    best_index_q and its CV error cv_error_q (at alpha_q itself, which lies between grid points
    when refined)."""

    alphas_a: np.ndarray
    cv_error_aq: np.ndarray
    alpha_q: np.ndarray
    best_index_q: np.ndarray
    cv_error_q: np.ndarray


def cross_validate_ridge(
    design: Design, y_qk: Any, *, folds: int = 3, key: jax.Array, alphas: Any = None,
    grid_size: int = 13, ratio_min: float = 1e-3, ratio_max: float = 1e3,
    fit_intercept: bool = True, query_chunk: int = 256, refine: bool = True,
) -> RidgeCVResult:
    """K-fold cross-validation of the ridge over subsets, per query (module docstring).

    The folds are those of :func:`._lambda.cross_validate_lambda` with the same ``key`` and
    ``folds``, so the two CV errors compare like for like. ``alphas`` [A] overrides the default
    :func:`ridge_alpha_grid`. ``refine`` (default) replaces each query's grid choice by the
    minimiser of its CV error between the neighbouring grid points (see
    :meth:`_RidgeFolds.refine`), so the chosen alpha, and the scores, are continuous in the
    responses.
    """
    from stride_jax.solve._lambda import _fold_ids  # the Lasso CV's own fold assignment

    _check_chunk(query_chunk)
    K = design.num_subsets
    y = np.asarray(y_qk, np.float64)
    y = y[None] if y.ndim == 1 else y
    prepare_targets(y, K, fit_intercept)  # validates shape and finiteness
    Q = y.shape[0]
    if alphas is None:
        alphas = ridge_alpha_grid(design, grid_size=grid_size, ratio_min=ratio_min,
                                  ratio_max=ratio_max, fit_intercept=fit_intercept)
    alphas = np.asarray(alphas, np.float64).ravel()
    if alphas.size == 0 or not np.all(np.isfinite(alphas)) or np.any(alphas <= 0):
        raise ValueError(f"alphas must be a non-empty array of positive values, got {alphas}")
    with _serial_blas():
        folds_ = _RidgeFolds(design, y, _fold_ids(K, folds, key), fit_intercept)
        err = np.stack([folds_.error(np.full(Q, a), query_chunk) for a in alphas])
        idx = np.argmin(err, axis=0)
        alpha_q, err_q = alphas[idx], err[idx, np.arange(Q)]
        if refine and alphas.size > 1:
            alpha_q, err_q = folds_.refine(alphas, idx, query_chunk)
    return RidgeCVResult(alphas, err, alpha_q, idx, err_q)


# Golden-section steps of the continuous alpha refinement: the bracket shrinks by 0.618 a step,
# so 48 steps leave ~1e-10 of its log-width, far below anything that changes the scores.
_REFINE_STEPS = 48

# The CV error is evaluated in blocks of this many queries, aligned to the query's index, whatever
# the query chunk. Near the minimum the two golden-section probes differ by less than float
# rounding, so each comparison follows the rounding of the BLAS kernel, and that depends on the
# shape of the product: chunk-sized blocks made alpha differ in its 7th digit between
# query_chunk=4 and 6. With fixed blocks every query's error is computed by the same product
# whatever the chunking, so alpha and the scores are bitwise chunk-invariant (64 columns are as
# fast as 256 at K = 1000).
_ERROR_BLOCK = 64


class _RidgeFolds:
    """The CV folds of one design and one response matrix, prepared once: per fold the
    eigendecomposition of the training Gram, the held-out cross Gram in its eigenbasis, and the
    queries' projected training targets. :meth:`error` then costs one [H, T] x [T, q] product
    per fold for any per-query alphas."""

    def __init__(self, design: Design, y: np.ndarray, fold_sets: list[np.ndarray],
                 fit_intercept: bool):
        K = design.num_subsets
        g = subset_gram(design)
        self.K, self.folds = K, []
        for held in fold_sets:
            train = np.setdiff1d(np.arange(K), held, assume_unique=True)
            g_tt = g[np.ix_(train, train)]
            cross = g[np.ix_(held, train)]  # [H, T]
            if fit_intercept:
                cross = cross - g_tt.mean(axis=0)[None, :]
                g_tt = _centre(g_tt)
            e, v = _eigh(g_tt)
            y_t, y_h = y[:, train], y[:, held]
            mean_t = y_t.mean(axis=1) if fit_intercept else np.zeros(y.shape[0])
            z = v.T @ (y_t - mean_t[:, None]).T  # [T, Q]
            resid0 = (y_h - mean_t[:, None]).T  # [H, Q]: held-out targets minus intercept part
            self.folds.append((e, cross @ v, z, resid0, train.size / K))

    def error(self, alpha_q: np.ndarray, query_chunk: int) -> np.ndarray:
        """[Q] mean held-out squared error with query q's ridge at ``alpha_q[q]``, computed in
        fixed blocks of ``_ERROR_BLOCK`` queries (``query_chunk`` does not change the result or
        the memory, which is a few [H or T, block] arrays)."""
        del query_chunk
        Q = alpha_q.shape[0]
        sq_err = np.zeros(Q)
        for e, cross_v, z, resid0, frac in self.folds:
            for start in range(0, Q, _ERROR_BLOCK):
                stop = min(start + _ERROR_BLOCK, Q)
                f = 1.0 / (e[:, None] + frac * alpha_q[None, start:stop])  # [T, q]
                pred = cross_v @ (z[:, start:stop] * f)  # [H, q]
                sq_err[start:stop] += np.sum((resid0[:, start:stop] - pred) ** 2, axis=0)
        return sq_err / self.K

    def refine(self, alphas: np.ndarray, idx: np.ndarray,
               query_chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """Per query, the minimiser of the CV error over log alpha between the grid neighbours
        of its best grid point (golden-section search; the error is smooth in alpha), and its
        CV error.

        Why: a grid argmin jumps when two grid points' errors cross, so a response change at
        float-rounding level can move alpha by a whole grid step (a factor of ~3) and the scores
        with it. The continuous minimiser moves continuously with the responses: when two grid
        points tie, both brackets contain the same minimum.
        """
        logs = np.log(alphas)
        lo = logs[np.maximum(idx - 1, 0)]
        hi = logs[np.minimum(idx + 1, alphas.size - 1)]
        a, b = np.minimum(lo, hi), np.maximum(lo, hi)
        ratio = (np.sqrt(5.0) - 1.0) / 2.0
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        fc, fd = self.error(np.exp(c), query_chunk), self.error(np.exp(d), query_chunk)
        for _ in range(_REFINE_STEPS):
            left = fc <= fd  # the minimum lies in [a, d]
            b = np.where(left, d, b)
            a = np.where(left, a, c)
            new = np.where(left, b - ratio * (b - a), a + ratio * (b - a))
            fnew = self.error(np.exp(new), query_chunk)
            c, d, fc, fd = (np.where(left, new, d), np.where(left, c, new),
                            np.where(left, fnew, fd), np.where(left, fc, fnew))
        best = np.exp(0.5 * (a + b))
        err_best = self.error(best, query_chunk)
        # Never worse than the grid point the search started from.
        grid = alphas[idx]
        err_grid = self.error(grid, query_chunk)
        keep_grid = err_grid < err_best
        return np.where(keep_grid, grid, best), np.where(keep_grid, err_grid, err_best)
