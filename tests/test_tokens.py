"""Per-token attribution: planted effects are recovered, per-token effects add up to the query's,
and per-token responses average to the query-level responses."""

from __future__ import annotations

import numpy as np

from stride_jax.apps.tokens import token_effects
from stride_jax.attributor import AttributeConfig, Attributor, DesignConfig
from stride_jax.data import TokenizedSet
from stride_jax.model.config import tiny_llama
from stride_jax.model.transformer import init_model
from stride_jax.solve import SolveConfig
from stride_jax.steering import SteeringConfig
from stride_jax.subsets import expander_design
from stride_jax.train import OperatorTrainConfig

import jax


def test_planted_per_token_effects_are_recovered():
    design = expander_design(200, 60, 6, key=jax.random.key(0))
    M = design.to_dense(np.float64)                          # [K, n]
    rng = np.random.default_rng(0)
    listed = [3, 17, 42, 199]
    E = rng.normal(size=(len(listed), 9))                    # [L, T]
    y_tk = (M[:, listed] @ E + rng.normal(size=(1, 9))).T    # per-token intercepts
    got = token_effects(design, y_tk, listed)
    np.testing.assert_allclose(got, E, atol=1e-4)


def test_per_token_effects_average_to_the_query_level_refit():
    design = expander_design(120, 40, 5, key=jax.random.key(1))
    rng = np.random.default_rng(1)
    y_tk = rng.normal(size=(7, 40))
    listed = [0, 5, 9]
    per_token = token_effects(design, y_tk, listed)
    whole = token_effects(design, y_tk.mean(0, keepdims=True), listed)
    np.testing.assert_allclose(per_token.mean(1), whole[:, 0], atol=1e-12)


def _rows(n, seed, prefix):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 64, (n, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    loss = mask.copy()
    loss[:, -1] = 0
    loss[0, :4] = 0                                           # a prompt: unscored tokens
    names = [f"{prefix}{i}" for i in range(n)]
    return TokenizedSet(names, ids, mask, loss, names)


def test_token_responses_average_to_query_responses_and_report_shape():
    model = init_model(tiny_llama(vocab_size=64, hidden_size=16, num_heads=2, num_kv_heads=1,
                                  head_dim=8, intermediate_size=32, num_layers=2), seed=0)
    cfg = AttributeConfig(
        operators="trained",
        design=DesignConfig(num_subsets=16, per_example=3), steering=SteeringConfig(rank=4),
        train=OperatorTrainConfig(epochs=2, subsets_per_step=16, rows_per_subset=2,
                                  stability_rows=2, tokens_per_row=4),
        solve=SolveConfig(estimator="lasso", lam=1e-4), topk=3)
    train, queries = _rows(40, 0, "t"), _rows(3, 1, "q")
    att = Attributor(model, train, cfg, progress=False)
    result = att.attribute(queries)
    tok = att.token_responses(queries)
    w = queries.loss_mask.astype(np.float64)
    mean = np.einsum("qtk,qt->qk", tok.y_qtk, w) / w.sum(1)[:, None]
    np.testing.assert_allclose(mean, result.y_qk, rtol=1e-5, atol=1e-7)
    assert np.all(tok.y_qtk[queries.loss_mask == 0] == 0)
    report = att.token_attribution(queries, result, decode=lambda ids: f"<{ids[0]}>")
    assert [r["query_id"] for r in report["queries"]] == list(queries.ids)
    for q, rec in enumerate(report["queries"]):
        n_scored = int(queries.loss_mask[q].sum())
        assert len(rec["tokens"]) == len(rec["base_logprob"]) == n_scored
        pro, opp = result.top(q, 3)
        assert [e["index"] for e in rec["examples"]] == [i for i, _ in pro] + [i for i, _ in opp]
        for e in rec["examples"]:
            assert len(e["effect"]) == n_scored and np.isfinite(e["effect"]).all()
