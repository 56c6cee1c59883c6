"""The same Lasso through ``jaxopt.ProximalGradient``: a reference implementation to check ours.

Objective and products are those of :func:`stride_jax.solve.fista` (the sparse slot layout of
:mod:`._ops`, centring for the intercept). Following the prototype's lessons (DESIGN.md 1b):

* the design is pre-scaled instead of letting jaxopt line-search: dividing the smooth part by
  L = ||M_c||^2 (power iterations) makes its gradient 1-Lipschitz, so a fixed ``stepsize=1``
  is safe, and the penalty becomes lam / L (same minimiser);
* the solver object and its jitted, vmapped ``run`` are built once per static configuration and
  reused (a new solver per call recompiles);
* ``implicit_diff`` stays at its default.

jaxopt's stopping rule differs from ours: it stops when the fixed-point residual
||w - prox(w - grad)|| of the scaled problem is below ``tol``, an absolute quantity. The final
objective and convergence flag are reported on our scale (``converged_q``: jaxopt's own rule).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax.solve._fista import LassoResult, _Chunk, _kkt, _residual, run_chunked
from stride_jax.solve._ops import SparseOps, lipschitz
from stride_jax.subsets import Design

__all__ = ["jaxopt_lasso"]


def _import_jaxopt():
    # jaxopt announces its deprecation on import; that is for us to track, not for users to read.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import jaxopt
        import jaxopt.prox
    return jaxopt


@functools.lru_cache(maxsize=None)
def _runner(fit_intercept: bool, max_iter: int, tol: float):
    """Jitted, query-vmapped ``ProximalGradient.run`` for one static configuration."""
    jaxopt = _import_jaxopt()

    def smooth(w_n, y_k, ops: SparseOps, inv_L):
        r = y_k - ops.matvec_c(w_n, fit_intercept)
        return 0.5 * inv_L * jnp.vdot(r, r)

    solver = jaxopt.ProximalGradient(
        fun=smooth, prox=jaxopt.prox.prox_lasso, stepsize=1.0, maxiter=max_iter, tol=tol,
        acceleration=True, jit=True)

    def run_one(w0_n, y_k, lam, ops, inv_L):
        w, state = solver.run(w0_n, lam * inv_L, y_k, ops, inv_L)
        return w, state.iter_num, state.error

    @jax.jit
    def run(ops: SparseOps, y_kq, lam_q, w_nq, inv_L):
        w_qn, iters, err = jax.vmap(run_one, in_axes=(1, 1, 0, None, None))(
            w_nq, y_kq, lam_q, ops, inv_L)
        return w_qn.T, iters, err

    return run


def jaxopt_lasso(
    design: Design,
    y_qk: Any,
    lam: Any,
    *,
    fit_intercept: bool = True,
    max_iter: int = 2000,
    tol: float = 1e-6,
    w0: Any = None,
    query_chunk: int = 256,
) -> LassoResult:
    """Solve ``1/2 ||y_q - M w - b_q 1||^2 + lam_q ||w||_1`` per query with jaxopt.

    Same arguments and result as :func:`stride_jax.solve.fista`, except ``tol``: jaxopt's
    fixed-point residual on the problem scaled by 1/L (see the module docstring). Queries are
    vmapped; a query's iterations stop independently of the others in its batch.
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    fit_intercept = bool(fit_intercept)
    run = _runner(fit_intercept, int(max_iter), float(tol))
    inv_L = 1.0 / lipschitz(design, fit_intercept)

    def chunk_fn(ops, y_kq, lam_q, w_nq, tol_abs_q):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            w_nq, iters, err = run(ops, y_kq, lam_q, w_nq, jnp.asarray(inv_L, y_kq.dtype))
        r_kq = _residual(ops, y_kq, w_nq, fit_intercept=fit_intercept)
        _, gap, primal, _ = _kkt(ops, y_kq, lam_q, w_nq, r_kq)
        iters = np.asarray(iters)
        done = np.asarray(err) <= tol
        return _Chunk(w_nq, r_kq, iters, np.asarray(gap), np.asarray(primal), done)

    return run_chunked(design, y_qk, lam, fit_intercept=fit_intercept, tol=float(tol), w0=w0,
                       query_chunk=query_chunk, chunk_fn=chunk_fn)
