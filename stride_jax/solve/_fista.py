"""FISTA for the per-query Lasso of STRIDE, on the sparse design, batched over queries.

For each query q (DESIGN.md section 1, step 5)::

    (w_q, b_q) = argmin_{w, b} 1/2 ||y_q - M w - b 1||^2 + lam_q ||w||_1

with M the K x n design, b_q an unpenalised intercept (``fit_intercept``) and no sign
constraint. With an intercept this is the Lasso on column-centred M and centred y (see
:mod:`._ops`); b_q = mean(y_q - M w_q) afterwards.

Algorithm. FISTA (Beck and Teboulle, "A fast iterative shrinkage-thresholding algorithm for
linear inverse problems", SIAM J. Imaging Sci. 2009) with gradient-based adaptive restart
(O'Donoghue and Candes, "Adaptive restart for accelerated gradient schemes", FoCM 2015), step
1/L with L = ||M_c||^2 from power iterations. Every query runs its own iteration; a query stops
once its duality gap is small and stays frozen while the others go on, so a query's answer does
not depend on which queries share its batch.

The default wraps FISTA in a working-set loop (as celer: Massias, Gramfort and Salmon,
"Celer: a fast solver for the Lasso with dual extrapolation", ICML 2018). With n >> K the solution
has at most K nonzeros, usually far fewer, while a full FISTA iteration costs two sparse products
over all n examples. So, per batch of queries:

1. g = M_c^T r at the current w (one sparse product) gives the duality gap over *all* examples;
   a query whose gap is below ``tol * ||y_c||^2`` is done (the certificate is always global);
2. each query's working set is its support plus the examples that most violate the optimality
   condition |g_j| <= lam (top-p of |g_j| / lam), p = twice the largest support in the batch
   (at least 64) rounded up to a power of two, doubling from the third round on;
3. FISTA solves the Lasso restricted to the working set on its p x p Gram matrix (built from the
   sparse slots, never from a dense M), to a gap of 0.3 times the target or an iteration budget
   (200, doubling every round, so a poor first working set is not solved to the end); the
   residual comes with it, and the loop goes back to 1.

Typically two or three sparse products per query in all, against hundreds for plain FISTA. If the
support outgrows the largest working set (``max_working_set``: see :func:`fista`) or the outer loop
does not converge, plain FISTA over all examples finishes the job from where the working-set loop
stopped. The working set pays off when n >> support^2 / d (STRIDE's regime: n up to millions,
supports of tens to hundreds); for dense solutions on small n, plain FISTA is as fast.

Duality gap (for the centred problem, r = y_c - M_c w, g = M_c^T r, s = min(1, lam/||g||_inf),
dual point theta = s r)::

    gap = 1/2 ||r||^2 + lam ||w||_1 - (1/2 ||y_c||^2 - 1/2 ||y_c - theta||^2)
        = 1/2 (1 + s^2) ||r||^2 - s <y_c, r> + lam ||w||_1

written without the 1/2 ||y_c||^2 terms, which would cancel catastrophically in float32.
Convergence: gap <= tol * ||y_c||^2, the criterion of scikit-learn's coordinate descent.

Arithmetic is float32, or float64 when ``jax_enable_x64`` is on. Responses are centred in float64
on the host first. In float32 the gap itself is only accurate to about 1e-6 ||y_c||^2, hence the
default tol = 1e-5 (scikit-learn's default is 1e-4); ask for less only with x64 on.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax.parallel import place_queries, query_devices
from stride_jax.solve._ops import (
    SparseOps,
    broadcast_lam,
    intercepts,
    lipschitz,
    prepare_targets,
    sparse_ops,
)
from stride_jax.subsets import Design

__all__ = ["LassoResult", "fista"]

log = logging.getLogger(__name__)

_MIN_WORKING_SET = 64
# Inner problems are solved to this fraction of the outer target, so that once the working set is
# right the outer gap check passes at once (celer uses the same factor).
_INNER_TOL_FRACTION = 0.3
_MAX_OUTER = 20
# Iterations allowed to the first inner solve, doubling every round: a working set chosen at a
# poor point (e.g. w = 0) is not worth solving to the end before its KKT check.
_INNER_BUDGET = 200
# Floats in one sub-batch of working-set problems (one-hot block [qs, K+1, p] + Gram [qs, p, p] and
# temporaries): 2^25 float32 = 128 MiB.
_SUBSOLVE_BUDGET = 1 << 25
_GRAM_POWER_ITERS = 50
_GRAM_MARGIN = 1.05


class LassoResult(NamedTuple):
    """Per-query Lasso solutions (host numpy arrays).

    w_qn: float32 [Q, n] coefficients; intercept_q: float64 [Q] (0 without intercept);
    num_iters_q: int [Q] proximal-gradient iterations; objective_q: float64 [Q] value of
    1/2 ||y - M w - b||^2 + lam ||w||_1; converged_q: bool [Q] whether the stopping criterion
    was met within ``max_iter``.
    """

    w_qn: np.ndarray
    intercept_q: np.ndarray
    num_iters_q: np.ndarray
    objective_q: np.ndarray
    converged_q: np.ndarray


def compute_dtype() -> Any:
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def _soft(x: jax.Array, thresh: jax.Array) -> jax.Array:
    return jnp.sign(x) * jnp.maximum(jnp.abs(x) - thresh, 0.0)


def _gap_terms(rr, yr, l1, gmax, lam):
    """Duality gap and primal objective from ||r||^2, <y_c, r>, ||w||_1, ||g||_inf."""
    s = jnp.minimum(1.0, lam / jnp.maximum(gmax, jnp.finfo(rr.dtype).tiny))
    gap = 0.5 * (1.0 + s * s) * rr - s * yr + lam * l1
    primal = 0.5 * rr + lam * l1
    return gap, primal


# ------------------------------------------------------------------------------------------------
# kernels on a batch of queries (query axis last: w_nq, y_kq, r_kq)
# ------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("fit_intercept",))
def _residual(ops: SparseOps, y_kq, w_nq, *, fit_intercept: bool):
    return y_kq - ops.matvec_c(w_nq, fit_intercept)


@jax.jit
def _kkt(ops: SparseOps, y_kq, lam_q, w_nq, r_kq):
    """(g_nq, gap_q, primal_q, nnz_q) at w with residual r (centred if intercept)."""
    g = ops.rmatvec(r_kq)
    gap, primal = _gap_terms(jnp.sum(r_kq * r_kq, 0), jnp.sum(y_kq * r_kq, 0),
                             jnp.sum(jnp.abs(w_nq), 0), jnp.max(jnp.abs(g), 0), lam_q)
    return g, gap, primal, jnp.sum(w_nq != 0, 0)


_SELECT_BLOCK = 128


@functools.partial(jax.jit, static_argnames=("p",))
def _select(g_nq, w_nq, lam_q, *, p: int):
    """Working sets [Q, p]: the support first, then the largest |g_j| / lam (KKT violation).

    Exact top-p per query without transposing the [n, Q] scores (XLA's CPU transpose of that
    block cost more than everything else here): the top p entries lie in the p blocks of
    ``_SELECT_BLOCK`` examples with the largest block maxima, so take those blocks first
    (a reduction along n), then top-p among their p * 128 entries.
    """
    n, Q = g_nq.shape
    B = _SELECT_BLOCK
    nb = -(-n // B)
    score = jnp.where(w_nq != 0, jnp.inf, jnp.abs(g_nq) / lam_q)
    score = jnp.pad(score, ((0, nb * B - n), (0, 0)), constant_values=-1.0)  # below any score
    kb = min(p, nb)
    _, top_blocks = jax.lax.top_k(score.reshape(nb, B, Q).max(axis=1).T, kb)  # [Q, kb]
    ids = (top_blocks[:, :, None] * B + jnp.arange(B)).reshape(Q, kb * B)
    cand = score[ids, jnp.arange(Q)[:, None]]
    _, j = jax.lax.top_k(cand, p)
    return jnp.take_along_axis(ids, j, axis=1).astype(jnp.int32)


def _gram_fista(G, c, S, y, lam, x0, done0, tol_abs, budget, s_w, *, num_subsets,
                fit_intercept, check_every):
    """FISTA on min_x 1/2 x^T G x - c^T x + lam ||x||_1 for a batch [qs] of p-dim problems.

    G = X_c^T X_c and c = X_c^T y_c, with X the working-set columns of M given by their subset
    ids S [c_max, qs, p]. The gap is checked every ``check_every`` steps with the explicit
    residual y_c - X_c x (the Gram form 1/2||y||^2 - c.x + ... would cancel in float32). A query
    stops when its gap is below ``tol_abs`` or it has used ``budget`` iterations.
    """
    dtype = G.dtype
    K = num_subsets
    qs = c.shape[0]
    qi = jnp.arange(qs)[None, :, None]
    # Power iteration on each Gram matrix for its own step size.
    v = jax.random.normal(jax.random.key(0), c.shape, dtype)  # fixed start: deterministic

    def power(_, v):
        v = jnp.einsum("qab,qb->qa", G, v)
        return v / jnp.maximum(jnp.linalg.norm(v, axis=1, keepdims=True), 1e-30)

    v = jax.lax.fori_loop(0, _GRAM_POWER_ITERS, power, v)
    L = jnp.maximum(jnp.einsum("qa,qab,qb->q", v, G, v) * _GRAM_MARGIN, 1e-12)
    step = (1.0 / L)[:, None]
    thresh = (lam / L)[:, None]

    def resid(x):
        # X x as a scatter of the p coefficients onto their subsets (qs*p*c_max adds).
        xw = jnp.zeros((qs, K + 1), dtype).at[qi, S].add(jnp.broadcast_to(x[None], S.shape))
        xw = xw[:, :K]
        if fit_intercept:
            xw = xw - (jnp.sum(s_w * x, 1) / K)[:, None]
        return y - xw

    def fista_step(_, state):
        x, z, t = state
        grad = jnp.einsum("qab,qb->qa", G, z) - c
        x_new = _soft(z - step * grad, thresh)
        restart = jnp.sum((z - x_new) * (x_new - x), 1) > 0
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        z_new = x_new + ((t - 1.0) / t_new)[:, None] * (x_new - x)
        z_new = jnp.where(restart[:, None], x_new, z_new)
        t_new = jnp.where(restart, 1.0, t_new)
        return x_new, z_new, t_new

    def block(state):
        x, z, t, it, done = state
        x1, z1, t1 = jax.lax.fori_loop(0, check_every, fista_step, (x, z, t))
        frozen = done | (it >= budget)
        keep = frozen[:, None]
        x1, z1 = jnp.where(keep, x, x1), jnp.where(keep, z, z1)
        t1 = jnp.where(frozen, t, t1)
        it = it + jnp.where(frozen, 0, check_every)
        r = resid(x1)
        u = c - jnp.einsum("qab,qb->qa", G, x1)  # X_c^T r
        gap, _ = _gap_terms(jnp.sum(r * r, 1), jnp.sum(y * r, 1), jnp.sum(jnp.abs(x1), 1),
                            jnp.max(jnp.abs(u), 1), lam)
        return x1, z1, t1, it, done | (gap <= tol_abs)

    def cond(state):
        return jnp.any(~state[4] & (state[3] < budget))

    it0 = jnp.zeros(lam.shape, jnp.int32)
    one = jnp.ones(lam.shape, dtype)
    x, _, _, it, done = jax.lax.while_loop(cond, block, (x0, x0, one, it0, done0))
    return x, resid(x), it, done


@functools.partial(
    jax.jit, static_argnames=("p", "sub_batch", "fit_intercept", "check_every"))
def _subsolve(ops: SparseOps, y_kq, lam_q, w_nq, r_kq, ws_qp, done_q, tol_abs_q, budget_q, *,
              p: int, sub_batch: int, fit_intercept: bool, check_every: int):
    """Solve every query's Lasso restricted to its working set; returns (w_nq, r_kq, iters_q).

    Queries marked done keep (w, r) as given.
    """
    K = ops.num_subsets
    n, Q = w_nq.shape
    dtype = w_nq.dtype
    qs = sub_batch
    m = -(-Q // qs)
    pad = m * qs - Q

    def padq(a, value):
        if pad == 0:
            return a
        widths = [(0, pad)] + [(0, 0)] * (a.ndim - 1)
        return jnp.pad(a, widths, constant_values=value)

    y_qk = padq(y_kq.T, 0)
    lam = padq(lam_q, 1)
    ws = padq(ws_qp, 0)
    x0 = padq(jnp.take_along_axis(w_nq.T, ws_qp, axis=1), 0)
    done = padq(done_q, True)
    tol = padq(tol_abs_q, 0)
    budget = padq(budget_q, 0)

    def solve_batch(args):
        y, lam, ws, x0, done, tol, budget = args
        qi = jnp.arange(qs)[:, None]
        S = ops.slots[:, ws]  # [c, qs, p] subset ids of each working-set column (K = padding)
        c_slots = S.shape[0]
        if c_slots <= 16 and p <= 128:
            # G[q, a, b] = number of subsets shared by columns a and b: c^2 p^2 comparisons and
            # no K x p one-hot block; the fastest way for small working sets (measured).
            St = jnp.moveaxis(S, 0, -1)  # [qs, p, c]
            same = St[:, :, None, :, None] == St[:, None, :, None, :]
            same = same & (St[:, :, None, :, None] < K)
            G = jnp.sum(same, axis=(-1, -2), dtype=jnp.int32).astype(dtype)
        else:
            ai = jnp.arange(p)[None, :]
            onehot = jnp.zeros((qs, K + 1, p), dtype).at[qi[None], S, ai[None]].add(1.0)
            onehot = onehot.at[:, K, :].set(0.0)  # the padding row
            if c_slots <= 16:
                # G[q, a, :] = sum of the one-hot rows of a's subsets: c p^2 adds, not K p^2.
                G = onehot[qi, S[0]]
                for s in range(1, c_slots):
                    G = G + onehot[qi, S[s]]
            else:  # many subsets per example (Bernoulli designs): a batched matmul
                G = jnp.einsum("qka,qkb->qab", onehot, onehot)
        y_pad = jnp.concatenate([y, jnp.zeros((qs, 1), dtype)], axis=1)
        cvec = jnp.sum(y_pad[qi[None], S], axis=0)  # X^T y_c (= X_c^T y_c, y_c centred)
        s_w = ops.counts.astype(dtype)[ws]
        if fit_intercept:
            G = G - s_w[:, :, None] * s_w[:, None, :] / K
        x, r, it, _ = _gram_fista(G, cvec, S, y, lam, x0, done, tol, budget, s_w,
                                  num_subsets=K, fit_intercept=fit_intercept,
                                  check_every=check_every)
        return x, r, it

    def split(a):
        return a.reshape((m, qs) + a.shape[1:])

    x, r, it = jax.lax.map(solve_batch, tuple(split(a) for a in (y_qk, lam, ws, x0, done, tol, budget)))
    x = x.reshape(m * qs, p)[:Q]
    r = r.reshape(m * qs, K)[:Q]
    it = it.reshape(m * qs)[:Q]
    w_new = jnp.zeros((Q, n), dtype).at[jnp.arange(Q)[:, None], ws_qp].set(x)
    keep = done_q[None, :]
    return jnp.where(keep, w_nq, w_new.T), jnp.where(keep, r_kq, r.T), it


@functools.partial(jax.jit, static_argnames=("fit_intercept", "check_every"))
def _full_fista(ops: SparseOps, y_kq, lam_q, w_nq, done_q, L, tol_abs_q, budget_q, *,
                fit_intercept: bool, check_every: int):
    """Plain FISTA over all n examples (two sparse products per step); returns (w, r, iters)."""
    step = 1.0 / L
    thresh = lam_q[None, :] / L

    def fista_step(_, state):
        x, z, t = state
        r = y_kq - ops.matvec_c(z, fit_intercept)
        x_new = _soft(z + step * ops.rmatvec(r), thresh)
        restart = jnp.sum((z - x_new) * (x_new - x), 0) > 0
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        z_new = x_new + ((t - 1.0) / t_new)[None, :] * (x_new - x)
        z_new = jnp.where(restart[None, :], x_new, z_new)
        return x_new, z_new, jnp.where(restart, 1.0, t_new)

    def block(state):
        x, z, t, it, done = state
        x1, z1, t1 = jax.lax.fori_loop(0, check_every, fista_step, (x, z, t))
        frozen = done | (it >= budget_q)
        keep = frozen[None, :]
        x1, z1 = jnp.where(keep, x, x1), jnp.where(keep, z, z1)
        t1 = jnp.where(frozen, t, t1)
        it = it + jnp.where(frozen, 0, check_every)
        r = y_kq - ops.matvec_c(x1, fit_intercept)
        g = ops.rmatvec(r)
        gap, _ = _gap_terms(jnp.sum(r * r, 0), jnp.sum(y_kq * r, 0), jnp.sum(jnp.abs(x1), 0),
                            jnp.max(jnp.abs(g), 0), lam_q)
        return x1, z1, t1, it, done | (gap <= tol_abs_q)

    def cond(state):
        return jnp.any(~state[4] & (state[3] < budget_q))

    it0 = jnp.zeros(lam_q.shape, jnp.int32)
    one = jnp.ones(lam_q.shape, w_nq.dtype)
    x, _, _, it, _ = jax.lax.while_loop(cond, block, (w_nq, w_nq, one, it0, done_q))
    return x, y_kq - ops.matvec_c(x, fit_intercept), it


# ------------------------------------------------------------------------------------------------
# drivers
# ------------------------------------------------------------------------------------------------


def _pow2ceil(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def _pow2floor(x: int) -> int:
    return 1 << max(0, int(x).bit_length() - 1)


def _sub_batch(Q: int, K: int, p: int) -> int:
    return int(max(1, min(Q, _SUBSOLVE_BUDGET // (p * (K + 1 + 2 * p)))))


class _Chunk(NamedTuple):
    w_nq: jax.Array
    r_kq: jax.Array
    iters_q: np.ndarray
    gap_q: np.ndarray
    primal_q: np.ndarray
    done_q: np.ndarray


def _solve_chunk(design: Design, ops: SparseOps, y_kq, lam_q, w_nq, tol_abs_q, *,
                 fit_intercept: bool, max_iter: int, check_every: int, working_set: bool,
                 max_working_set: int, w_zero: bool) -> _Chunk:
    """One batch of queries (fixed shapes): working-set loop, then plain FISTA if needed."""
    K, n = design.num_subsets, design.num_examples
    Q = lam_q.shape[0]
    r_kq = y_kq if w_zero else _residual(ops, y_kq, w_nq, fit_intercept=fit_intercept)
    g, gap, primal, nnz = _kkt(ops, y_kq, lam_q, w_nq, r_kq)
    done = np.asarray(gap <= tol_abs_q)
    iters = np.zeros(Q, np.int64)
    p_cap = min(n, max_working_set)
    p_prev = 0
    outer = 0
    while working_set and outer < _MAX_OUTER:
        active = ~done & (iters < max_iter)
        if not active.any():
            break
        max_nnz = int(np.asarray(nnz)[active].max())
        if max_nnz >= p_cap:
            break  # the support alone fills the largest working set: plain FISTA below
        # Twice the support (as celer): room for the strongest violators without paying for all
        # of them (at w = 0 most examples violate); never shrink, and double after two rounds
        # in case violators keep displacing each other.
        need = max(_MIN_WORKING_SET, 2 * max_nnz)
        p = max(_pow2ceil(need), 2 * p_prev if outer >= 2 else p_prev)
        p = min(p, p_cap)
        ws = _select(g, w_nq, lam_q, p=p)
        w_nq, r_kq, it = _subsolve(
            ops, y_kq, lam_q, w_nq, r_kq, ws, jnp.asarray(done), tol_abs_q * _INNER_TOL_FRACTION,
            jnp.asarray(np.minimum(max_iter - iters, _INNER_BUDGET << outer), jnp.int32),
            p=p, sub_batch=_sub_batch(Q, K, p),
            fit_intercept=fit_intercept, check_every=check_every)
        iters += np.asarray(it)
        g, gap, primal, nnz = _kkt(ops, y_kq, lam_q, w_nq, r_kq)
        done = done | np.asarray(gap <= tol_abs_q)
        p_prev = p
        outer += 1
    if not (done | (iters >= max_iter)).all():
        if working_set:
            log.debug("working-set FISTA left %d of %d queries unconverged after %d rounds; "
                      "finishing with plain FISTA", int((~done).sum()), Q, outer)
        L = lipschitz(design, fit_intercept)
        w_nq, r_kq, it = _full_fista(
            ops, y_kq, lam_q, w_nq, jnp.asarray(done), jnp.asarray(L, y_kq.dtype), tol_abs_q,
            jnp.asarray(max_iter - iters, jnp.int32), fit_intercept=fit_intercept,
            check_every=check_every)
        iters += np.asarray(it)
        _, gap, primal, _ = _kkt(ops, y_kq, lam_q, w_nq, r_kq)
        done = done | np.asarray(gap <= tol_abs_q)
    return _Chunk(w_nq, r_kq, iters, np.asarray(gap), np.asarray(primal), done)


def run_chunked(design: Design, y_qk: Any, lam: Any, *, fit_intercept: bool, tol: float,
                w0: Any, query_chunk: int, chunk_fn) -> LassoResult:
    """Shared driver: centre y, split queries into fixed-size chunks (the last one padded with
    y = 0 queries, which converge at once, so every chunk reuses one compiled program), call
    ``chunk_fn(ops, y_kq, lam_q, w_nq, tol_abs_q) -> _Chunk`` and assemble host results."""
    if isinstance(query_chunk, bool) or not isinstance(query_chunk, int) or query_chunk < 1:
        raise ValueError(f"query_chunk must be a positive integer, got {query_chunk!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    K, n = design.num_subsets, design.num_examples
    y_c, y_mean = prepare_targets(y_qk, K, fit_intercept)
    Q = y_c.shape[0]
    lam_all = broadcast_lam(lam, Q)
    if w0 is not None:
        w0 = np.asarray(w0)
        if w0.ndim == 1:
            w0 = w0[None]
        if w0.shape != (Q, n):
            raise ValueError(f"w0 must have shape [Q={Q}, n={n}], got {w0.shape}")
    if Q == 0:
        return LassoResult(np.zeros((0, n), np.float32), np.zeros(0), np.zeros(0, np.int64),
                           np.zeros(0), np.zeros(0, bool))
    dtype = compute_dtype()
    ops = sparse_ops(design, dtype)
    # Inside parallel.query_sharding each chunk is split over the devices (a multiple of them).
    D = query_devices()
    chunk = -(-min(query_chunk, Q) // D) * D
    w_out = np.empty((Q, n), np.float32)
    iters = np.empty(Q, np.int64)
    objective = np.empty(Q, np.float64)
    converged = np.empty(Q, bool)
    for start in range(0, Q, chunk):
        stop = min(start + chunk, Q)
        pad = chunk - (stop - start)
        y_blk = np.pad(y_c[start:stop], ((0, pad), (0, 0)))
        lam_blk = np.pad(lam_all[start:stop], (0, pad), constant_values=1.0)
        yy = np.sum(y_blk * y_blk, axis=1)
        if w0 is None:
            w_blk = (jnp.zeros((n, chunk), dtype) if D == 1
                     else place_queries(np.zeros((n, chunk), dtype), 1))
        else:
            w_blk = place_queries(np.pad(w0[start:stop], ((0, pad), (0, 0))).T, 1, dtype)
        out = chunk_fn(ops, place_queries(y_blk.T, 1, dtype), place_queries(lam_blk, 0, dtype),
                       w_blk, place_queries(tol * yy, 0, dtype))
        k = stop - start
        w_out[start:stop] = np.asarray(out.w_nq, np.float32).T[:k]
        iters[start:stop] = out.iters_q[:k]
        objective[start:stop] = out.primal_q[:k]
        converged[start:stop] = out.done_q[:k]
    b = intercepts(design, w_out, y_mean) if fit_intercept else np.zeros(Q)
    return LassoResult(w_out, b, iters, objective, converged)


def fista(
    design: Design,
    y_qk: Any,
    lam: Any,
    *,
    fit_intercept: bool = True,
    max_iter: int = 2000,
    tol: float = 1e-5,
    w0: Any = None,
    query_chunk: int = 256,
    working_set: bool = True,
    max_working_set: int | None = None,
    check_every: int = 10,
) -> LassoResult:
    """Solve the Lasso of every query with FISTA on the sparse design.

    Minimises, per query q, ``1/2 ||y_q - M w - b_q 1||^2 + lam_q ||w||_1`` over w (and the
    unpenalised b_q when ``fit_intercept``; else b_q = 0). See the module docstring for the
    algorithm.

    Args:
      design: the K x n membership matrix.
      y_qk: responses [Q, K] (or [K] for one query).
      lam: penalty, a positive scalar or one per query [Q].
      fit_intercept: fit the per-query intercept b_q.
      max_iter: most FISTA iterations per query, all inner solves and the fallback together
        (counted in blocks of ``check_every``).
      tol: stop when the duality gap is <= tol * ||y_q - mean(y_q)||^2 (scikit-learn's rule).
      w0: optional warm start [Q, n] (e.g. the solution at a larger lam on a path).
      query_chunk: queries solved together; bounds memory, does not change the results beyond
        the solver tolerance.
      working_set: use the working-set loop (default); False runs plain FISTA over all examples.
      max_working_set: largest working set. Default: the smaller of 2 K (a Lasso solution
        generically has at most K nonzeros) and sqrt(2 nnz) (beyond it a p x p Gram iteration
        costs more than the two sparse products of a plain iteration), as powers of two, at
        least 64.
      check_every: FISTA steps between duality-gap checks.

    Returns:
      :class:`LassoResult` with host arrays.
    """
    for name, v in (("max_iter", max_iter), ("check_every", check_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if max_working_set is None:
        max_working_set = min(_pow2ceil(2 * design.num_subsets),
                              max(_MIN_WORKING_SET, _pow2floor(math.isqrt(2 * design.nnz))))
    if max_working_set < 1:
        raise ValueError(f"max_working_set must be positive, got {max_working_set}")

    def chunk_fn(ops, y_kq, lam_q, w_nq, tol_abs_q):
        return _solve_chunk(design, ops, y_kq, lam_q, w_nq, tol_abs_q,
                            fit_intercept=bool(fit_intercept), max_iter=int(max_iter),
                            check_every=int(check_every), working_set=bool(working_set),
                            max_working_set=int(max_working_set), w_zero=w0 is None)

    return run_chunked(design, y_qk, lam, fit_intercept=bool(fit_intercept), tol=float(tol),
                       w0=w0, query_chunk=query_chunk, chunk_fn=chunk_fn)
