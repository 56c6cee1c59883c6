"""Subset designs: structure, reproducibility, chunking invariance, products, storage, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stride_jax.subsets import (
    DENSE_LIMIT,
    Design,
    bernoulli_design,
    default_num_subsets,
    expander_design,
    fill_empty_subsets,
)


@pytest.fixture(scope="module")
def design() -> Design:
    return expander_design(500, 40, 6, key=jax.random.key(0))


def test_expander_exact_d_distinct_and_sorted(design):
    n, K, d = 500, 40, 6
    assert design.shape == (K, n) and design.nnz == n * d
    np.testing.assert_array_equal(design.example_counts, np.full(n, d))
    # sorted by (row, col) strictly => no duplicate pair => d distinct subsets per example
    key = design.rows.astype(np.int64) * n + design.cols
    assert np.all(np.diff(key) > 0)
    for i in (0, 17, 499):
        subs = design.subsets_of(i)
        assert subs.size == d and np.unique(subs).size == d
        for k in subs:
            assert i in design.members(int(k))
    assert design.subset_sizes.min() > 0
    assert design.subset_sizes.sum() == n * d
    np.testing.assert_array_equal(design.indptr, np.r_[0, np.cumsum(design.subset_sizes)])


def test_expander_reproducible_and_key_dependent(design):
    again = expander_design(500, 40, 6, key=jax.random.key(0))
    other = expander_design(500, 40, 6, key=jax.random.key(1))
    assert again.fingerprint() == design.fingerprint()
    np.testing.assert_array_equal(again.rows, design.rows)
    np.testing.assert_array_equal(again.cols, design.cols)
    assert other.fingerprint() != design.fingerprint()


def test_expander_chunking_invariance(design):
    for chunk in (1, 7, 64, 10_000):
        d2 = expander_design(500, 40, 6, key=jax.random.key(0), chunk_size=chunk)
        assert d2.fingerprint() == design.fingerprint(), chunk


def test_expander_prefix_stable():
    # Example i's subsets depend on fold_in(key, i) only: adding examples leaves earlier ones be.
    small = expander_design(50, 30, 3, key=jax.random.key(3))
    big = expander_design(80, 30, 3, key=jax.random.key(3))
    for i in range(50):
        np.testing.assert_array_equal(small.subsets_of(i), big.subsets_of(i))


def test_expander_is_uniform_over_subsets():
    # Each subset id should appear with probability d/K per example: chi-square-ish check.
    n, K, d = 20_000, 20, 4
    des = expander_design(n, K, d, key=jax.random.key(5))
    expected = n * d / K
    assert np.abs(des.subset_sizes - expected).max() < 6 * np.sqrt(expected)
    # pairs of subsets co-occur uniformly too (Floyd's algorithm is exact, not just marginally)
    dense = des.to_dense(np.float32)
    co = dense @ dense.T
    off = co[~np.eye(K, dtype=bool)]
    expected_pair = n * d * (d - 1) / (K * (K - 1))
    assert np.abs(off - expected_pair).max() < 6 * np.sqrt(expected_pair)


def test_bernoulli_rate_and_reproducibility():
    n, K, alpha = 3000, 30, 0.3
    des = bernoulli_design(n, K, alpha, key=jax.random.key(1))
    rate = des.nnz / (n * K)
    assert abs(rate - alpha) < 4 * np.sqrt(alpha * (1 - alpha) / (n * K))
    assert np.abs(des.subset_sizes / n - alpha).max() < 6 * np.sqrt(alpha * (1 - alpha) / n)
    again = bernoulli_design(n, K, alpha, key=jax.random.key(1), max_chunk_entries=n * 7)
    assert again.fingerprint() == des.fingerprint()
    # per-subset randomness: subset k does not change when K grows
    more = bernoulli_design(n, K + 5, alpha, key=jax.random.key(1))
    for k in (0, 13, K - 1):
        np.testing.assert_array_equal(more.members(k), des.members(k))


def test_products_match_dense(design):
    rng = np.random.default_rng(0)
    dense = design.to_dense(np.float64)
    w = rng.normal(size=(3, design.num_examples))
    u = rng.normal(size=(2, 3, design.num_subsets))
    np.testing.assert_allclose(design.matvec(w), w @ dense.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(design.matvec(w[0]), dense @ w[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(design.rmatvec(u), u @ dense, rtol=1e-12, atol=1e-12)
    masks = design.mask_rows([3, 0, 39])
    np.testing.assert_array_equal(masks, dense[[3, 0, 39]].astype(bool))


def test_products_with_empty_subset():
    # from_pairs allows empty subsets (e.g. a CV fold); reduceat must not misread them
    des = Design.from_pairs([0, 0, 2], [1, 3, 0], num_subsets=4, num_examples=4)
    w = np.array([1.0, 2.0, 4.0, 8.0])
    np.testing.assert_array_equal(des.matvec(w), [10.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(des.rmatvec(np.array([1.0, 5.0, 7.0, 9.0])), [7.0, 1.0, 0.0, 1.0])
    np.testing.assert_array_equal(des.example_slots(), [[2, 0, 4, 0]])


def test_take_subsets_and_from_dense(design):
    ks = np.array([5, 1, 30])
    sub = design.take_subsets(ks)
    np.testing.assert_array_equal(sub.to_dense(), design.to_dense()[ks])
    round_trip = Design.from_dense(design.to_dense())
    assert round_trip.fingerprint() == design.fingerprint()


def test_example_slots_and_device_arrays(design):
    slots = design.example_slots()
    assert slots.shape == (6, design.num_examples)
    for i in (0, 250):
        np.testing.assert_array_equal(slots[:, i], design.subsets_of(i))
    rows, cols = design.device_arrays()
    assert rows.dtype == jnp.int32 and cols.dtype == jnp.int32
    w = jnp.arange(design.num_examples, dtype=jnp.float32)
    mw = jax.jit(lambda w, r, c: jax.ops.segment_sum(w[c], r, design.num_subsets))(w, rows, cols)
    np.testing.assert_allclose(np.asarray(mw), design.matvec(np.asarray(w)), rtol=1e-6)


def test_save_load_round_trip(design, tmp_path):
    path = tmp_path / "sub" / "design.npz"
    design.save(path)
    loaded = Design.load(path)
    assert loaded.fingerprint() == design.fingerprint()
    assert loaded.shape == design.shape
    np.testing.assert_array_equal(loaded.indptr, design.indptr)
    assert [p.name for p in path.parent.iterdir()] == ["design.npz"]  # no temp file left
    with np.load(path, allow_pickle=False) as data:
        assert set(data.files) == {"format", "shape", "rows", "cols"}


def test_load_rejects_foreign_file(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, a=np.zeros(3))
    with pytest.raises(ValueError, match="not a saved Design"):
        Design.load(path)


def test_to_dense_refuses_large():
    K, n = 1000, DENSE_LIMIT // 1000 + 1
    des = Design(K, n, np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(K + 1, np.int64))
    with pytest.raises(ValueError, match="exceeds the limit"):
        des.to_dense()
    with pytest.raises(ValueError, match="exceeds the limit"):
        des.mask_rows(np.arange(K))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n=0, K=10, d=2), "n .* must be >= 1"),
        (dict(n=10, K=0, d=2), "K .* must be >= 1"),
        (dict(n=10, K=10, d=0), "d .* must be >= 1"),
        (dict(n=10, K=5, d=6), "d=6 subsets per example cannot exceed K=5"),
        (dict(n=10, K=10, d=2.5), "d .* must be an integer"),
    ],
)
def test_expander_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        expander_design(**kwargs, key=jax.random.key(0))


def test_expander_empty_subset_message():
    with pytest.raises(ValueError) as err:
        expander_design(5, 100, 2, key=jax.random.key(0))
    msg = str(err.value)
    assert "is empty" in msg and "n*d/K=0.1" in msg and "lower K or raise d" in msg


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, True])
def test_bernoulli_alpha_validation(alpha):
    with pytest.raises(ValueError, match="alpha"):
        bernoulli_design(10, 3, alpha, key=jax.random.key(0))


def test_bernoulli_empty_subset_message():
    with pytest.raises(ValueError, match="is empty.*raise alpha or n"):
        bernoulli_design(3, 50, 0.05, key=jax.random.key(0))


@pytest.mark.parametrize(
    ("rows", "cols", "match"),
    [
        ([0, 0], [1, 1], "duplicate pair"),
        ([0, 3], [0, 1], r"subset ids must lie in \[0, 3\)"),
        ([0, 1], [0, 9], r"example ids must lie in \[0, 4\)"),
    ],
)
def test_from_pairs_validation(rows, cols, match):
    with pytest.raises(ValueError, match=match):
        Design.from_pairs(rows, cols, num_subsets=3, num_examples=4)


def test_constructor_rejects_unsorted():
    with pytest.raises(ValueError, match="sorted by"):
        Design(2, 3, np.array([1, 0]), np.array([0, 0]), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="indptr"):
        Design(2, 3, np.array([0, 1]), np.array([0, 0]), np.array([0, 2, 2]))


def test_default_num_subsets():
    assert default_num_subsets(1_000_000, 10) == 1000  # the paper's K
    assert default_num_subsets(3200, 10) == 1000
    assert default_num_subsets(1000, 10) == 312  # mean subset size n*d/K >= 32
    assert 1000 * 10 / default_num_subsets(1000, 10) >= 32
    assert default_num_subsets(10, 10) == 20  # 2d: each example outside half of the subsets
    assert default_num_subsets(1, 10) == 10  # n*d: no subset can be empty
    for n in (1, 7, 100, 5000):
        for d in (1, 3, 10):
            K = default_num_subsets(n, d)
            assert d <= K <= min(1000, n * d) or (K == n * d)
    with pytest.raises(ValueError):
        default_num_subsets(0, 10)


def test_automatic_design_fills_empty_subsets_for_small_n():
    """K from default_num_subsets leaves subsets empty for a small n (a subset is empty with
    probability (1 - d/K)^n); fill_empty moves memberships so none is, keeping every example in
    exactly d subsets. A design without empty subsets is unchanged."""
    n, d = 3, 40
    K = default_num_subsets(n, d)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="lower K or raise d"):
        expander_design(n, K, d, key=key)
    design = expander_design(n, K, d, key=key, fill_empty=True)
    assert design.subset_sizes.min() >= 1
    np.testing.assert_array_equal(design.example_counts, np.full(n, d))
    full = Design.from_dense(np.array([[1, 0], [0, 1], [1, 1]]))
    assert fill_empty_subsets(full) is full
    moved = fill_empty_subsets(Design.from_dense(np.array([[1, 1], [0, 0], [1, 0]])))
    np.testing.assert_array_equal(moved.to_dense(np.int64), [[1, 0], [0, 1], [1, 0]])
