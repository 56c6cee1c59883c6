"""The default path's kernels compile once per shape (issue 16): counted from JAX's own trace
events (``jax.monitoring``), with nothing added to the production code."""

from __future__ import annotations


import jax
import numpy as np

from stride_jax.attributor import AttributeConfig, Attributor
from stride_jax.model.config import tiny_llama
from stride_jax.model.transformer import init_model
from stride_jax.steering import from_causal_lm
from stride_jax.train import ClosedFormConfig, fit_factors
from _jaxtrace import traces
from _tiny import random_rows

def _model(seed):
    # An architecture of its own (the kernels are cached per architecture, so none is warm).
    return init_model(tiny_llama(vocab_size=40, hidden_size=16, num_heads=2, num_kv_heads=1,
                                 head_dim=8, intermediate_size=24, num_layers=2), seed=seed)


def test_each_kernel_compiles_once_per_shape():
    model, other = _model(11), _model(13)
    queries = random_rows(5, 12, 40, 1, "q")
    cfg = AttributeConfig(topk=3, closed_form=ClosedFormConfig(batch_size=4))
    with traces() as first:
        # 10 rows in batches of 4: three factor batches, three score batches (the last padded),
        # the queries in two batches of the same program as the scores.
        dense = Attributor(model, random_rows(10, 12, 40, 0, "t"), cfg,
                           progress=False).attribute(queries)
    assert first["stats"] == 1 and first["rows"] == 1, first
    with traces() as again:
        # Other rows of the same shape, more batches, another checkpoint of the architecture,
        # and the top-k merge on the device.
        Attributor(other, random_rows(23, 12, 40, 2, "t"), cfg, progress=False).attribute(queries)
        top = Attributor(model, random_rows(10, 12, 40, 0, "t"),
                         AttributeConfig(topk=3, scores="topk",
                                         closed_form=ClosedFormConfig(batch_size=4)),
                         progress=False).attribute(queries)
    assert again["stats"] == 0 and again["rows"] == 0, again
    assert again["_merge_top_device"] == 1, again
    for q in range(len(queries)):
        for a, b in zip(dense.top(q, 3), top.top(q, 3)):
            assert [i for i, _ in a] == [i for i, _ in b]
            np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-6)


def test_factor_sums_fold_to_float64_on_the_host(monkeypatch):
    """The device keeps float32 partial sums for at most _FOLD_BATCHES batches; the result does
    not depend on how often they are folded."""
    import stride_jax.train._closed_form as cf
    lm = from_causal_lm(_model(12), 0)
    rows = random_rows(30, 12, 40, 3, "t")
    cfg = ClosedFormConfig(batch_size=4)
    a = fit_factors(lm, rows, "logits", cfg, key=jax.random.key(0))
    monkeypatch.setattr(cf, "_FOLD_BATCHES", 1)
    b = fit_factors(lm, rows, "logits", cfg, key=jax.random.key(0))
    assert a.tokens == b.tokens == 30 * 11
    np.testing.assert_allclose(a.eig_s, b.eig_s, rtol=1e-5, atol=1e-9)
    # The metric (S + lambda)^-1 = T T^T (eigenvectors of near-equal eigenvalues may rotate).
    ma, mb = a.t_out @ a.t_out.T, b.t_out @ b.t_out.T
    np.testing.assert_allclose(ma, mb, rtol=1e-4, atol=1e-5 * np.abs(ma).max())


def test_bfloat16_layers_keep_the_scores():
    """closed_form.dtype=bfloat16: the frozen layers and the projection in bfloat16, everything
    after the head in float32; the scores stay those of float32 up to bfloat16 rounding. auto is
    the model's own dtype on a CPU."""
    from stride_jax.train import compute_dtype
    model = _model(14)
    train, queries = random_rows(24, 12, 40, 4, "t"), random_rows(4, 12, 40, 5, "q")

    def scores(dtype, max_dim=1 << 18):
        cfg = AttributeConfig(closed_form=ClosedFormConfig(dtype=dtype, max_dim=max_dim))
        return Attributor(model, train, cfg, progress=False).attribute(queries).scores_qn

    assert compute_dtype(ClosedFormConfig(dtype="auto"), "cpu") == "model"
    assert compute_dtype(ClosedFormConfig(dtype="auto"), "gpu") == "bfloat16"
    for max_dim in (1 << 18, 16 * 16):        # exact, and projected to k = 16 of C = 40
        f32, bf16 = scores("model", max_dim), scores("bfloat16", max_dim)
        assert not np.array_equal(f32, bf16)           # it did run in bfloat16
        for q in range(len(queries)):
            assert np.corrcoef(f32[q], bf16[q])[0, 1] > 0.99
        np.testing.assert_allclose(bf16, f32, atol=0.05 * np.abs(f32).max())


def test_projected_scores_are_continuous_in_the_factors():
    """Beyond max_dim the whitened output side is projected; the whitening is the symmetric
    root of S, so float rounding of the factor sums (another batch size) moves the projected
    scores by rounding only. (Q_S D^1/2 alone rotated with near-equal eigenvalues: in effect
    another random projection, scores correlated 0.6-0.9 with bfloat16 factors.)"""
    model = _model(14)
    train, queries = random_rows(24, 12, 40, 4, "t"), random_rows(4, 12, 40, 5, "q")
    out = []
    for batch, dtype in ((4, "model"), (7, "model"), (4, "bfloat16")):
        cfg = AttributeConfig(closed_form=ClosedFormConfig(batch_size=batch, dtype=dtype,
                                                           max_dim=16 * 16))
        out.append(Attributor(model, train, cfg, progress=False).attribute(queries).scores_qn)
    np.testing.assert_allclose(out[1], out[0], rtol=1e-3, atol=1e-4 * np.abs(out[0]).max())
    for q in range(len(queries)):
        assert np.corrcoef(out[0][q], out[2][q])[0, 1] > 0.999
