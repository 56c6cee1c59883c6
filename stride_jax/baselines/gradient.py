r"""Gradient-based training-data attribution baselines, generic over any JAX model.

Every method here scores a training example ``i`` for a query ``q`` by a bilinear form of their
per-example loss gradients ``g_i = grad_theta loss(theta, z_i)`` (flattened to ``P`` numbers)::

    graddot     s_qi = g_q . g_i
    tracin      s_qi = sum_c w_c g_q(theta_c) . g_i(theta_c)          (Pruthi et al. 2020)
    influence   s_qi = g_q^T (G^T G / n + lambda I)^{-1} g_i           (Koh & Liang 2017, with the
                                                                        empirical Fisher as Hessian)
    trak        s_qi = phi_q^T (Phi^T Phi + lambda I)^{-1} phi_i,  phi = R^T g  (Park et al. 2023)
    logra       the same with a Kronecker-structured R per weight matrix  (Choe et al. 2024)

**Sign convention** (shared with the rest of stride-jax): ``scores_qn[q, i] > 0`` means a gradient
step on example ``i`` *lowers* query ``q``'s loss. To first order a step
``theta <- theta - eta H^{-1} g_i`` changes the query loss by ``-eta g_q^T H^{-1} g_i``, so every
score is ``+g_q^T H^{-1} g_i`` (not negated). All functions return float32 ``np.ndarray [Q, n]``.

**Interface.** ``loss_fn(params, example) -> scalar`` where ``example`` is a pytree of arrays for
*one* example (no batch axis) and ``params`` any pytree of float arrays. Training and query sets
are pytrees of the same kind whose leaves carry a leading example axis (numpy or JAX arrays).
:func:`causal_lm_loss` and :func:`rows_as_examples` adapt stride-jax's own :class:`CausalLM` and
:class:`TokenizedSet` to it.

**Design.** Per-example gradients are computed by ``jax.vmap(jax.grad(loss_fn))`` over chunks of
``chunk`` examples, jitted once per call: the last chunk is padded to the fixed chunk shape by
wrapping around to the first examples and the padding rows are trimmed, so no shape ever
retraces. Each chunk is checked for non-finite gradients (naming the example). Projected methods
fuse the projection into the same jitted function, so only ``[chunk, P]`` gradients ever live at
once; ``influence`` keeps the full ``n x P`` gradient matrix and refuses when it exceeds a
memory budget. The damped inverses are solved in float64 by Cholesky, in whichever of the
primal (``k x k``) or dual (``n x n``, by the push-through identity) form is smaller:

    Phi_q (Phi^T Phi + lambda I)^{-1} Phi^T  ==  Phi_q Phi^T (Phi Phi^T + lambda I)^{-1}.

**Damping.** ``damping=None`` sets lambda to ``damping_fraction`` (default 0.1) times the mean
eigenvalue of the matrix being inverted: ``f * trace(G^T G / n) / P`` for :func:`influence` and
``f * trace(Phi^T Phi) / k`` for :func:`trak` / :func:`logra`. A float ``damping`` overrides it.
The right amount is task-dependent (on the digits task the exact influence function's LDS goes
from .38 at f = 0.1 to .51 at a 100x smaller damping), so benchmarks should tune it. With an exact projection (``R R^T = I``)
``trak(damping=lam) == influence(damping=lam / n) / n``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from flax import nnx
from jax.flatten_util import ravel_pytree

from stride_jax.errors import ConfigError, NonFiniteError
from stride_jax.model.loss import mean_token_loss

__all__ = [
    "Projector",
    "causal_lm_loss",
    "graddot",
    "influence",
    "logra",
    "logra_projections",
    "make_projector",
    "per_example_grads",
    "rows_as_examples",
    "tracin",
    "trak",
]

logger = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], jax.Array]
# Full float32 products: TF32 / bf16 passes on accelerators would swamp small score differences.
_HIGHEST = jax.lax.Precision.HIGHEST
_DEFAULT_DAMPING_FRACTION = 0.1


# ---------------------------------------------------------------------------------------------
# Validation and chunked per-example gradients
# ---------------------------------------------------------------------------------------------
def _as_examples(examples: Any, what: str) -> tuple[Any, int]:
    """Leaves as arrays (device arrays stay on device), and the shared leading axis size."""
    leaves, treedef = jax.tree.flatten(examples)
    if not leaves:
        raise ConfigError(f"the {what} set has no arrays (got {examples!r})")
    leaves = [a if isinstance(a, jax.Array) else np.asarray(a) for a in leaves]
    for a in leaves:
        if a.ndim < 1:
            raise ConfigError(f"every {what} leaf needs a leading example axis; got a scalar")
    sizes = {int(a.shape[0]) for a in leaves}
    if len(sizes) != 1:
        shapes = [tuple(a.shape) for a in leaves]
        raise ConfigError(f"the {what} leaves disagree on the number of examples (leading axis): "
                          f"shapes {shapes}")
    n = sizes.pop()
    if n == 0:
        raise ConfigError(f"the {what} set is empty")
    return jax.tree.unflatten(treedef, leaves), n


def _check_chunk(chunk: int) -> None:
    if not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ConfigError(f"chunk must be a positive integer, got {chunk!r}")


def _num_params(params: Any) -> int:
    return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(params)))


def _finite_rows(grads: Any) -> jax.Array:
    """``[c]`` bool: every gradient entry of example ``c`` is finite."""
    oks = [jnp.isfinite(g).reshape(g.shape[0], -1).all(axis=1) for g in jax.tree.leaves(grads)]
    return jnp.stack(oks).all(axis=0)


def _vmap_grads(loss_fn: LossFn, params: Any, batch: Any) -> Any:
    return jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, batch)


def _flatten_rows(grads: Any) -> jax.Array:
    # float32 whatever the parameter dtype: dot products of bf16 gradients lose too much.
    as_f32 = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    return jax.vmap(lambda t: ravel_pytree(t)[0])(as_f32)


def _flat_grad_fn(loss_fn: LossFn) -> Callable:
    """Jitted ``(params, batch) -> (flat grads [c, P], finite [c])``."""

    @jax.jit
    def fn(params, batch):
        g = _vmap_grads(loss_fn, params, batch)
        return _flatten_rows(g), _finite_rows(g)

    return fn


def _iter_chunks(fn: Callable, params: Any, examples: Any, n: int, chunk: int,
                 what: str) -> Iterator[tuple[int, jax.Array]]:
    """Yield ``(start, fn(params, examples[start:start + c])[0])`` over fixed-shape chunks."""
    c = min(chunk, n)
    for start in range(0, n, c):
        # Wrap around instead of padding with zeros: padding rows stay valid inputs (a zero row
        # could make the loss non-finite) and are trimmed below.
        idx = np.arange(start, start + c) % n
        batch = jax.tree.map(lambda a: a[idx], examples)
        out, ok = fn(params, batch)
        m = min(c, n - start)
        ok = np.asarray(ok)[:m]
        if not ok.all():
            bad = start + int(np.flatnonzero(~ok)[0])
            raise NonFiniteError(
                f"non-finite gradient for {what} example {bad} (of {n}); check that example's "
                f"inputs and the loss (NaN/inf inputs, log(0), or parameters that already "
                f"overflowed)")
        yield start, (out if m == c else out[:m])


def per_example_grads(loss_fn: LossFn, params: Any, examples: Any, *,
                      chunk: int = 32) -> Iterator[jax.Array]:
    """Flattened per-example gradients, chunk by chunk.

    Yields float32 ``[c, P]`` arrays (``c <= chunk``; rows in example order; columns in
    ``jax.flatten_util.ravel_pytree(params)`` order) of ``grad_theta loss_fn(params, example)``,
    computed by one jitted ``jax.vmap(jax.grad(loss_fn))`` (the last chunk is padded to the fixed
    shape by wrapping around and trimmed). Raises :class:`FloatingPointError` naming the first
    example whose gradient is not finite.
    """
    _check_chunk(chunk)
    examples, n = _as_examples(examples, "example")
    fn = _flat_grad_fn(loss_fn)
    for _, g in _iter_chunks(fn, params, examples, n, chunk, "example"):
        yield g


def _stack(fn: Callable, params: Any, examples: Any, n: int, chunk: int, what: str) -> jax.Array:
    return jnp.concatenate([g for _, g in _iter_chunks(fn, params, examples, n, chunk, what)])


@jax.jit
def _cross(a_qp: jax.Array, b_np: jax.Array) -> jax.Array:
    return jnp.matmul(a_qp, b_np.T, precision=_HIGHEST)


# ---------------------------------------------------------------------------------------------
# GradDot and TracIn
# ---------------------------------------------------------------------------------------------
def graddot(loss_fn: LossFn, params: Any, train: Any, queries: Any, *,
            chunk: int = 32) -> np.ndarray:
    """Gradient dot products ``s_qi = g_q . g_i`` (no curvature), float32 ``[Q, n]``.

    The query gradients ``[Q, P]`` are held in memory; training gradients are streamed.
    """
    return tracin(loss_fn, [params], train, queries, weights=[1.0], chunk=chunk)


def tracin(loss_fn: LossFn, checkpoints: Sequence[Any], train: Any, queries: Any, *,
           weights: Sequence[float] | None = None, chunk: int = 32) -> np.ndarray:
    r"""TracInCP: ``s_qi = sum_c w_c g_q(theta_c) . g_i(theta_c)``, float32 ``[Q, n]``.

    ``checkpoints`` are parameter pytrees of one structure (e.g. saved along training);
    ``weights`` are the learning rates in effect at each (default 1 each). With one checkpoint
    and weight 1 this is :func:`graddot`. Reference: Pruthi et al., "Estimating Training Data
    Influence by Tracing Gradient Descent", NeurIPS 2020.
    """
    _check_chunk(chunk)
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ConfigError("tracin needs at least one checkpoint")
    if weights is None:
        weights = [1.0] * len(checkpoints)
    weights = [float(w) for w in weights]
    if len(weights) != len(checkpoints):
        raise ConfigError(f"{len(weights)} weights for {len(checkpoints)} checkpoints; give one "
                          f"weight (learning rate) per checkpoint")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite, got {weights}")
    train, n = _as_examples(train, "training")
    queries, q = _as_examples(queries, "query")
    fn = _flat_grad_fn(loss_fn)
    scores = np.zeros((q, n), dtype=np.float64)
    for params, w in zip(checkpoints, weights):
        g_qp = _stack(fn, params, queries, q, chunk, "query")
        for start, g_cp in _iter_chunks(fn, params, train, n, chunk, "training"):
            scores[:, start:start + g_cp.shape[0]] += w * np.asarray(_cross(g_qp, g_cp))
    return scores.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Damped inverses (float64, Cholesky)
# ---------------------------------------------------------------------------------------------
def _resolve_damping(damping: float | None, default: float, what: str) -> float:
    if damping is None:
        if not default > 0:
            raise ConfigError(f"the default damping for {what} is {default} because every "
                              f"training gradient is zero; check the loss, or pass damping > 0")
        return float(default)
    lam = float(damping)
    if not (math.isfinite(lam) and lam >= 0):
        raise ConfigError(f"damping must be a finite number >= 0, got {damping!r}")
    return lam


def _cholesky(a: np.ndarray, lam: float) -> tuple:
    try:
        return scipy.linalg.cho_factor(a, lower=True, check_finite=False)
    except np.linalg.LinAlgError as e:
        raise ConfigError(f"the damped Gram matrix is not positive definite (damping {lam:g}); "
                          f"pass a larger damping") from e


def _solve_dual(cross_qn: np.ndarray, gram_nn: np.ndarray, lam: float) -> np.ndarray:
    """``cross (gram + lam I)^{-1}`` for a symmetric PSD ``gram``, float64."""
    a = gram_nn + lam * np.eye(gram_nn.shape[0])
    return scipy.linalg.cho_solve(_cholesky(a, lam), cross_qn.T, check_finite=False).T


def _feature_scores(phi_qk: np.ndarray, phi_nk: np.ndarray, damping: float | None,
                    what: str, fraction: float = _DEFAULT_DAMPING_FRACTION) -> np.ndarray:
    """``Phi_q (Phi^T Phi + lam I)^{-1} Phi^T`` in float64, by the smaller of the two forms."""
    n, k = phi_nk.shape
    trace = float(np.einsum("nk,nk->", phi_nk, phi_nk))
    lam = _resolve_damping(damping, fraction * trace / k, what)
    logger.info("%s: n=%d, feature dim k=%d, damping=%.4g", what, n, k, lam)
    if n <= k:  # dual form: n x n Gram, cost n^2 k
        return _solve_dual(phi_qk @ phi_nk.T, phi_nk @ phi_nk.T, lam)
    a = phi_nk.T @ phi_nk + lam * np.eye(k)  # primal: k x k, cost n k^2
    x_kq = scipy.linalg.cho_solve(_cholesky(a, lam), phi_qk.T, check_finite=False)
    return x_kq.T @ phi_nk.T


# ---------------------------------------------------------------------------------------------
# Influence functions with the exact empirical Fisher
# ---------------------------------------------------------------------------------------------
def influence(loss_fn: LossFn, params: Any, train: Any, queries: Any, *,
              damping: float | None = None, damping_fraction: float = _DEFAULT_DAMPING_FRACTION,
              chunk: int = 32, memory_budget: int = 4 * 2**30) -> np.ndarray:
    r"""Influence functions with the exact damped empirical Fisher, float32 ``[Q, n]``.

    .. math::

        s_{qi} = g_q^T F^{-1} g_i, \qquad F = G^T G / n + \lambda I,

    with ``G [n, P]`` the training gradients, in the *full* parameter space. Woodbury,
    ``F^{-1} = (1/lambda) (I - G^T (n lambda I + G G^T)^{-1} G)``, simplifies (push-through,
    ``F^{-1} G^T = n G^T (G G^T + n lambda I)^{-1}``) to

    .. math::

        S = n \, G_q G^T (G G^T + n \lambda I)^{-1},

    which needs only the ``n x n`` Gram and the ``Q x n`` cross Gram (float32 products at highest
    precision, then a float64 Cholesky solve) and has no cancellation. ``damping=None`` sets
    ``lambda = 0.1 * trace(G^T G / n) / P`` (10% of the Fisher's mean eigenvalue). Meant for
    models whose ``(n + Q) x P`` gradients fit in memory (e.g. an MLP on digits: n=1000, P~26k);
    beyond ``memory_budget`` bytes it raises, pointing to :func:`trak` / :func:`logra`.
    Reference: Koh & Liang, "Understanding Black-box Predictions via Influence Functions", 2017.
    """
    _check_chunk(chunk)
    train, n = _as_examples(train, "training")
    queries, q = _as_examples(queries, "query")
    p = _num_params(params)
    need = (n + q) * p * 4
    if need > memory_budget:
        raise MemoryError(
            f"influence holds every per-example gradient: (n={n} + Q={q}) x P={p} x 4 bytes = "
            f"{need / 2**30:.2f} GiB > memory_budget {memory_budget / 2**30:.2f} GiB; use "
            f"trak(...) or logra(...) (projected gradients) for this model, or raise memory_budget")
    fn = _flat_grad_fn(loss_fn)
    g_np = _stack(fn, params, train, n, chunk, "training")
    g_qp = _stack(fn, params, queries, q, chunk, "query")
    gram = np.asarray(_cross(g_np, g_np), dtype=np.float64)
    gram = (gram + gram.T) / 2  # exact symmetry for Cholesky
    cross = np.asarray(_cross(g_qp, g_np), dtype=np.float64)
    del g_np, g_qp
    lam = _resolve_damping(damping, damping_fraction * np.trace(gram) / (n * p), "influence")
    logger.info("influence: n=%d, P=%d, damping=%.4g", n, p, lam)
    return (n * _solve_dual(cross, gram, n * lam)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Random projections
# ---------------------------------------------------------------------------------------------
ProjectionKind = Literal["auto", "gaussian", "sjlt"]


@dataclasses.dataclass(frozen=True, eq=False)
class Projector:
    r"""A random linear map ``R: R^P -> R^k`` applied to rows, ``[c, P] -> [c, k]``.

    ``E[R R^T] = I``, so dot products are preserved in expectation; deterministic from its key,
    and row-wise (a chunk gives the same rows as the whole). Build with :func:`make_projector`.

    * ``"gaussian"``: dense ``R_{jk} ~ N(0, 1/k)``; ``arrays = (R [P, k],)``.
    * ``"sjlt"``: sparse Johnson-Lindenstrauss transform (Kane & Nelson 2014), block
      construction: the ``k`` outputs are split into ``s`` near-equal blocks and coordinate ``j``
      is hashed to one bucket in each block (so to ``s`` distinct buckets) with a random sign,
      scaled by ``1/sqrt(s)``; ``arrays = (buckets int32 [s, P], signs int8 [s, P])``, O(P)
      memory, applied with ``segment_sum``. ``s = 1`` is the count sketch.
    """

    kind: str
    num_params: int
    dim: int
    arrays: tuple

    def __call__(self, g_cp: jax.Array) -> jax.Array:
        g_cp = jnp.asarray(g_cp)
        if g_cp.ndim != 2 or g_cp.shape[1] != self.num_params:
            raise ConfigError(f"projector expects [c, {self.num_params}] rows, got {g_cp.shape}")
        return _project_jit(self.kind, self.dim, self.arrays, g_cp)


def _project(kind: str, dim: int, arrays: tuple, g_cp: jax.Array) -> jax.Array:
    g_cp = g_cp.astype(jnp.float32)
    if kind == "gaussian":
        (r_pk,) = arrays
        return jnp.matmul(g_cp, r_pk, precision=_HIGHEST)
    buckets_sp, signs_sp = arrays
    s = buckets_sp.shape[0]
    out_kc = jnp.zeros((dim, g_cp.shape[0]), jnp.float32)
    for r in range(s):  # s is small and static: s passes of O(P c) keep memory at one chunk
        signed_pc = g_cp.T * signs_sp[r].astype(jnp.float32)[:, None]
        out_kc = out_kc + jax.ops.segment_sum(signed_pc, buckets_sp[r], num_segments=dim)
    return out_kc.T / math.sqrt(s)


_project_jit = jax.jit(_project, static_argnums=(0, 1))


def make_projector(num_params: int, dim: int, *, key: jax.Array, kind: ProjectionKind = "auto",
                   memory_budget: int = 512 * 2**20, s: int = 4) -> Projector:
    """A :class:`Projector` from ``P = num_params`` to ``k = dim`` dimensions.

    ``kind="auto"`` picks ``"gaussian"`` when the dense matrix (``P * k * 4`` bytes) fits in
    ``memory_budget`` and ``"sjlt"`` (with ``s`` nonzeros per column, capped at ``k``) otherwise.
    """
    if not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ConfigError(f"projection dimension must be a positive integer, got {dim!r}")
    if num_params < 1:
        raise ConfigError(f"num_params must be positive, got {num_params}")
    if kind == "auto":
        kind = "gaussian" if num_params * dim * 4 <= memory_budget else "sjlt"
    if kind == "gaussian":
        r_pk = jax.random.normal(key, (num_params, dim), jnp.float32) / math.sqrt(dim)
        return Projector("gaussian", int(num_params), int(dim), (r_pk,))
    if kind == "sjlt":
        if s < 1:
            raise ConfigError(f"sjlt needs s >= 1 nonzeros per column, got {s}")
        s = min(s, dim)
        edges = np.linspace(0, dim, s + 1).round().astype(np.int64)
        kb, ks = jax.random.split(key)
        buckets = jnp.stack([
            edges[r] + jax.random.randint(jax.random.fold_in(kb, r), (num_params,), 0,
                                          int(edges[r + 1] - edges[r]), dtype=jnp.int32)
            for r in range(s)]).astype(jnp.int32)
        signs = jnp.where(jax.random.bernoulli(ks, 0.5, (s, num_params)), 1, -1).astype(jnp.int8)
        return Projector("sjlt", int(num_params), int(dim), (buckets, signs))
    raise ConfigError(f'projection kind must be "auto", "gaussian" or "sjlt", got {kind!r}')


# ---------------------------------------------------------------------------------------------
# TRAK
# ---------------------------------------------------------------------------------------------
def _collect(fn: Callable, params: Any, examples: Any, n: int, chunk: int,
             what: str) -> np.ndarray:
    """Stack feature chunks on the host, float64 (the solve's precision)."""
    return np.concatenate([np.asarray(f, dtype=np.float64)
                           for _, f in _iter_chunks(fn, params, examples, n, chunk, what)])


def trak(loss_fn: LossFn, params: Any, train: Any, queries: Any, *, proj_dim: int = 2048,
         damping: float | None = None, damping_fraction: float = _DEFAULT_DAMPING_FRACTION,
         key: jax.Array | None, chunk: int = 32,
         projection: ProjectionKind | Projector = "auto") -> np.ndarray:
    r"""TRAK-style scores from randomly projected loss gradients, float32 ``[Q, n]``.

    .. math::

        \phi = R^T g, \qquad s_{qi} = \phi_q^T (\Phi^T \Phi + \lambda I)^{-1} \phi_i,

    with ``Phi [n, k]`` the training features and ``R`` a :class:`Projector` (``"auto"``:
    dense Gaussian when ``P x proj_dim`` float32 fits in 512 MiB, else SJLT). ``damping=None``
    sets ``lambda = 0.1 * trace(Phi^T Phi) / k``, 10% of the mean eigenvalue of the projected
    Gram, the projected analogue of :func:`influence`'s rule; as ``k / P -> inf``,
    ``trak(damping=lam) -> influence(damping=lam / n) / n``. This is the single-model TRAK
    kernel on loss gradients (no ensembling, no output-probability reweighting). ``projection``
    may be a ready :class:`Projector` (then ``proj_dim`` and ``key`` are unused). Reference: Park
    et al., "TRAK: Attributing Model Behavior at Scale", ICML 2023.
    """
    _check_chunk(chunk)
    train, n = _as_examples(train, "training")
    queries, q = _as_examples(queries, "query")
    p = _num_params(params)
    if isinstance(projection, Projector):
        proj = projection
        if proj.num_params != p:
            raise ConfigError(f"projector maps {proj.num_params} parameters but the model has {p}")
    else:
        if not isinstance(proj_dim, (int, np.integer)) or proj_dim < 1:
            raise ConfigError(f"proj_dim must be a positive integer, got {proj_dim!r}")
        if key is None:
            raise ConfigError("trak needs a PRNG key for its projection, e.g. jax.random.key(0)")
        proj = make_projector(p, int(proj_dim), key=key, kind=projection)
    logger.info("trak: P=%d -> k=%d by %s projection", p, proj.dim, proj.kind)

    @jax.jit
    def fn(params, batch, arrays):
        g = _vmap_grads(loss_fn, params, batch)
        return _project(proj.kind, proj.dim, arrays, _flatten_rows(g)), _finite_rows(g)

    def feat(params, batch):
        return fn(params, batch, proj.arrays)

    phi_nk = _collect(feat, params, train, n, chunk, "training")
    phi_qk = _collect(feat, params, queries, q, chunk, "query")
    return _feature_scores(phi_qk, phi_nk, damping, "trak", damping_fraction).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# LoGra
# ---------------------------------------------------------------------------------------------
def _in_out(shape: tuple[int, ...]) -> tuple[int, int]:
    return int(np.prod(shape[:-1], dtype=np.int64)), int(shape[-1])


def logra_projections(params: Any, *, rank: int = 16,
                      key: jax.Array) -> list[tuple[jax.Array, jax.Array] | None]:
    """Per-leaf LoGra projections, aligned with ``jax.tree.leaves(params)``.

    For a leaf with ``ndim >= 2`` (``in`` = product of all axes but the last, ``out`` = the last)
    a pair ``(P_in [in, r_in], P_out [out, r_out])`` with ``r = min(rank, dim)`` and entries
    ``N(0, 1/r)``, so ``E[(P_in kron P_out)(P_in kron P_out)^T] = I``; ``None`` for other leaves.
    Leaf ``l`` draws from ``fold_in(key, l)``.
    """
    if not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    mats: list[tuple[jax.Array, jax.Array] | None] = []
    for l, leaf in enumerate(jax.tree.leaves(params)):
        if np.ndim(leaf) < 2:
            mats.append(None)
            continue
        d_in, d_out = _in_out(np.shape(leaf))
        r_in, r_out = min(rank, d_in), min(rank, d_out)
        k_in, k_out = jax.random.split(jax.random.fold_in(key, l))
        mats.append((jax.random.normal(k_in, (d_in, r_in), jnp.float32) / math.sqrt(r_in),
                     jax.random.normal(k_out, (d_out, r_out), jnp.float32) / math.sqrt(r_out)))
    return mats


def logra(loss_fn: LossFn, params: Any, train: Any, queries: Any, *, rank: int = 16,
          damping: float | None = None, damping_fraction: float = _DEFAULT_DAMPING_FRACTION,
         key: jax.Array | None, chunk: int = 32,
          include_1d: bool = False,
          projections: Sequence[tuple[Any, Any] | None] | None = None) -> np.ndarray:
    r"""LoGra-style scores from Kronecker-projected per-layer gradients, float32 ``[Q, n]``.

    Each parameter leaf ``W`` with ``ndim >= 2`` is viewed as a matrix ``[in, out]`` (last axis
    = out). Its per-example gradient ``G_i [in, out]`` is projected to

    .. math::

        P_{in}^T G_i P_{out} \in R^{r_{in} \times r_{out}}
        = (P_{in} \otimes P_{out})^T \mathrm{vec}(G_i),

    with ``r = min(rank, dim)`` per side (:func:`logra_projections`; pass ``projections`` to use
    your own matrices, e.g. identities, and ``key`` is then unused). The features of all such
    leaves (and, with ``include_1d``, the raw gradients of biases, norm scales and scalars) are
    concatenated and scored with the same damped projected-Gram inverse as :func:`trak`
    (``damping=None``: ``0.1 * trace(Phi^T Phi) / k``).

    This version materialises each chunk's per-example gradients and projects them (memory
    ``chunk x P``); LoGra's activation-times-output-gradient form, which projects the layer input
    and output gradient *before* forming their outer product and so never materialises ``G_i``,
    is a future optimisation. Reference: Choe et al., "What is Your Data Worth to GPT?
    LLM-Scale Data Valuation with Influence Functions", 2024.
    """
    _check_chunk(chunk)
    train, n = _as_examples(train, "training")
    queries, q = _as_examples(queries, "query")
    leaves = jax.tree.leaves(params)
    if projections is None:
        if key is None:
            raise ConfigError("logra needs a PRNG key for its projections, e.g. jax.random.key(0)")
        mats = logra_projections(params, rank=rank, key=key)
    else:
        mats = list(projections)
        if len(mats) != len(leaves):
            raise ConfigError(f"{len(mats)} projections for {len(leaves)} parameter leaves")
        for l, (leaf, m) in enumerate(zip(leaves, mats)):
            if (np.ndim(leaf) >= 2) != (m is not None):
                raise ConfigError(f"leaf {l} (shape {np.shape(leaf)}): give a (P_in, P_out) pair "
                                  f"exactly for leaves with ndim >= 2, None otherwise")
            if m is not None:
                d_in, d_out = _in_out(np.shape(leaf))
                if np.shape(m[0])[0] != d_in or np.shape(m[1])[0] != d_out:
                    raise ConfigError(f"leaf {l} is [{d_in}, {d_out}] but its projections are "
                                      f"{np.shape(m[0])} and {np.shape(m[1])}")
        mats = [None if m is None else (jnp.asarray(m[0], jnp.float32),
                                        jnp.asarray(m[1], jnp.float32)) for m in mats]
    if not any(m is not None for m in mats) and not include_1d:
        raise ConfigError("logra found no parameter with ndim >= 2; pass include_1d=True")

    @jax.jit
    def fn(params, batch, mats):
        g = _vmap_grads(loss_fn, params, batch)
        feats = []
        for g_l, m in zip(jax.tree.leaves(g), mats):
            c = g_l.shape[0]
            g_l = g_l.astype(jnp.float32)
            if m is not None:
                d_in, d_out = _in_out(g_l.shape[1:])
                f = jnp.einsum("cio,ir,os->crs", g_l.reshape(c, d_in, d_out), m[0], m[1],
                               precision=_HIGHEST)
                feats.append(f.reshape(c, -1))
            elif include_1d:
                feats.append(g_l.reshape(c, -1))
        return jnp.concatenate(feats, axis=1), _finite_rows(g)

    def feat(params, batch):
        return fn(params, batch, mats)

    phi_nk = _collect(feat, params, train, n, chunk, "training")
    phi_qk = _collect(feat, params, queries, q, chunk, "query")
    return _feature_scores(phi_qk, phi_nk, damping, "logra", damping_fraction).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# stride-jax's CausalLM
# ---------------------------------------------------------------------------------------------
def causal_lm_loss(model: nnx.Module) -> tuple[Any, LossFn]:
    r"""``(params, loss_fn)`` for a :class:`stride_jax.model.CausalLM` (any ``nnx`` LM with the
    same call signature).

    ``params`` is the ``nnx.Param`` state (gradients are taken with respect to it; any other state
    is closed over). ``example = {"input_ids": [T], "attention_mask": [T], "loss_mask": [T]}``
    (optionally ``"targets": [T]``), e.g. from :func:`rows_as_examples`. The loss is the mean
    next-token cross-entropy over the scored positions,

    .. math::

        \ell = \frac{\sum_t m_t \, (-\log p(y_t \mid x_{\le t}))}{\max(\sum_t m_t, 1)},

    with ``y_t = input_ids[t + 1]`` (the last position never counts), or ``y_t = targets[t]``
    when the example has targets; without targets this is
    :func:`stride_jax.model.loss.mean_token_loss` on a batch of one.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p, example):
        m = nnx.merge(graphdef, p, rest)
        ids = example["input_ids"][None]
        logits = m(ids, example["attention_mask"][None])
        if "targets" in example:
            logp = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
            nll = -jnp.take_along_axis(logp, example["targets"][:, None], axis=-1)[:, 0]
            w = example["loss_mask"].astype(jnp.float32)
            return (nll * w).sum() / jnp.maximum(w.sum(), 1.0)
        return mean_token_loss(logits, ids, example["loss_mask"][None])

    return params, loss_fn


def rows_as_examples(tokenized_set: Any) -> dict[str, np.ndarray]:
    """A :class:`stride_jax.data.TokenizedSet` as an example pytree for :func:`causal_lm_loss`:
    ``{"input_ids", "attention_mask", "loss_mask"}`` int32 ``[n, L]``, plus ``"targets"`` when the
    set has them (``targets[i, t]`` = the id predicted at position ``t``)."""
    ex = {name: np.asarray(getattr(tokenized_set, name), dtype=np.int32)
          for name in ("input_ids", "attention_mask", "loss_mask")}
    targets = getattr(tokenized_set, "targets", None)
    if targets is not None:
        targets = np.asarray(targets, dtype=np.int32)
        if targets.shape != ex["input_ids"].shape:
            raise ConfigError(f"targets have shape {targets.shape}; expected {ex['input_ids'].shape}"
                              f" like input_ids")
        ex["targets"] = targets
    return ex
