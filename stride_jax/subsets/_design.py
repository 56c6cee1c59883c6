"""The membership matrix M in {0,1}^(K x n) and the random designs that make it.

M[k, i] = 1 when training example i belongs to subset k. It is stored as its nonzeros only,
``rows`` (subset id) and ``cols`` (example id) sorted by (row, col), plus the CSR pointer
``indptr`` over subsets, so a design with n = 10^6 examples and d = 10 subsets per example costs
10^7 pairs (80 MB), never the 4 GB of a dense matrix.

Two designs:

* :func:`expander_design` (STRIDE, arXiv 2606.05165, section 3.1): every example lies in exactly
  ``d`` distinct subsets drawn uniformly out of K. M is then the adjacency matrix of a random
  left-d-regular bipartite graph, an expander with high probability, and l1 recovery of a
  k-sparse influence vector needs only K = O(k log(n/k)) measurements (Berinde, Gilbert, Indyk,
  Karloff and Strauss, "Combining geometry and combinatorics: a unified approach to sparse
  signal recovery", 2008).
* :func:`bernoulli_design` (datamodels, Ilyas et al. 2022): subset k holds each example
  independently with probability alpha.

Randomness is per example (expander: ``fold_in(key, i)``) or per subset (Bernoulli:
``fold_in(key, k)``), so the design does not depend on how the work was chunked.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax.errors import ConfigError, DataError
from stride_jax.io.atomic import atomic_path

__all__ = [
    "DENSE_LIMIT",
    "Design",
    "bernoulli_design",
    "default_num_subsets",
    "expander_design",
]

DENSE_LIMIT = 100_000_000
"""Largest number of entries (K * n, or rows * n for masks) materialised densely on the host."""

_FORMAT = "stride_jax.subsets.Design/v1"

# The paper's K; larger K buys measurements but shrinks subsets (n * d / K examples each).
_PAPER_NUM_SUBSETS = 1000
# The prototype (DESIGN.md 1b) saw attribution degrade when subsets held fewer than ~30 examples:
# an operator fitted on too few examples mostly memorises them.
_MIN_MEAN_SUBSET_SIZE = 32


def _as_index(a: np.ndarray | Sequence[int], name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ConfigError(f"Design.{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"Design.{name} must hold integers, got dtype {arr.dtype}")
    return arr


@dataclasses.dataclass(frozen=True, eq=False)
class Design:
    """Sparse membership matrix M in {0,1}^(K x n) of K subsets over n training examples.

    ``rows[j]``, ``cols[j]`` (int32, sorted by (row, col), no duplicates) are the subset and the
    example of the j-th nonzero; ``indptr`` (int64, length K + 1) is the CSR pointer, so subset k's
    members are ``cols[indptr[k]:indptr[k+1]]``. Construct with :meth:`from_pairs` (sorts and
    checks) or a generator; the constructor itself validates everything in O(nnz).

    Equality is identity (arrays do not compare as booleans); compare :meth:`fingerprint`.
    """

    num_subsets: int
    num_examples: int
    rows: np.ndarray
    cols: np.ndarray
    indptr: np.ndarray

    def __post_init__(self) -> None:
        K, n = int(self.num_subsets), int(self.num_examples)
        if K < 1:
            raise ConfigError(f"a design needs at least one subset, got num_subsets={K}")
        if n < 1:
            raise ConfigError(f"a design needs at least one example, got num_examples={n}")
        if K > np.iinfo(np.int32).max or n > np.iinfo(np.int32).max:
            raise ConfigError(f"num_subsets={K} and num_examples={n} must fit in int32")
        rows = _as_index(self.rows, "rows")
        cols = _as_index(self.cols, "cols")
        indptr = _as_index(self.indptr, "indptr")
        if rows.shape != cols.shape:
            raise ConfigError(f"Design.rows and .cols differ in length: {rows.size} vs {cols.size}")
        nnz = rows.size
        if indptr.shape != (K + 1,):
            raise ConfigError(f"Design.indptr must have K + 1 = {K + 1} entries, got {indptr.size}")
        if nnz:
            if rows.min() < 0 or rows.max() >= K:
                raise ConfigError(f"Design.rows must lie in [0, {K}); found {rows.min()}..{rows.max()}")
            if cols.min() < 0 or cols.max() >= n:
                raise ConfigError(f"Design.cols must lie in [0, {n}); found {cols.min()}..{cols.max()}")
            # Sorted by (row, col) with no duplicate pair <=> the linear key strictly increases.
            key = rows.astype(np.int64) * n + cols.astype(np.int64)
            if np.any(np.diff(key) <= 0):
                raise ConfigError(
                    "Design.rows/cols must be sorted by (row, col) without duplicate pairs; "
                    "build the design with Design.from_pairs(...), which sorts and checks"
                )
        expected = np.zeros(K + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=K), out=expected[1:])
        if not np.array_equal(indptr, expected):
            raise ConfigError("Design.indptr does not match Design.rows (it must be their CSR pointer)")
        for name, arr, dtype in (("rows", rows, np.int32), ("cols", cols, np.int32),
                                 ("indptr", indptr, np.int64)):
            # A read-only view: caches (slots, device copies, fingerprint) rely on the arrays
            # not changing, and the caller's own array keeps its flags.
            arr = np.ascontiguousarray(arr, dtype=dtype).view()
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "num_subsets", K)
        object.__setattr__(self, "num_examples", n)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_pairs(
        cls,
        rows: np.ndarray | Sequence[int],
        cols: np.ndarray | Sequence[int],
        *,
        num_subsets: int,
        num_examples: int,
    ) -> Design:
        """Design from (subset, example) pairs in any order; refuses duplicate pairs."""
        r = np.asarray(rows, dtype=np.int64).ravel()
        c = np.asarray(cols, dtype=np.int64).ravel()
        if r.shape != c.shape:
            raise ConfigError(f"rows and cols differ in length: {r.size} vs {c.size}")
        if r.size and (r.min() < 0 or r.max() >= num_subsets):
            raise ConfigError(f"subset ids must lie in [0, {num_subsets}); found {r.min()}..{r.max()}")
        if c.size and (c.min() < 0 or c.max() >= num_examples):
            raise ConfigError(f"example ids must lie in [0, {num_examples}); found {c.min()}..{c.max()}")
        order = np.lexsort((c, r))
        r, c = r[order], c[order]
        if r.size > 1:
            dup = (np.diff(r) == 0) & (np.diff(c) == 0)
            if dup.any():
                j = int(np.argmax(dup))
                raise ConfigError(f"duplicate pair: example {c[j]} is listed twice in subset {r[j]}")
        indptr = np.zeros(num_subsets + 1, np.int64)
        np.cumsum(np.bincount(r, minlength=num_subsets), out=indptr[1:])
        return cls(num_subsets, num_examples, r.astype(np.int32), c.astype(np.int32), indptr)

    @classmethod
    def from_dense(cls, mask_kn: np.ndarray) -> Design:
        """Design from a dense 0/1 (or boolean) K x n matrix (tests and small problems)."""
        m = np.asarray(mask_kn)
        if m.ndim != 2:
            raise ConfigError(f"from_dense needs a 2-D K x n matrix, got shape {m.shape}")
        if not np.all((m == 0) | (m == 1)):
            raise ConfigError("from_dense needs a 0/1 matrix")
        r, c = np.nonzero(m)  # row-major order: already sorted by (row, col)
        return cls.from_pairs(r, c, num_subsets=m.shape[0], num_examples=m.shape[1])

    # ---------------------------------------------------------------- structure

    @property
    def nnz(self) -> int:
        """Number of (subset, example) memberships."""
        return int(self.rows.size)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_subsets, self.num_examples)

    @functools.cached_property
    def subset_sizes(self) -> np.ndarray:
        """int64[K]: number of examples in each subset (row sums of M)."""
        return np.diff(self.indptr)

    @functools.cached_property
    def example_counts(self) -> np.ndarray:
        """int64[n]: number of subsets each example belongs to (column sums of M)."""
        return np.bincount(self.cols, minlength=self.num_examples).astype(np.int64)

    def members(self, k: int) -> np.ndarray:
        """int32[size_k]: sorted example ids of subset ``k``."""
        k = int(k)
        if not 0 <= k < self.num_subsets:
            raise IndexError(f"subset {k} out of range [0, {self.num_subsets})")
        return self.cols[self.indptr[k]:self.indptr[k + 1]]

    @functools.cached_property
    def _by_example(self) -> tuple[np.ndarray, np.ndarray]:
        # CSC view: subset ids grouped by example (stable, so ascending within an example).
        order = np.argsort(self.cols, kind="stable")
        ptr = np.zeros(self.num_examples + 1, np.int64)
        np.cumsum(self.example_counts, out=ptr[1:])
        return self.rows[order], ptr

    def subsets_of(self, i: int) -> np.ndarray:
        """int32[count_i]: sorted ids of the subsets that contain example ``i``."""
        i = int(i)
        if not 0 <= i < self.num_examples:
            raise IndexError(f"example {i} out of range [0, {self.num_examples})")
        rows, ptr = self._by_example
        return rows[ptr[i]:ptr[i + 1]]

    def example_slots(self) -> np.ndarray:
        """int32[c_max, n]: column-wise padded ("ELL") layout of M.

        ``slots[s, i]`` is the s-th subset containing example i, or K where example i belongs
        to fewer than ``s + 1`` subsets; c_max is the largest example count (exactly d for an
        expander design, so no padding). The solvers compute M w and M^T u from it with c_max
        dense gathers / scatters of contiguous rows, several times faster than a segment sum
        over the nnz pairs.
        """
        cache = self.__dict__.get("_slots")
        if cache is None:
            rows, ptr = self._by_example
            counts = self.example_counts
            c_max = int(counts.max()) if counts.size else 0
            cache = np.full((max(c_max, 1), self.num_examples), self.num_subsets, np.int32)
            within = np.arange(rows.size, dtype=np.int64) - np.repeat(ptr[:-1], counts)
            example = np.repeat(np.arange(self.num_examples), counts)
            cache[within, example] = rows
            cache.setflags(write=False)
            self.__dict__["_slots"] = cache
        return cache

    def take_subsets(self, ks: np.ndarray | Sequence[int]) -> Design:
        """Design made of subsets ``ks`` (in that order, renumbered 0..len(ks)-1), same examples."""
        ks = np.asarray(ks, dtype=np.int64).ravel()
        if ks.size == 0:
            raise ConfigError("take_subsets needs at least one subset id")
        if ks.min() < 0 or ks.max() >= self.num_subsets:
            raise IndexError(f"subset ids must lie in [0, {self.num_subsets})")
        sizes = self.subset_sizes[ks]
        starts = self.indptr[ks]
        offsets = np.zeros(ks.size + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        src = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1] - starts, sizes)
        rows = np.repeat(np.arange(ks.size, dtype=np.int32), sizes)
        return Design(int(ks.size), self.num_examples, rows, self.cols[src], offsets)

    # ---------------------------------------------------------------- products

    def matvec(self, w: np.ndarray) -> np.ndarray:
        """(M w) for ``w`` of shape [..., n]: returns [..., K] (numpy, exact segment sums)."""
        w = np.asarray(w)
        if w.shape[-1:] != (self.num_examples,):
            raise ConfigError(f"matvec needs [..., n={self.num_examples}], got shape {w.shape}")
        out_shape = w.shape[:-1] + (self.num_subsets,)
        if self.nnz == 0:
            return np.zeros(out_shape, dtype=np.result_type(w.dtype, np.int64))
        gathered = w[..., self.cols]
        # reduceat misreads empty segments (it returns the next element), so zero them after.
        starts = np.minimum(self.indptr[:-1], self.nnz - 1)
        out = np.add.reduceat(gathered, starts, axis=-1)
        out[..., self.subset_sizes == 0] = 0
        return out

    def rmatvec(self, u: np.ndarray) -> np.ndarray:
        """(M^T u) for ``u`` of shape [..., K]: returns [..., n] (numpy)."""
        u = np.asarray(u)
        if u.shape[-1:] != (self.num_subsets,):
            raise ConfigError(f"rmatvec needs [..., K={self.num_subsets}], got shape {u.shape}")
        flat = u.reshape(-1, self.num_subsets)
        dtype = u.dtype if np.issubdtype(u.dtype, np.floating) else np.float64
        out = np.empty((flat.shape[0], self.num_examples), dtype=dtype)
        for b in range(flat.shape[0]):
            out[b] = np.bincount(self.cols, weights=flat[b, self.rows], minlength=self.num_examples)
        return out.reshape(u.shape[:-1] + (self.num_examples,))

    def to_dense(self, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Dense K x n matrix; refused above :data:`DENSE_LIMIT` entries (keep it sparse)."""
        size = self.num_subsets * self.num_examples
        if size > DENSE_LIMIT:
            raise ConfigError(
                f"to_dense: K x n = {self.num_subsets} x {self.num_examples} = {size:.3g} entries "
                f"exceeds the limit {DENSE_LIMIT:.0e}; use matvec/rmatvec or the sparse arrays"
            )
        out = np.zeros((self.num_subsets, self.num_examples), dtype=dtype)
        out[self.rows, self.cols] = 1
        return out

    def mask_rows(self, ks: np.ndarray | Sequence[int]) -> np.ndarray:
        """bool[len(ks), n]: membership masks of subsets ``ks`` (for small n)."""
        ks = np.asarray(ks, dtype=np.int64).ravel()
        size = ks.size * self.num_examples
        if size > DENSE_LIMIT:
            raise ConfigError(
                f"mask_rows: {ks.size} x n={self.num_examples} = {size:.3g} entries exceeds the "
                f"limit {DENSE_LIMIT:.0e}; use members(k) instead"
            )
        out = np.zeros((ks.size, self.num_examples), dtype=bool)
        for j, k in enumerate(ks):
            out[j, self.members(int(k))] = True
        return out

    # ---------------------------------------------------------------- JAX view

    def device_arrays(self) -> tuple[jax.Array, jax.Array]:
        """(rows, cols) as int32 JAX arrays, for use inside ``jit`` with K and n static.

        E.g. ``M w = jax.ops.segment_sum(w[cols], rows, K, indices_are_sorted=True)``.
        Cached: repeated calls return the same device buffers.
        """
        cache = self.__dict__.get("_device")
        if cache is None:
            cache = (jnp.asarray(self.rows), jnp.asarray(self.cols))
            self.__dict__["_device"] = cache
        return cache

    # ---------------------------------------------------------------- identity and storage

    def fingerprint(self) -> str:
        """SHA-256 hex digest of (K, n, rows, cols): equal designs, equal fingerprints."""
        cache = self.__dict__.get("_fingerprint")
        if cache is None:
            h = hashlib.sha256()
            h.update(f"{_FORMAT}:{self.num_subsets}:{self.num_examples}:{self.nnz}".encode())
            h.update(self.rows.astype("<i4", copy=False).tobytes())
            h.update(self.cols.astype("<i4", copy=False).tobytes())
            cache = h.hexdigest()
            self.__dict__["_fingerprint"] = cache
        return cache

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the design to ``path`` as an uncompressed .npz (no pickle), atomically."""
        buf = io.BytesIO()
        np.savez(
            buf,
            format=np.array(_FORMAT),
            shape=np.array([self.num_subsets, self.num_examples], np.int64),
            rows=self.rows,
            cols=self.cols,
        )
        # atomic_path's temporary name lacks ".npz", which np.savez would append to a path.
        with atomic_path(path) as tmp:
            tmp.write_bytes(buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Design:
        """Read a design written by :meth:`save` (validated; pickles refused)."""
        with np.load(path, allow_pickle=False) as data:
            missing = {"format", "shape", "rows", "cols"} - set(data.files)
            if missing:
                raise DataError(f"{path}: not a saved Design (missing {sorted(missing)})")
            fmt = str(data["format"])
            if fmt != _FORMAT:
                raise DataError(f"{path}: unknown design format {fmt!r} (expected {_FORMAT!r})")
            K, n = (int(v) for v in data["shape"])
            rows, cols = data["rows"], data["cols"]
        indptr = np.zeros(K + 1, np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= K):
            raise DataError(f"{path}: subset ids out of range [0, {K})")
        np.cumsum(np.bincount(rows, minlength=K), out=indptr[1:])
        return cls(K, n, rows, cols, indptr)

    def __repr__(self) -> str:
        return (f"Design(num_subsets={self.num_subsets}, num_examples={self.num_examples}, "
                f"nnz={self.nnz})")


# -------------------------------------------------------------------- generators


def default_num_subsets(n: int, d: int = 10) -> int:
    """Number of subsets K for n examples each placed in d subsets.

    ``K = min(1000, max(2 d, n d // 32), n d)``, and at least d:

    * 1000 is the paper's K;
    * ``n d // 32`` keeps the mean subset size n d / K at >= 32 examples, because the prototype
      (DESIGN.md 1b) found operators trained on subsets of fewer than ~30 examples hurt LDS;
    * ``2 d`` keeps each example out of at least half of the subsets when n is tiny (with K = d
      every example would be in every subset and the intercept would absorb everything);
    * ``n d`` is the most subsets that can all be nonempty.
    """
    _check_positive("n", n, "the number of training examples")
    _check_positive("d", d, "the number of subsets per example")
    K = min(n * d, _PAPER_NUM_SUBSETS, max(2 * d, n * d // _MIN_MEAN_SUBSET_SIZE))
    return int(max(d, K))  # d > 1000 is degenerate (every example everywhere) but valid


def _check_positive(name: str, value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} ({what}) must be an integer, got {value!r}")
    if value < 1:
        raise ConfigError(f"{name} ({what}) must be >= 1, got {value}")


def _check_nonempty(design: Design, detail: str, fix: str) -> None:
    sizes = design.subset_sizes
    if (sizes == 0).any():
        k = int(np.argmin(sizes))
        raise ConfigError(
            f"subset {k} is empty ({int((sizes == 0).sum())} of {design.num_subsets} are): "
            f"{detail}; {fix}"
        )


@functools.partial(jax.jit, static_argnames=("num_subsets", "d"))
def _floyd_chunk(key: jax.Array, ids: jax.Array, *, num_subsets: int, d: int) -> jax.Array:
    """[chunk, d] sorted distinct subset ids, uniform over d-subsets, one key per example.

    Floyd's algorithm (Bentley and Floyd, "Programming pearls: a sample of brilliance", CACM
    1987): for j = K-d, ..., K-1 draw t uniform in [0, j]; keep t unless already chosen, then
    keep j. Every d-subset comes out with probability 1 / C(K, d), with only d random integers
    per example (top-d of K uniforms would need K).
    """
    K = num_subsets
    upper = jnp.arange(K - d + 1, K + 1, dtype=jnp.int32)  # exclusive bounds j + 1

    def one(i):
        return jax.random.randint(jax.random.fold_in(key, i), (d,), 0, upper, dtype=jnp.int32)

    draws = jax.vmap(one)(ids)  # [chunk, d]
    chosen = jnp.full(draws.shape, -1, jnp.int32)
    for t in range(d):
        cand = draws[:, t]
        taken = jnp.any(chosen == cand[:, None], axis=1)
        chosen = chosen.at[:, t].set(jnp.where(taken, K - d + t, cand))
    return jnp.sort(chosen, axis=1)


def fill_empty_subsets(design: Design) -> Design:
    """``design`` with every empty subset given one member, moved out of the largest subset.

    For a small n a random design leaves some subsets empty (probability ``(1 - d/K)^n`` each
    for the expander), and an operator trained on no example is meaningless. Moving a membership
    from the largest subset (ties: the lowest id; the member at position ``k mod size``) into
    empty subset ``k`` keeps every example's subset count (an expander stays d-regular) and
    leaves no subset empty, as long as there are at least K memberships. Deterministic; a design
    without empty subsets is returned unchanged.
    """
    sizes = design.subset_sizes.copy()
    empty = np.flatnonzero(sizes == 0)
    if empty.size == 0 or design.nnz < design.num_subsets:
        return design
    members = [list(design.members(k)) for k in range(design.num_subsets)]
    for k in empty:
        src = int(np.argmax(sizes))
        members[k] = [members[src].pop(int(k) % len(members[src]))]
        sizes[src] -= 1
        sizes[k] = 1
    rows = np.repeat(np.arange(design.num_subsets, dtype=np.int32), [len(m) for m in members])
    cols = np.concatenate([np.asarray(m, np.int32) for m in members])
    return Design.from_pairs(rows, cols, num_subsets=design.num_subsets,
                             num_examples=design.num_examples)


def expander_design(
    n: int, K: int, d: int = 10, *, key: jax.Array, chunk_size: int = 1 << 16,
    fill_empty: bool = False,
) -> Design:
    """Random left-d-regular design: each example in exactly ``d`` distinct subsets of ``K``.

    Example i's subsets are a uniform d-subset of range(K) drawn from ``fold_in(key, i)`` alone,
    so the design does not depend on ``chunk_size`` (the number of examples generated per device
    call; it only bounds memory). The expected subset size is n d / K. Raises ``ValueError`` for
    n < 1, K < 1, d outside [1, K], or when some subset comes out empty, unless ``fill_empty``
    (then :func:`fill_empty_subsets` fills them, which needs n d >= K).
    """
    _check_positive("n", n, "the number of training examples")
    _check_positive("K", K, "the number of subsets")
    _check_positive("d", d, "the number of subsets per example")
    if d > K:
        raise ConfigError(
            f"d={d} subsets per example cannot exceed K={K} subsets; lower d or raise K"
        )
    _check_positive("chunk_size", chunk_size, "examples generated per device call")
    n, K, d = int(n), int(K), int(d)
    chunk = min(int(chunk_size), n)
    rows_nd = np.empty((n, d), np.int32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        # Pad the last chunk to the full size so every call reuses one compiled program.
        ids = jnp.arange(start, start + chunk, dtype=jnp.uint32)
        rows_nd[start:stop] = np.asarray(_floyd_chunk(key, ids, num_subsets=K, d=d))[: stop - start]
    flat = rows_nd.reshape(-1)
    # Sort the pairs by subset; a stable sort keeps examples ascending within a subset. 16-bit
    # keys let numpy use its radix sort (10^7 keys in a fraction of a second).
    sort_keys = flat.astype(np.uint16) if K <= np.iinfo(np.uint16).max else flat
    order = np.argsort(sort_keys, kind="stable")
    rows = flat[order]
    cols = (order // d).astype(np.int32)
    indptr = np.zeros(K + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=K), out=indptr[1:])
    design = Design(K, n, rows, cols, indptr)
    if fill_empty:
        design = fill_empty_subsets(design)
    _check_nonempty(
        design,
        f"with n={n} and d={d}, K={K} gives n*d/K={n * d / K:.3g} examples per subset on average",
        "lower K or raise d",
    )
    return design


@functools.partial(jax.jit, static_argnames=("n", "alpha"))
def _bernoulli_chunk(key: jax.Array, ks: jax.Array, *, n: int, alpha: float) -> jax.Array:
    return jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(key, k), alpha, (n,)))(ks)


def bernoulli_design(
    n: int, K: int, alpha: float, *, key: jax.Array, max_chunk_entries: int = 1 << 24,
    fill_empty: bool = False,
) -> Design:
    """Datamodels design: subset k holds each example independently with probability ``alpha``.

    Subset k is drawn from ``fold_in(key, k)`` alone, so the result does not depend on
    ``max_chunk_entries`` (the most mask entries generated per device call). Costs K * n random
    draws. Expected subset size alpha n. Raises ``ValueError`` for n < 1, K < 1, alpha outside
    (0, 1), or when some subset comes out empty, unless ``fill_empty`` (then
    :func:`fill_empty_subsets` fills them when there are enough memberships).
    """
    _check_positive("n", n, "the number of training examples")
    _check_positive("K", K, "the number of subsets")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not (
        0.0 < float(alpha) < 1.0
    ):
        raise ConfigError(f"alpha (inclusion probability) must lie strictly between 0 and 1, got {alpha!r}")
    n, K, alpha = int(n), int(K), float(alpha)
    chunk = max(1, min(K, int(max_chunk_entries) // n))
    rows_parts, cols_parts = [], []
    for start in range(0, K, chunk):
        stop = min(start + chunk, K)
        ks = jnp.arange(start, start + chunk, dtype=jnp.uint32)
        mask = np.asarray(_bernoulli_chunk(key, ks, n=n, alpha=alpha))[: stop - start]
        r, c = np.nonzero(mask)  # row-major: sorted by (subset, example)
        rows_parts.append((r + start).astype(np.int32))
        cols_parts.append(c.astype(np.int32))
    rows = np.concatenate(rows_parts)
    cols = np.concatenate(cols_parts)
    indptr = np.zeros(K + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=K), out=indptr[1:])
    design = Design(K, n, rows, cols, indptr)
    if fill_empty:
        design = fill_empty_subsets(design)
    _check_nonempty(
        design,
        f"with n={n} and alpha={alpha}, subsets hold alpha*n={alpha * n:.3g} examples on average",
        "raise alpha or n",
    )
    return design
