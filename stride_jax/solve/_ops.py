"""Sparse products with the design on device, and the quantities every solver shares.

Layout: the query axis is last (``w_nq``, ``y_kq``, ``r_kq``) so that every product moves
contiguous rows of Q numbers. M is held column-wise padded ("ELL"): ``slots[s, i]`` is the s-th
subset of example i (K where example i has fewer), see :meth:`Design.example_slots`. Then

    M^T u = sum_s  u_pad[slots[s]]                      (c_max row gathers)
    M w   = sum_s  scatter_add(slots[s], w)             (c_max row scatters)

with c_max = d for an expander design. On CPU this measured 5-10x faster than a
``jax.ops.segment_sum`` over the nnz pairs (which gathers then scatters nnz x Q numbers at once),
and it vmaps, so the single-query solvers (the jaxopt adapter) use the same code. The slot loop
is a ``fori_loop`` rather than unrolled: unrolled, XLA fused the c_max gathers into whatever
reduction consumed M^T u and ran 5-10x slower than the loop (measured on CPU).

With an intercept the Lasso over (w, b) equals the Lasso over w alone with column-centred M and
centred y: for fixed w the best b is mean(y - M w), and substituting it leaves
1/2 ||P (y - M w)||^2 with P = I - 1 1^T / K. Centring never densifies anything:
M_c w = M w - (c . w / K) 1 (c the example counts) and M_c^T u = M^T u for a centred u.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax.subsets import Design

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparseOps:
    """Device view of a design: padded slots, example counts, and the static sizes."""

    slots: jax.Array  # int32[c_max, n], padding value K
    counts: jax.Array  # float[n]: subsets per example (column sums of M)
    num_subsets: int = dataclasses.field(metadata=dict(static=True))

    @property
    def num_examples(self) -> int:
        return self.slots.shape[1]

    def matvec(self, w: jax.Array) -> jax.Array:
        """M w for w [n, ...] -> [K, ...]."""
        K = self.num_subsets
        acc = jnp.zeros((K + 1,) + w.shape[1:], w.dtype)  # row K collects the padding
        acc = jax.lax.fori_loop(0, self.slots.shape[0], lambda s, a: a.at[self.slots[s]].add(w), acc)
        return acc[:K]

    def rmatvec(self, u: jax.Array) -> jax.Array:
        """M^T u for u [K, ...] -> [n, ...]."""
        u_pad = jnp.concatenate([u, jnp.zeros((1,) + u.shape[1:], u.dtype)])
        acc = jnp.zeros((self.num_examples,) + u.shape[1:], u.dtype)
        return jax.lax.fori_loop(0, self.slots.shape[0], lambda s, a: a + u_pad[self.slots[s]], acc)

    def matvec_c(self, w: jax.Array, fit_intercept: bool) -> jax.Array:
        """M_c w: M w with its mean over subsets removed when ``fit_intercept``."""
        mw = self.matvec(w)
        if not fit_intercept:
            return mw
        mean = jnp.tensordot(self.counts.astype(w.dtype), w, axes=(0, 0)) / self.num_subsets
        return mw - mean[None]


_OPS_CACHE: "weakref.WeakKeyDictionary[Design, dict[Any, Any]]" = weakref.WeakKeyDictionary()


def _cache(design: Design) -> dict[Any, Any]:
    if not isinstance(design, Design):
        raise TypeError(f"expected a stride_jax.subsets.Design, got {type(design).__name__}")
    entry = _OPS_CACHE.get(design)
    if entry is None:
        entry = _OPS_CACHE[design] = {}
    return entry


def sparse_ops(design: Design, dtype: Any = jnp.float32) -> SparseOps:
    """Device arrays for ``design`` (built once per design object and dtype)."""
    entry = _cache(design)
    key = ("ops", jnp.dtype(dtype).name)
    if key not in entry:
        entry[key] = SparseOps(
            slots=jnp.asarray(design.example_slots()),
            counts=jnp.asarray(design.example_counts, dtype=dtype),
            num_subsets=design.num_subsets,
        )
    return entry[key]


@functools.partial(jax.jit, static_argnames=("fit_intercept", "num_iters"))
def _power_iteration(ops: SparseOps, v0: jax.Array, *, fit_intercept: bool, num_iters: int):
    def body(_, v):
        v = ops.rmatvec(ops.matvec_c(v, fit_intercept))
        return v / jnp.maximum(jnp.linalg.norm(v), 1e-30)

    v = jax.lax.fori_loop(0, num_iters, body, v0 / jnp.linalg.norm(v0))
    mv = ops.matvec_c(v, fit_intercept)
    return jnp.vdot(mv, mv)  # Rayleigh quotient of M_c^T M_c at the unit vector v


# Power iteration approaches the top eigenvalue from below; the margin keeps the step 1/L safe
# when the top of the spectrum is a dense bulk (centred expander designs) and convergence slow.
LIPSCHITZ_MARGIN = 1.05


def lipschitz(design: Design, fit_intercept: bool, *, num_iters: int = 100) -> float:
    """Estimate of L = ||M_c||_2^2, the Lipschitz constant of the Lasso gradient, times 1.05.

    By ``num_iters`` power iterations on M_c^T M_c from a fixed start (no dense spectral norm;
    DESIGN.md 1b). Cached per design object.
    """
    entry = _cache(design)
    key = ("lipschitz", bool(fit_intercept), int(num_iters))
    if key not in entry:
        ops = sparse_ops(design, jnp.float32)
        v0 = jax.random.normal(jax.random.key(0), (design.num_examples,), jnp.float32)
        est = float(_power_iteration(ops, v0, fit_intercept=bool(fit_intercept),
                                     num_iters=int(num_iters)))
        entry[key] = max(est * LIPSCHITZ_MARGIN, 1e-12)
    return entry[key]


def prepare_targets(y_qk: Any, num_subsets: int, fit_intercept: bool) -> tuple[np.ndarray, np.ndarray]:
    """(y_c [Q, K] float64, y_mean [Q]): responses centred over subsets when ``fit_intercept``.

    Centring happens on the host in float64 before the solver casts to float32: responses can
    be a tiny variation (1e-4) on a common shift (DESIGN.md 1b), which float32 centring would
    swallow.
    """
    y = np.asarray(y_qk, dtype=np.float64)
    if y.ndim == 1:
        y = y[None]
    if y.ndim != 2 or y.shape[1] != num_subsets:
        raise ValueError(f"y_qk must have shape [Q, K={num_subsets}], got {np.shape(y_qk)}")
    if not np.all(np.isfinite(y)):
        raise ValueError("y_qk holds NaN or infinite values")
    if fit_intercept:
        mean = y.mean(axis=1)
        return y - mean[:, None], mean
    return y, np.zeros(y.shape[0])


def broadcast_lam(lam: Any, num_queries: int) -> np.ndarray:
    """Per-query lambda [Q] from a scalar or a [Q] array; must be positive and finite."""
    lam_q = np.asarray(lam, dtype=np.float64)
    if lam_q.ndim == 0:
        lam_q = np.full(num_queries, float(lam_q))
    if lam_q.shape != (num_queries,):
        raise ValueError(f"lam must be a scalar or have shape [Q={num_queries}], got {lam_q.shape}")
    if not np.all(np.isfinite(lam_q)) or np.any(lam_q <= 0):
        raise ValueError(
            "lam must be positive and finite (lam = 0 is least squares, which has no unique "
            "solution when n > K); for w = 0 use any lam >= lambda_max"
        )
    return lam_q


def intercepts(design: Design, w_qn: np.ndarray, y_mean_q: np.ndarray) -> np.ndarray:
    """b_q = mean(y_q) - mean(M w_q) = mean(y_q) - (c . w_q) / K, in float64."""
    counts = design.example_counts.astype(np.float64)
    return y_mean_q - (w_qn.astype(np.float64) @ counts) / design.num_subsets
