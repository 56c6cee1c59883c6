"""K-FAC / EK-FAC in JAX (stride_jax.baselines.ekfac): exact against dense linear algebra on small
models, independent of chunking, resumable, and labels drawn from the model's distribution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stride_jax.baselines import ekfac as E
from stride_jax.baselines.gradient import causal_lm_loss
from stride_jax.model import init_model, tiny_llama
from stride_jax.model.taps import dense

N, Q, T = 12, 3, 10


def _scores(tm, f, train, queries, **kw):
    return np.concatenate([b for _, b in E.scores(tm, f, train, queries, **kw)])


@pytest.fixture(scope="module")
def lm():
    cfg = tiny_llama(vocab_size=53, hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8,
                     intermediate_size=32, max_position_embeddings=16)
    model = init_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    lens = rng.integers(T // 2, T + 1, size=N)
    att = (np.arange(T)[None] < lens[:, None]).astype(np.int32)
    ids = (rng.integers(1, 53, (N, T)) * att).astype(np.int32)
    loss = np.zeros_like(att)
    for r, m in enumerate(lens):
        loss[r, 1:m - 1] = 1
    train = {"input_ids": ids, "attention_mask": att, "loss_mask": loss}
    queries = {k: v[[4, 0, 9]].copy() for k, v in train.items()}   # query 0 duplicates row 4
    return model, E.causal_lm_token_model(model), train, queries


def test_kfac_with_huge_damping_is_the_gradient_dot_product_over_covered_layers(lm):
    """(F + lam I)^-1 -> I / lam: lam * score == grad(mean query loss) . grad(summed train loss)
    over the block kernels, computed here by plain autodiff (no taps)."""
    model, tm, train, queries = lm
    f = E.fit_factors(tm, train, strategy="kfac", batch_size=5, key=jax.random.key(0))
    lam = 1e6
    got = _scores(tm, f, train, queries, strategy="kfac", damping=lam, batch_size=5) * lam
    params, loss = causal_lm_loss(model)

    def flat(ex, summed):
        g = jax.grad(lambda p: loss(p, ex) * (ex["loss_mask"].sum() if summed else 1))(params)
        return np.concatenate([np.asarray(v).ravel() for path, v in
                               jax.tree_util.tree_leaves_with_path(g)
                               if "layers" in jax.tree_util.keystr(path)
                               and "kernel" in jax.tree_util.keystr(path)])

    gq = np.stack([flat({k: v[i] for k, v in queries.items()}, False) for i in range(Q)])
    gt = np.stack([flat({k: v[i] for k, v in train.items()}, True) for i in range(N)])
    want = gq @ gt.T
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * np.abs(want).max())
    assert len(f.layers) == 14 and f.lam is None


# --- a hand-written MLP with tapped layers, checked against explicit dense matrices ----------
def _mlp():
    rng = np.random.default_rng(1)
    params = {"w0": jnp.asarray(rng.normal(size=(5, 4)) * 0.7, jnp.float32),
              "b0": jnp.asarray(rng.normal(size=4) * 0.1, jnp.float32),
              "w1": jnp.asarray(rng.normal(size=(4, 3)) * 0.7, jnp.float32),
              "b1": jnp.asarray(rng.normal(size=3) * 0.1, jnp.float32)}

    def forward(p, x, probes=None):
        z0 = dense("w0", x, p["w0"], p["b0"])
        h = jnp.tanh(z0)
        return dense("w1", h, p["w1"], p["b1"]), (x, h)

    def logits(p, batch):
        return forward(p, batch["x"])[0][:, None, :]

    def prepare(ex):
        x = np.asarray(ex["x"], np.float32)
        one = np.ones((len(x), 1), np.float32)
        return {"x": x, "targets": np.asarray(ex["y"], np.int32)[:, None], "loss_mask": one,
                "token_mask": one}

    n = 40
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = rng.integers(0, 3, n).astype(np.int32)
    return params, forward, E.TokenModel(params, logits, prepare), {"x": x, "y": y}


def _explicit(params, forward, ex):
    """Per example and layer: input with the bias 1 (a), output gradient (g) of its CE loss."""
    def loss_from_z(z1, y):
        return -jax.nn.log_softmax(z1)[y]

    out = {"w0": ([], []), "w1": ([], [])}
    for x, y in zip(ex["x"], ex["y"]):
        z1, (xin, h) = forward(params, x[None])
        g1 = jax.grad(loss_from_z)(z1[0], y)
        z0 = xin @ params["w0"] + params["b0"]
        g0 = (g1 @ params["w1"].T) * (1 - jnp.tanh(z0[0]) ** 2)
        for name, a, g in (("w0", xin[0], g0), ("w1", h[0], g1)):
            out[name][0].append(np.append(np.asarray(a, np.float64), 1.0))
            out[name][1].append(np.asarray(g, np.float64))
    return {k: (np.stack(a), np.stack(g)) for k, (a, g) in out.items()}


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_scores_equal_the_explicit_damped_kronecker_preconditioner(strategy):
    params, forward, tm, ex = _mlp()
    f = E.fit_factors(tm, ex, strategy=strategy, fisher="empirical", batch_size=7,
                      key=jax.random.key(0))
    queries = {k: v[:4] for k, v in ex.items()}
    got = _scores(tm, f, ex, queries, strategy=strategy, batch_size=6, query_chunk=3)
    tr, qu = _explicit(params, forward, ex), _explicit(params, forward, queries)
    want = np.zeros((4, len(ex["y"])))
    for name in ("w0", "w1"):
        a, g = tr[name]
        A, S = a.T @ a / len(a), g.T @ g / len(g)
        G = np.einsum("no,ni->noi", g, a).reshape(len(a), -1)   # vec of [out, in], row-major
        Gq = np.einsum("no,ni->noi", qu[name][1], qu[name][0]).reshape(4, -1)
        if strategy == "kfac":   # the damped Kronecker product, inverted densely
            K = np.kron(S, A)
            es, ea = np.linalg.eigvalsh(S), np.linalg.eigvalsh(A)
            lam = 0.1 * np.mean(np.outer(es, ea))
            M = np.linalg.inv(K + lam * np.eye(len(K)))
        else:                    # eigenvalue-corrected: second moments in the eigenbasis
            _, qs = np.linalg.eigh(S)
            _, qa = np.linalg.eigh(A)
            R = np.kron(qs, qa)
            corrected = np.mean((G @ R) ** 2, axis=0)
            M = R @ np.diag(1 / (corrected + 0.1 * corrected.mean())) @ R.T
        want += Gq @ M @ G.T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    # A query that is its own training row has a positive score (M is positive definite).
    assert (np.diag(got[:, :4]) > 0).all()


def test_scores_do_not_depend_on_chunking(lm):
    _, tm, train, queries = lm
    a = E.fit_factors(tm, train, batch_size=5, key=jax.random.key(3))
    b = E.fit_factors(tm, train, batch_size=N, key=jax.random.key(3))
    for part in ("lam", "e_a", "e_s"):      # float32 sums in another order: rounding only
        for name in a.layers:
            x, y = getattr(a, part)[name], getattr(b, part)[name]
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * np.abs(y).max())
    s1 = _scores(tm, a, train, queries, batch_size=5)
    s2 = _scores(tm, a, train, queries, batch_size=N, query_chunk=1)
    np.testing.assert_allclose(s1, s2, rtol=1e-4, atol=1e-5 * np.abs(s1).max())
    assert int(np.argmax(s1[0])) == 4 and s1[0, 4] > 0     # the duplicated row


def test_a_fit_interrupted_after_a_save_resumes_bitwise(lm, tmp_path, monkeypatch):
    _, tm, train, _ = lm
    whole = E.fit_factors(tm, train, batch_size=2, key=jax.random.key(0))
    saves = []
    real = E._save_partial

    def save_then_die(path, rows, sums):
        real(path, rows, sums)
        saves.append(rows)
        if path.name.startswith("lambda") and len(saves) >= 3:
            raise KeyboardInterrupt      # killed mid-pass, after an atomic save
    monkeypatch.setattr(E, "_save_partial", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        E.fit_factors(tm, train, batch_size=2, key=jax.random.key(0), directory=tmp_path,
                      checkpoint_every=1)
    assert (tmp_path / "eigen.safetensors").is_file()
    assert (tmp_path / "lambda.partial.safetensors").is_file()
    monkeypatch.setattr(E, "_save_partial", real)
    again = E.fit_factors(tm, train, batch_size=2, key=jax.random.key(0), directory=tmp_path,
                          checkpoint_every=1)
    for name in whole.layers:
        np.testing.assert_array_equal(again.lam[name], whole.lam[name])
        np.testing.assert_array_equal(again.q_a[name], whole.q_a[name])
    assert not (tmp_path / "lambda.partial.safetensors").exists()
    loaded = E.Factors.load(tmp_path / "factors.safetensors")
    assert loaded.layers == whole.layers and loaded.rows == N
    np.testing.assert_array_equal(loaded.lam[whole.layers[0]], whole.lam[whole.layers[0]])


def test_sampled_labels_follow_the_model_distribution():
    p = np.array([0.5, 0.2, 0.2, 0.1, 0.0])
    logp = jnp.log(jnp.asarray(np.broadcast_to(p, (4000, 3, 5)), jnp.float32))
    draws = np.asarray(E._sample_labels(jax.random.key(0), jnp.arange(4000), logp))
    freq = np.bincount(draws.ravel(), minlength=5) / draws.size
    np.testing.assert_allclose(freq, p, atol=0.015)
    # Row r's labels depend on the row index only, not on which rows share its chunk.
    part = np.asarray(E._sample_labels(jax.random.key(0), jnp.arange(10, 20), logp[:10]))
    np.testing.assert_array_equal(part, draws[10:20])


def test_layer_selection(lm):
    names = ["layers.0.attn.q_proj", "layers.0.mlp.up_proj", "layers.1.mlp.down_proj", "lm_head"]
    assert E.select_layers(names, "blocks") == names[:3]
    assert E.select_layers(names, "all") == names
    assert E.select_layers(names, "mlp") == names[1:3]
    assert E.select_layers(names, "attn") == names[:1]
    assert E.select_layers(names, r"down|q_proj") == [names[0], names[2]]
    assert E.select_layers(["w0", "w1"], "blocks") == ["w0", "w1"]   # no blocks: every layer
    with pytest.raises(ValueError, match="matches none of the model's 4 dense layers"):
        E.select_layers(names, "nothing_here")
    _, tm, train, _ = lm
    f = E.fit_factors(tm, train, strategy="kfac", layers="mlp", batch_size=6,
                      key=jax.random.key(0))
    assert f.layers == tuple(n for n in f.layers if ".mlp." in n) and len(f.layers) == 6
