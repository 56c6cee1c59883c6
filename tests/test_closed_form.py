"""Closed-form STRIDE operators (the default): exact against an independent dense computation,
first-order correct, the limit of the regression over subsets, chunk- and resume-invariant."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stride_jax.attributor import AttributeConfig, Attributor
from stride_jax.errors import ConfigError
from stride_jax.model.config import tiny_llama
from stride_jax.model.transformer import init_model
from stride_jax.steering import SteeringConfig, from_causal_lm
from stride_jax.train import ClosedFormConfig, fit_factors, operator_gradients
from _tiny import random_rows

VOCAB = 48


@pytest.fixture(scope="module")
def setup():
    model = init_model(tiny_llama(vocab_size=VOCAB, hidden_size=16, num_heads=2, num_kv_heads=1,
                                  head_dim=8, intermediate_size=32, num_layers=2), seed=0)
    train = random_rows(40, 12, VOCAB, 0, "t")
    # Queries: two random rows and an exact copy of training row 7.
    q = random_rows(2, 12, VOCAB, 1, "q")
    from stride_jax.data import TokenizedSet
    queries = TokenizedSet(["q0", "q1", "copy7"],
                           np.concatenate([q.input_ids, train.input_ids[7:8]]),
                           np.concatenate([q.attention_mask, train.attention_mask[7:8]]),
                           np.concatenate([q.loss_mask, train.loss_mask[7:8]]),
                           ["q0", "q1", "copy7"])
    return model, train, queries


def _dense_reference(model, rows_t, rows_q, site, lam_a, lam_s, norm_power=0.0, reader="layer"):
    """The closed-form scores computed the slow, explicit way: per-row operator gradients as
    dense D x C matrices by autodiff of the steered loss, the Kronecker metric formed in full,
    each training row's score divided by (g_i^T P g_i)^(norm_power / 2)."""
    lm = from_causal_lm(model, 0)
    C = VOCAB if site == "logits" else lm.d_final

    def row_terms(rows):
        h_r, h_f = lm.features(lm.params, jnp.asarray(rows.input_ids),
                               jnp.asarray(rows.attention_mask))
        if reader == "final":
            h_r = h_f
        phi = h_r / jnp.sqrt(jnp.mean(h_r ** 2, -1, keepdims=True) + 1e-6)
        tgt = jnp.asarray(rows.target_ids())
        m = jnp.asarray(rows.loss_mask, jnp.float32)

        def loss(a, b):   # row b's mean token loss with the operator a [D, C] applied
            shift = phi[b] @ a
            if site == "logits":
                logits = lm.head(lm.params, h_f[b][None])[0] + shift
            else:
                logits = lm.head(lm.params, (h_f[b] + shift)[None])[0]
            lp = jax.nn.log_softmax(logits, -1)
            nll = -jnp.take_along_axis(lp, tgt[b][:, None], -1)[:, 0]
            return jnp.sum(nll * m[b]) / jnp.sum(m[b])

        zero = jnp.zeros((h_r.shape[-1], C))
        G = jnp.stack([jax.grad(loss)(zero, b) for b in range(len(rows))])
        return np.asarray(phi), np.asarray(h_f), np.asarray(G, np.float64), np.asarray(m)

    phi, h_f, G, m = row_terms(rows_t)
    _, _, Gq, _ = row_terms(rows_q)
    sel = m.reshape(-1) > 0
    ph = phi.reshape(-1, phi.shape[-1])[sel].astype(np.float64)
    A = ph.T @ ph / len(ph)
    p = np.asarray(jax.nn.softmax(lm.head(lm.params, jnp.asarray(h_f)), -1), np.float64)
    p = p.reshape(-1, VOCAB)[sel]
    S = np.mean([np.diag(x) - np.outer(x, x) for x in p], axis=0)
    if site == "final_hidden":
        d = lm.d_final
        U = np.asarray(lm.head(lm.params, jnp.eye(d)[None])[0]
                       - lm.head(lm.params, jnp.zeros((1, 1, d)))[0], np.float64)
        S = U @ S @ U.T

    def damped_inv(M, frac):
        if frac is None:
            return np.eye(len(M))
        e, v = np.linalg.eigh(M)
        e = np.maximum(e, 0)
        return v @ np.diag(1 / (e + frac * e.mean())) @ v.T

    P = np.kron(damped_inv(A, lam_a), damped_inv(S, lam_s))
    Gf = G.reshape(len(G), -1)
    self_metric = np.einsum("nd,de,ne->n", Gf, P, Gf)
    return (Gq.reshape(len(Gq), -1) @ P @ Gf.T) * self_metric[None, :] ** (-norm_power / 2)


@pytest.mark.parametrize("site,lam_a,norm_power,reader", [
    ("logits", None, 0.0, "layer"), ("logits", 0.3, 0.0, "layer"),
    ("final_hidden", None, 0.0, "layer"), ("logits", None, 0.5, "layer"),
    ("logits", 0.3, 1.0, "layer"), ("final_hidden", None, 0.5, "layer"),
    ("logits", None, 0.5, "final"), ("final_hidden", 0.3, 0.0, "final")])
def test_scores_equal_the_dense_kronecker_formula(setup, site, lam_a, norm_power, reader):
    model, train, queries = setup
    cfg = AttributeConfig(steering=SteeringConfig(site=site, layer=0),
                          closed_form=ClosedFormConfig(
                              reader=reader, reader_damping="none" if lam_a is None else lam_a,
                              output_damping=0.2, norm_power=norm_power, batch_size=16))
    got = Attributor(model, train, cfg, progress=False).attribute(queries).scores_qn
    ref = _dense_reference(model, train, queries, site, lam_a, 0.2, norm_power, reader)
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4 * np.abs(ref).max())


def test_auto_reader_damping_follows_the_site_width(setup):
    from stride_jax.train._closed_form import reader_damping_of
    cfg = ClosedFormConfig()
    assert reader_damping_of(cfg, 10) == 0.1          # a classifier: whitened reader
    assert reader_damping_of(cfg, 49152) is None      # a language model: identity
    assert reader_damping_of(ClosedFormConfig(reader_damping=3.0), 49152) == 3.0


def test_auto_reader_follows_the_site_width():
    from stride_jax.train._closed_form import reader_of
    assert reader_of(ClosedFormConfig(), 10) == "layer"       # a classifier: ~2/3 depth
    assert reader_of(ClosedFormConfig(), 49152) == "final"    # a language model: final hidden
    assert reader_of(ClosedFormConfig(reader="layer"), 49152) == "layer"
    with pytest.raises(ConfigError, match="reader=.middle. must be"):
        ClosedFormConfig(reader="middle")


def test_a_query_copying_a_training_row_ranks_it_first_with_a_positive_score(setup):
    model, train, queries = setup
    out = Attributor(model, train, AttributeConfig(), progress=False).attribute(queries)
    pro, _ = out.top(2, 3)
    assert pro[0][0] == 7 and pro[0][1] > 0
    # Self-influence is the same quantity before the training-side norm power: |g~_7|^2, and
    # row 7's own score |g~_7|^2 / |g~_7|^p.
    si = Attributor(model, train, AttributeConfig(), progress=False).self_influence()
    p = ClosedFormConfig().norm_power
    np.testing.assert_allclose(si[7] ** (1 - p / 2), out.scores_qn[2, 7], rtol=1e-5)


def test_scores_are_first_order_loss_changes(setup):
    """s_qi = g_q^T P g_i is the first-order decrease of q's loss when the operator steps along
    -P g_i (a Newton-like step on example i): a central difference of L_q along P g_i."""
    model, train, queries = setup
    cfg = ClosedFormConfig(reader_damping=0.5, output_damping=0.3, batch_size=8)
    lm = from_causal_lm(model, 0)
    factors = fit_factors(lm, train, "logits", cfg, key=jax.random.key(0))
    D = lm.d_reader
    g_t = operator_gradients(lm, train, factors, cfg)      # whitened: g~ = T_phi^T g T_out
    g_q = operator_gradients(lm, queries, factors, cfg)
    s = g_q @ g_t.T
    h_r, h_f = lm.features(lm.params, jnp.asarray(queries.input_ids),
                           jnp.asarray(queries.attention_mask))
    phi = h_r / jnp.sqrt(jnp.mean(h_r ** 2, -1, keepdims=True) + 1e-6)
    tgt = jnp.asarray(queries.target_ids())
    m = jnp.asarray(queries.loss_mask, jnp.float32)

    def q_loss(a):
        lp = jax.nn.log_softmax(lm.head(lm.params, h_f) + phi @ a, -1)
        nll = -jnp.take_along_axis(lp, tgt[..., None], -1)[..., 0]
        return np.asarray(jnp.sum(nll * m, 1) / jnp.sum(m, 1), np.float64)

    eps = 3e-3
    for i in (0, 7):
        # P g_i = T_phi g~_i T_out^T: the step in the operator's own coordinates.
        step = factors.t_phi @ g_t[i].reshape(D, VOCAB) @ factors.t_out.T
        a = eps * jnp.asarray(step, jnp.float32)
        fd = (q_loss(a) - q_loss(-a)) / (2 * eps)
        np.testing.assert_allclose(fd, s[:, i], rtol=2e-2, atol=3e-3 * np.abs(s[:, i]).max())


def test_regression_over_subsets_converges_to_the_closed_form_scores(setup):
    """The responses of closed-form subset operators are additive, y = M_norm s; the ridge
    decode over K >= n subsets recovers s (the default computes this limit directly)."""
    from stride_jax.solve import ridge
    from stride_jax.subsets import expander_design
    model, train, queries = setup
    att = Attributor(model, train, AttributeConfig(), progress=False)
    s = att.attribute(queries).scores_qn.astype(np.float64)
    n = len(train)
    design = expander_design(n, 3 * n, 30, key=jax.random.key(1))
    M = design.to_dense(np.float64)
    # The subsets' linear responses [K, Q] (for an operator fitted to the subset's summed
    # loss; the mean-loss operator divides row k by |S_k|, a known rescaling of the design).
    y = M @ s.T
    w = ridge(design, y.T, 1e-9 * np.trace(M @ M.T) / len(M)).w_qn
    for q in range(len(queries)):
        assert np.corrcoef(w[q], s[q])[0, 1] > 0.999


def test_batch_size_and_devices_do_not_change_the_scores(setup):
    model, train, queries = setup
    a = Attributor(model, train, AttributeConfig(closed_form=ClosedFormConfig(batch_size=5)),
                   progress=False).attribute(queries).scores_qn
    b = Attributor(model, train, AttributeConfig(closed_form=ClosedFormConfig(batch_size=64)),
                   progress=False).attribute(queries).scores_qn
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(a).max())


def test_topk_streaming_equals_the_top_of_the_dense_scores(setup, tmp_path):
    model, train, queries = setup
    dense = Attributor(model, train, AttributeConfig(topk=4), progress=False).attribute(queries)
    top = Attributor(model, train, AttributeConfig(topk=4, scores="topk",
                                                   closed_form=ClosedFormConfig(batch_size=6)),
                     workdir=tmp_path, progress=False).attribute(queries)
    assert top.scores_qn is None
    for q in range(len(queries)):
        (p1, o1), (p2, o2) = dense.top(q, 4), top.top(q, 4)
        assert [i for i, _ in p1] == [i for i, _ in p2]
        assert [i for i, _ in o1] == [i for i, _ in o2]
        np.testing.assert_allclose([s for _, s in p1], [s for _, s in p2], rtol=1e-5)


def test_a_killed_pass_resumes_from_its_last_mark(setup, tmp_path, monkeypatch):
    """The factor pass marks its progress every checkpoint_rows rows; a rerun after a crash
    resumes there and gives the same scores as an uninterrupted run."""
    import stride_jax.train._closed_form as cf
    model, train, queries = setup
    cfg = AttributeConfig(closed_form=ClosedFormConfig(batch_size=4, checkpoint_rows=8))
    ref = Attributor(model, train, cfg, progress=False).attribute(queries).scores_qn
    real = cf._stat_fn
    calls = {"n": 0}

    def dying(*a, **k):
        fn = real(*a, **k)

        def wrapped(*args):
            calls["n"] += 1
            if calls["n"] == 6:
                raise KeyboardInterrupt("killed")
            return fn(*args)
        return wrapped

    monkeypatch.setattr(cf, "_stat_fn", dying)
    with pytest.raises(KeyboardInterrupt):
        Attributor(model, train, cfg, workdir=tmp_path, progress=False).attribute(queries)
    partial = tmp_path / "operators" / "partial.npz"
    assert partial.is_file()
    with np.load(partial) as z:
        assert int(z["_rows_done"]) == 16     # marks at 8 and 16 rows; killed in batch 6
    monkeypatch.setattr(cf, "_stat_fn", real)
    calls["n"] = 0
    out = Attributor(model, train, cfg, workdir=tmp_path, progress=False).attribute(queries)
    np.testing.assert_allclose(out.scores_qn, ref, rtol=1e-5, atol=1e-7 * np.abs(ref).max())
    assert not partial.exists()
    assert json.loads((tmp_path / "operators" / "stamp.json").read_text())["complete"]


def test_stages_are_stamped_and_reused(setup, tmp_path):
    from stride_jax.io.stamps import StaleArtifactError
    model, train, queries = setup
    cfg = AttributeConfig()
    first = Attributor(model, train, cfg, workdir=tmp_path, progress=False).attribute(queries)
    for stage in ("operators", "responses/*", "solve/*"):
        (path,) = tmp_path.glob(stage + "/stamp.json") if "*" in stage else \
            [tmp_path / stage / "stamp.json"]
        assert json.loads(path.read_text())["complete"]
    again = Attributor(model, train, cfg, workdir=tmp_path, progress=False).attribute(queries)
    np.testing.assert_array_equal(again.scores_qn, first.scores_qn)
    other = dataclasses.replace(cfg, closed_form=ClosedFormConfig(output_damping=0.5))
    with pytest.raises(StaleArtifactError, match="closed_form.output_damping"):
        Attributor(model, train, other, workdir=tmp_path, progress=False).attribute(queries)


def test_projection_keeps_dot_products_within_the_jl_bound(setup):
    """Beyond max_dim the output side is projected by a Gaussian C x k matrix: each score keeps
    its value up to ~|g~_q| |g~_i| / sqrt(k) (Johnson-Lindenstrauss), unbiased."""
    model, train, queries = setup
    lm = from_causal_lm(model, 0)
    exact_cfg = ClosedFormConfig()
    proj_cfg = ClosedFormConfig(max_dim=16 * 24)        # D = 16: k = 24 of C = 48
    key = jax.random.key(0)
    f_exact = fit_factors(lm, train, "logits", exact_cfg, key=key)
    f_proj = fit_factors(lm, train, "logits", proj_cfg, key=key)
    assert f_exact.dim == 16 * 48 and f_proj.dim == 16 * 24
    ge_t, ge_q = (operator_gradients(lm, r, f_exact, exact_cfg) for r in (train, queries))
    gp_t, gp_q = (operator_gradients(lm, r, f_proj, proj_cfg) for r in (train, queries))
    exact, proj = ge_q @ ge_t.T, gp_q @ gp_t.T
    norms = np.linalg.norm(ge_q, axis=1)[:, None] * np.linalg.norm(ge_t, axis=1)[None, :]
    err = (proj - exact) / norms
    assert np.abs(err).max() < 4 / np.sqrt(24)
    assert abs(err.mean()) < 0.5 / np.sqrt(24)
    # Norms are kept too (a dot product with itself), within the same bound.
    np.testing.assert_allclose(np.linalg.norm(gp_t, axis=1), np.linalg.norm(ge_t, axis=1),
                               rtol=2 / np.sqrt(24))


def test_diagonal_metric_for_wide_sites(setup):
    model, train, queries = setup
    full = Attributor(model, train, AttributeConfig(), progress=False).attribute(queries)
    diag = Attributor(model, train, AttributeConfig(
        closed_form=ClosedFormConfig(full_metric_limit=8)), progress=False).attribute(queries)
    for q in range(len(queries)):
        assert np.corrcoef(full.scores_qn[q], diag.scores_qn[q])[0, 1] > 0.8
    assert not np.allclose(full.scores_qn, diag.scores_qn)


def test_bad_settings_are_refused_when_the_config_is_made():
    with pytest.raises(ValueError, match="reader_damping"):
        ClosedFormConfig(reader_damping="whiten")
    with pytest.raises(ValueError, match="output_damping"):
        ClosedFormConfig(output_damping=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        ClosedFormConfig(batch_size=0)


def test_residual_site_needs_trained_operators(setup):
    model, train, queries = setup
    cfg = AttributeConfig(steering=SteeringConfig(site="residual"))
    with pytest.raises(ValueError, match="operators=trained"):
        Attributor(model, train, cfg, progress=False).attribute(queries)


def test_the_public_functions_honour_the_reader(setup):
    """closed_form.reader holds when the module's functions are called directly, as it does
    through the Attributor (reader_lm is applied inside them, and applying it twice is a no-op)."""
    from stride_jax.train import closed_form_scores, query_terms, reader_lm
    model, train, queries = setup
    lm = from_causal_lm(model, 0)
    scores = {}
    for reader in ("final", "layer"):
        cfg = ClosedFormConfig(reader=reader, batch_size=16)
        f = fit_factors(lm, train, "logits", cfg, key=jax.random.key(0))
        g, _ = query_terms(lm, queries, f, cfg)
        scores[reader] = closed_form_scores(lm, train, f, g, cfg)["s"]
        via = Attributor(model, train, AttributeConfig(steering=SteeringConfig(layer=0),
                                                       closed_form=cfg),
                         progress=False).attribute(queries).scores_qn
        np.testing.assert_allclose(scores[reader], via, rtol=1e-5, atol=1e-6 * np.abs(via).max())
    assert not np.allclose(scores["final"], scores["layer"])
    once = reader_lm(lm, ClosedFormConfig(reader="final"), "logits")
    assert reader_lm(once, ClosedFormConfig(reader="final"), "logits") is once
