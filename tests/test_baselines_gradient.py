"""Gradient baselines: brute force == vmapped/chunked; exact solves; projections; sign; CausalLM."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stride_jax.baselines.gradient import (
    causal_lm_loss,
    graddot,
    influence,
    logra,
    logra_projections,
    make_projector,
    per_example_grads,
    rows_as_examples,
    tracin,
    trak,
)
from stride_jax.data import TokenizedSet
from stride_jax.model import init_model, tiny_llama
from stride_jax.model.loss import mean_token_loss


# ---------------------------------------------------------------------------------------------
# A 2-layer MLP regression on random data
# ---------------------------------------------------------------------------------------------
def mlp_loss(params, ex):
    h = jnp.tanh(ex["x"] @ params["w1"] + params["b1"])
    pred = (h @ params["w2"] + params["b2"])[0]
    return 0.5 * (pred - ex["y"]) ** 2


def mlp_problem(d_in=4, hidden=8, n=40, q=6, seed=0):
    rng = np.random.default_rng(seed)
    params = {"w1": jnp.asarray(rng.normal(size=(d_in, hidden)) / np.sqrt(d_in), jnp.float32),
              "b1": jnp.asarray(rng.normal(size=hidden) * 0.1, jnp.float32),
              "w2": jnp.asarray(rng.normal(size=(hidden, 1)) / np.sqrt(hidden), jnp.float32),
              "b2": jnp.zeros(1, jnp.float32)}

    def data(m):
        return {"x": rng.normal(size=(m, d_in)).astype(np.float32),
                "y": rng.normal(size=m).astype(np.float32)}

    return params, data(n), data(q)


def brute_grads(loss_fn, params, examples, keep=None):
    """float64 ``[m, P]`` gradients by a Python loop of jax.grad (ravel_pytree order)."""
    m = len(jax.tree.leaves(examples)[0])
    rows = []
    for i in range(m):
        g = jax.grad(loss_fn)(params, jax.tree.map(lambda a: a[i], examples))
        leaves = jax.tree.leaves(g)
        if keep is not None:
            leaves = [l for l in leaves if keep(l)]
        rows.append(np.concatenate([np.asarray(l, np.float64).ravel() for l in leaves]))
    return np.stack(rows)


def dense_influence(g_np, g_qp, lam):
    n, p = g_np.shape
    f = g_np.T @ g_np / n + lam * np.eye(p)
    return g_qp @ np.linalg.solve(f, g_np.T)


def pearson(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.fixture(scope="module")
def mlp():
    return mlp_problem()


@pytest.fixture(scope="module")
def mlp_grads(mlp):
    params, train, queries = mlp
    return brute_grads(mlp_loss, params, train), brute_grads(mlp_loss, params, queries)


# ---------------------------------------------------------------------------------------------
# GradDot / TracIn
# ---------------------------------------------------------------------------------------------
def test_per_example_grads_match_loop_and_chunking(mlp, mlp_grads):
    params, train, _ = mlp
    g_np, _ = mlp_grads
    for chunk in (7, 40, 64):  # ragged last chunk, exact, larger than n
        chunks = list(per_example_grads(mlp_loss, params, train, chunk=chunk))
        assert all(c.shape[0] <= chunk for c in chunks)
        np.testing.assert_allclose(np.concatenate(chunks), g_np, rtol=1e-5, atol=1e-7)


def test_graddot_equals_loop_and_is_chunk_independent(mlp, mlp_grads):
    params, train, queries = mlp
    g_np, g_qp = mlp_grads
    want = g_qp @ g_np.T
    for chunk in (5, 32, 100):
        got = graddot(mlp_loss, params, train, queries, chunk=chunk)
        assert got.shape == (6, 40) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_tracin_reduces_to_graddot(mlp):
    params, train, queries = mlp
    gd = graddot(mlp_loss, params, train, queries)
    np.testing.assert_allclose(tracin(mlp_loss, [params], train, queries, weights=[1.0]), gd,
                               rtol=1e-6)
    np.testing.assert_allclose(tracin(mlp_loss, [params, params], train, queries,
                                      weights=(0.5, 0.5)), gd, rtol=1e-6, atol=1e-7)
    # Two different checkpoints: the weighted sum of their graddots.
    other = jax.tree.map(lambda a: a * 1.3, params)
    want = 0.2 * gd + 0.7 * graddot(mlp_loss, other, train, queries)
    np.testing.assert_allclose(tracin(mlp_loss, [params, other], train, queries,
                                      weights=[0.2, 0.7]), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Influence
# ---------------------------------------------------------------------------------------------
def test_influence_equals_dense_solve(mlp, mlp_grads):
    params, train, queries = mlp
    g_np, g_qp = mlp_grads
    n, p = g_np.shape
    lam_default = 0.1 * np.trace(g_np.T @ g_np / n) / p
    for damping, lam in ((None, lam_default), (1e-2, 1e-2)):
        got = influence(mlp_loss, params, train, queries, damping=damping, chunk=16)
        np.testing.assert_allclose(got, dense_influence(g_np, g_qp, lam), rtol=1e-4,
                                   atol=1e-4 * np.abs(got).max())


def test_influence_memory_guard(mlp):
    params, train, queries = mlp
    with pytest.raises(MemoryError, match="trak"):
        influence(mlp_loss, params, train, queries, memory_budget=1000)


# ---------------------------------------------------------------------------------------------
# Projections and TRAK
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gaussian", "sjlt"])
def test_projector_deterministic_chunked_and_preserves_dots(kind):
    p, k = 3000, 1024
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(10, p)), jnp.float32)
    key = jax.random.key(3)
    proj = make_projector(p, k, key=key, kind=kind)
    assert proj.kind == kind
    again = make_projector(p, k, key=key, kind=kind)
    whole = np.asarray(proj(x))
    assert whole.shape == (10, k)
    for a, b in zip(proj.arrays, again.arrays):  # the map itself is a function of the key
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Outputs to rounding only: scatter-adds may sum in any order on accelerators.
    np.testing.assert_allclose(np.asarray(again(x)), whole, rtol=1e-6, atol=1e-5)
    chunked = np.concatenate([np.asarray(proj(x[i:i + 3])) for i in range(0, 10, 3)])
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-5)
    other = np.asarray(make_projector(p, k, key=jax.random.key(4), kind=kind)(x))
    assert not np.allclose(other, whole)
    # JL: <Rx, Ry> - <x, y> has standard deviation <= sqrt((|x|^2 |y|^2 + <x, y>^2) / k);
    # allow 6 of them (fixed seeds, so this is a regression check, not a flaky one).
    xn = np.asarray(x, np.float64)
    exact = xn @ xn.T
    sd = np.sqrt((np.outer(np.diag(exact), np.diag(exact)) + exact**2) / k)
    approx = whole.astype(np.float64) @ whole.T.astype(np.float64)
    assert np.all(np.abs(approx - exact) <= 6 * sd)


def test_projector_auto_and_errors():
    key = jax.random.key(0)
    assert make_projector(100, 16, key=key).kind == "gaussian"
    assert make_projector(100, 16, key=key, memory_budget=100).kind == "sjlt"
    assert make_projector(100, 3, key=key, kind="sjlt").arrays[0].shape == (3, 100)  # s <= k
    with pytest.raises(ValueError, match="positive"):
        make_projector(100, 0, key=key)
    with pytest.raises(ValueError, match="kind"):
        make_projector(100, 4, key=key, kind="dense")


def test_trak_large_projection_matches_influence(mlp, mlp_grads):
    params, train, queries = mlp
    g_np, g_qp = mlp_grads
    n = g_np.shape[0]
    lam = 1e-2
    inf = dense_influence(g_np, g_qp, lam / n)
    got = trak(mlp_loss, params, train, queries, proj_dim=8192, damping=lam,
               key=jax.random.key(0), projection="gaussian")
    assert got.shape == (6, 40)
    assert pearson(got, inf) > 0.99
    # Same scale too: trak(lam) ~ influence(lam / n) / n.
    assert 0.7 < np.abs(got).sum() / (np.abs(inf).sum() / n) < 1.4
    again = trak(mlp_loss, params, train, queries, proj_dim=8192, damping=lam,
                 key=jax.random.key(0), projection="gaussian", chunk=9)
    np.testing.assert_allclose(again, got, rtol=1e-4, atol=1e-5 * np.abs(got).max())


def test_trak_sjlt_and_default_damping(mlp, mlp_grads):
    params, train, queries = mlp
    g_np, g_qp = mlp_grads
    n, p = g_np.shape
    lam_f = 0.1 * np.trace(g_np.T @ g_np / n) / p
    inf = dense_influence(g_np, g_qp, lam_f)
    proj = make_projector(p, 4096, key=jax.random.key(1), kind="sjlt")
    got = trak(mlp_loss, params, train, queries, damping=n * lam_f, key=None, projection=proj)
    assert pearson(got, inf) > 0.99
    # damping=None is 0.1 * trace(Phi^T Phi) / k on the projected features.
    proj = make_projector(p, 256, key=jax.random.key(2), kind="sjlt")
    phi_n = np.asarray(proj(jnp.asarray(g_np, jnp.float32)), np.float64)
    phi_q = np.asarray(proj(jnp.asarray(g_qp, jnp.float32)), np.float64)
    lam = 0.1 * np.sum(phi_n**2) / 256
    want = phi_q @ np.linalg.solve(phi_n.T @ phi_n + lam * np.eye(256), phi_n.T)
    got = trak(mlp_loss, params, train, queries, key=None, projection=proj)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_trak_primal_form_equals_dual():
    # n > k takes the k x k (primal) solve; a projector with k >= n takes the n x n (dual) one.
    # Identical features through both forms must give identical scores.
    params, train, queries = mlp_problem(n=50, seed=2)
    key = jax.random.key(5)
    proj = make_projector(49, 30, key=key, kind="gaussian")
    primal = trak(mlp_loss, params, train, queries, projection=proj, damping=1e-3, key=key)
    from stride_jax.baselines import gradient as gr
    phi_n = np.asarray(proj(jnp.asarray(brute_grads(mlp_loss, params, train), jnp.float32)),
                       np.float64)
    phi_q = np.asarray(proj(jnp.asarray(brute_grads(mlp_loss, params, queries), jnp.float32)),
                       np.float64)
    dual = gr._solve_dual(phi_q @ phi_n.T, phi_n @ phi_n.T, 1e-3)
    np.testing.assert_allclose(primal, dual, rtol=1e-4, atol=1e-4 * np.abs(dual).max())


# ---------------------------------------------------------------------------------------------
# LoGra
# ---------------------------------------------------------------------------------------------
def _is_matrix(leaf):
    return leaf.ndim >= 2


def test_logra_identity_and_orthogonal_projections_equal_exact_2d_solve(mlp):
    params, train, queries = mlp
    g_np = brute_grads(mlp_loss, params, train, keep=_is_matrix)
    g_qp = brute_grads(mlp_loss, params, queries, keep=_is_matrix)
    lam = 1e-2
    want = g_qp @ np.linalg.solve(g_np.T @ g_np + lam * np.eye(g_np.shape[1]), g_np.T)
    leaves = jax.tree.leaves(params)
    ident = [(np.eye(l.shape[0]), np.eye(l.shape[1])) if l.ndim == 2 else None for l in leaves]
    key = jax.random.key(0)
    got = logra(mlp_loss, params, train, queries, damping=lam, key=key, projections=ident)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # Orthogonal square projections rotate the feature space: the damped solve is invariant.
    rng = np.random.default_rng(0)
    orth = [(np.linalg.qr(rng.normal(size=(l.shape[0],) * 2))[0],
             np.linalg.qr(rng.normal(size=(l.shape[1],) * 2))[0]) if l.ndim == 2 else None
            for l in leaves]
    got = logra(mlp_loss, params, train, queries, damping=lam, key=key, projections=orth)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_logra_deterministic_shapes_and_full_rank_correlation(mlp, mlp_grads):
    params, train, queries = mlp
    g_np, g_qp = mlp_grads
    n, p = g_np.shape
    key = jax.random.key(7)
    mats = logra_projections(params, rank=2, key=key)
    assert [None if m is None else (m[0].shape, m[1].shape) for m in mats] == \
        [None, None, ((4, 2), (8, 2)), ((8, 2), (1, 1))]  # leaves: b1, b2, w1, w2
    a = logra(mlp_loss, params, train, queries, rank=2, key=key, chunk=7)
    b = logra(mlp_loss, params, train, queries, rank=2, key=key)
    assert a.shape == (6, 40) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max())
    lam_f = 0.1 * np.trace(g_np.T @ g_np / n) / p
    inf = dense_influence(g_np, g_qp, lam_f)
    full = logra(mlp_loss, params, train, queries, rank=64, key=key, include_1d=True)
    assert pearson(full, inf) > 0.9


# ---------------------------------------------------------------------------------------------
# Sign convention
# ---------------------------------------------------------------------------------------------
def linear_loss(params, ex):
    return 0.5 * (ex["x"] @ params["w"] - ex["y"]) ** 2


def test_sign_duplicate_is_top_proponent():
    rng = np.random.default_rng(0)
    d, n = 50, 20
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.choice([-1.0, 1.0], size=n).astype(np.float32)
    params = {"w": jnp.zeros(d, jnp.float32)}
    train = {"x": x, "y": y}
    # Query 0 duplicates example 3; query 1 is example 5 with the opposite label.
    queries = {"x": x[[3, 5]], "y": np.array([y[3], -y[5]], np.float32)}
    key = jax.random.key(0)
    for name, s in {
        "graddot": graddot(linear_loss, params, train, queries),
        "influence": influence(linear_loss, params, train, queries),
        "trak": trak(linear_loss, params, train, queries, proj_dim=256, key=key),
        "logra": logra(linear_loss, params, train, queries, key=key, include_1d=True),
    }.items():
        assert s[0].argmax() == 3 and s[0, 3] > 0, name
        assert s[1].argmin() == 5 and s[1, 5] < 0, name
    # A small gradient step on example i changes the query loss by about -eta * graddot.
    gd = graddot(linear_loss, params, train, queries)
    eta = 1e-4
    q0 = jax.tree.map(lambda a: a[0], queries)
    for i in range(n):
        g_i = jax.grad(linear_loss)(params, jax.tree.map(lambda a: a[i], train))
        stepped = jax.tree.map(lambda w, g: w - eta * g, params, g_i)
        delta = float(linear_loss(stepped, q0) - linear_loss(params, q0))
        np.testing.assert_allclose(-delta / eta, gd[0, i], rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def test_validation_errors(mlp):
    params, train, queries = mlp
    key = jax.random.key(0)
    empty = {"x": np.zeros((0, 4), np.float32), "y": np.zeros(0, np.float32)}
    with pytest.raises(ValueError, match="training set is empty"):
        graddot(mlp_loss, params, empty, queries)
    with pytest.raises(ValueError, match="query set is empty"):
        influence(mlp_loss, params, train, empty)
    ragged = {"x": train["x"], "y": train["y"][:5]}
    with pytest.raises(ValueError, match="leading axis"):
        trak(mlp_loss, params, ragged, queries, key=key)
    with pytest.raises(ValueError, match="proj_dim"):
        trak(mlp_loss, params, train, queries, proj_dim=0, key=key)
    with pytest.raises(ValueError, match="key"):
        trak(mlp_loss, params, train, queries, key=None)
    with pytest.raises(ValueError, match="rank"):
        logra(mlp_loss, params, train, queries, rank=0, key=key)
    with pytest.raises(ValueError, match="chunk"):
        graddot(mlp_loss, params, train, queries, chunk=0)
    with pytest.raises(ValueError, match="weight"):
        tracin(mlp_loss, [params], train, queries, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="damping"):
        influence(mlp_loss, params, train, queries, damping=-1.0)
    bad = {"x": train["x"].copy(), "y": train["y"].copy()}
    bad["x"][13, 2] = np.nan
    with pytest.raises(FloatingPointError, match="training example 13"):
        graddot(mlp_loss, params, bad, queries, chunk=8)
    with pytest.raises(FloatingPointError, match="query example 13"):
        trak(mlp_loss, params, queries, bad, proj_dim=8, key=key)


# ---------------------------------------------------------------------------------------------
# stride-jax's CausalLM
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm():
    config = tiny_llama(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                        head_dim=16, intermediate_size=64, max_position_embeddings=32)
    model = init_model(config, seed=0)
    rng = np.random.default_rng(0)
    n, length = 10, 12
    input_ids = rng.integers(0, 64, size=(n, length)).astype(np.int32)
    lengths = rng.integers(4, length + 1, size=n)
    attention = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    loss_mask = np.zeros_like(attention)
    for i, m in enumerate(lengths):
        loss_mask[i, 1:m - 1] = 1  # the first target (a prompt token, say) is not scored
    rows = TokenizedSet(ids=[str(i) for i in range(n)], input_ids=input_ids,
                        attention_mask=attention, loss_mask=loss_mask,
                        source_ids=[str(i) for i in range(n)])
    return model, rows


def test_causal_lm_loss_matches_mean_token_loss(lm):
    model, rows = lm
    params, loss_fn = causal_lm_loss(model)
    loss_jit = jax.jit(loss_fn)
    ex = rows_as_examples(rows)
    assert set(ex) == {"input_ids", "attention_mask", "loss_mask"}
    assert all(a.dtype == np.int32 and a.shape == (10, 12) for a in ex.values())
    for i in (0, 1, 5):
        want = mean_token_loss(model(rows.input_ids[i:i + 1], rows.attention_mask[i:i + 1]),
                               rows.input_ids[i:i + 1], rows.loss_mask[i:i + 1])
        got = loss_jit(params, jax.tree.map(lambda a: a[i], ex))
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    # Explicit targets (input_ids shifted left) give the same loss.
    targets = np.zeros_like(rows.input_ids)
    targets[:, :-1] = rows.input_ids[:, 1:]
    with_targets = types.SimpleNamespace(input_ids=rows.input_ids,
                                         attention_mask=rows.attention_mask,
                                         loss_mask=rows.loss_mask, targets=targets)
    ex_t = rows_as_examples(with_targets)
    assert set(ex_t) == set(ex) | {"targets"}
    for i in (0, 5):
        np.testing.assert_allclose(float(loss_fn(params, jax.tree.map(lambda a: a[i], ex_t))),
                                   float(loss_jit(params, jax.tree.map(lambda a: a[i], ex))),
                                   rtol=1e-5)


def test_causal_lm_baselines_run(lm):
    model, rows = lm
    params, loss_fn = causal_lm_loss(model)
    ex = rows_as_examples(rows)
    train = jax.tree.map(lambda a: a[:8], ex)
    # Queries: two held-out rows and a duplicate of training row 2. chunk=3 gives training and
    # query chunks one shape, so each method compiles once.
    queries = jax.tree.map(lambda a: a[[8, 9, 2]], ex)
    key = jax.random.key(0)
    gd = graddot(loss_fn, params, train, queries, chunk=3)
    inf = influence(loss_fn, params, train, queries, chunk=3)
    tk = trak(loss_fn, params, train, queries, proj_dim=512, key=key, chunk=3,
              projection="sjlt")
    lg = logra(loss_fn, params, train, queries, rank=4, key=key, chunk=3)
    for s in (gd, inf, tk, lg):
        assert s.shape == (3, 8) and s.dtype == np.float32 and np.isfinite(s).all()
    for s in (inf, tk, lg):
        assert s[2].argmax() == 2 and s[2, 2] > 0
