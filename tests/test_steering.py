"""Steering operators, operator training and measurement: equivalences and failure modes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stride_jax.data import TokenizedSet
from stride_jax.measure import MeasureConfig, measure_responses
from stride_jax.model import init_model, tiny_llama
from stride_jax.steering import (SteeringConfig, basis_features, delta_logprob_and_kl,
                                 from_causal_lm, init_steering, resolve_layer)
from stride_jax.subsets import expander_design
from stride_jax.train import (CheckpointMismatchError, NonFiniteOperatorLossError,
                              OperatorTrainConfig, build_cache, gather_rows, make_sampler,
                              padded_members, responses, subset_schedule, train_operators)

SITES = ["logits", "final_hidden", "residual"]
N, T, V = 96, 16, 61


def _rows(n=N, t=T, seed=0, vocab=V) -> TokenizedSet:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (n, t)).astype(np.int32)
    att = np.ones_like(ids)
    loss = np.ones_like(ids)
    loss[:, -1] = 0
    # Some right padding, so masks matter.
    att[: n // 4, t - 3:] = 0
    loss[: n // 4, t - 4:] = 0
    return TokenizedSet([f"r{i}" for i in range(n)], ids, att, loss, [f"r{i}" for i in range(n)])


@pytest.fixture(scope="module")
def setup():
    model = init_model(tiny_llama(vocab_size=V, hidden_size=32, num_heads=2, num_kv_heads=1,
                                  head_dim=16, intermediate_size=64, num_layers=3,
                                  max_position_embeddings=32), seed=1)
    data = _rows()
    lm = from_causal_lm(model, 1)
    return model, data, lm, build_cache(lm, data)


SMALL_TRAIN = OperatorTrainConfig(epochs=2, subsets_per_step=8, rows_per_subset=4,
                                  stability_rows=8, tokens_per_row=6, log_every=1)


def _design(n=N, K=24, d=3, seed=0):
    return expander_design(n, K, d, key=jax.random.key(seed))


def test_default_layer_is_two_thirds_and_out_of_range_is_rejected():
    assert resolve_layer(SteeringConfig(), 30) == 19
    assert resolve_layer(SteeringConfig(), 2) == 0
    with pytest.raises(ValueError, match="out of range"):
        resolve_layer(SteeringConfig(layer=3), 3)
    with pytest.raises(ValueError, match="rank"):
        init_steering(SteeringConfig(rank=0), d_reader=4, d_out=4, num_subsets=2,
                      key=jax.random.key(0))


@pytest.mark.parametrize("site", SITES)
def test_zero_operator_reproduces_the_base_model(setup, site):
    model, data, lm, cache = setup
    params = init_steering(SteeringConfig(site=site), d_reader=32,
                           d_out=V if site == "logits" else 32, num_subsets=3,
                           key=jax.random.key(0))
    q = data.subset(range(10))
    y = measure_responses(lm, site, params["basis"], params["coef"], q).y_qk
    if site == "residual":
        # The upper layers are re-run in another compiled function: float32 round-off only.
        np.testing.assert_allclose(y, 0.0, atol=1e-6)
    else:
        np.testing.assert_array_equal(y, 0.0)


def test_zero_hook_reproduces_base_logits_exactly(setup):
    model, data, _, _ = setup
    ids = jnp.asarray(data.input_ids[:4])
    base = model(ids)
    for site in ("residual.1", "final_hidden", "logits"):
        steered = model(ids, hooks={site: lambda h: h + jnp.zeros_like(h)})
        np.testing.assert_array_equal(np.asarray(steered), np.asarray(base))


def test_closed_form_response_matches_float64_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 50)) * 3
    for scale in (1e-6, 1e-3, 0.3, 5.0):
        delta = rng.normal(size=(3, 5, 50)) * scale
        tgt = rng.integers(0, 50, (3, 5))
        base = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        p = np.exp(base)
        # float64 reference without cancellation: log E_p[e^delta] = log1p(E_p[expm1(delta)]).
        lse = np.log1p((p * np.expm1(delta)).sum(-1))
        ref_d = np.take_along_axis(delta, tgt[..., None], -1)[..., 0] - lse
        ref_kl = lse - (p * delta).sum(-1)
        d, kl = delta_logprob_and_kl(jnp.asarray(base, jnp.float32), jnp.asarray(delta, jnp.float32),
                                     jnp.asarray(tgt))
        # Relative precision must hold even when the responses are ~1e-6.
        np.testing.assert_allclose(np.asarray(d), ref_d, rtol=1e-3, atol=1e-5 * scale)
        np.testing.assert_allclose(np.asarray(kl), ref_kl, rtol=2e-3, atol=1e-6 * scale ** 2)


@pytest.mark.parametrize("site", SITES)
def test_vmap_over_subsets_equals_a_loop(setup, site):
    _, data, lm, cache = setup
    key = jax.random.key(3)
    params = init_steering(SteeringConfig(site=site), d_reader=32,
                           d_out=V if site == "logits" else 32, num_subsets=4, key=key)
    coef = jax.random.normal(key, params["coef"].shape) * 0.1
    cache_d = {"reader": jnp.asarray(cache.reader), "final": jnp.asarray(cache.final)}
    data_d = {"input_ids": jnp.asarray(data.input_ids),
              "attention_mask": jnp.asarray(data.attention_mask),
              "targets": jnp.asarray(data.target_ids())}
    rows = jnp.arange(5)
    pos = jnp.tile(jnp.arange(4), (5, 1))
    r = gather_rows(cache_d, data_d, rows, pos, jnp.ones((5, 4)), site)
    batched = jax.vmap(lambda c: responses(lm, site, params["basis"], c, r)[0])(coef)
    for k in range(4):
        np.testing.assert_allclose(np.asarray(batched[k]),
                                   np.asarray(responses(lm, site, params["basis"], coef[k], r)[0]),
                                   rtol=1e-5, atol=1e-6)


def test_per_subset_draws_do_not_depend_on_the_chunk(setup):
    _, data, _, _ = setup
    design = _design()
    members, sizes = padded_members(design)
    sample = make_sampler(members, sizes, data.loss_mask, SMALL_TRAIN, key=jax.random.key(0))
    a = sample(jnp.int32(5), jnp.asarray([3, 7, 11], jnp.int32))
    b = sample(jnp.int32(5), jnp.asarray([11, 2, 3], jnp.int32))
    np.testing.assert_array_equal(np.asarray(a.fid_rows[0]), np.asarray(b.fid_rows[2]))
    np.testing.assert_array_equal(np.asarray(a.fid_pos[2]), np.asarray(b.fid_pos[0]))
    # Drawn rows are members of their subset, at scored positions.
    for j, k in enumerate([3, 7, 11]):
        assert set(np.asarray(a.fid_rows[j]).tolist()) <= set(design.members(k).tolist())
    valid = np.asarray(a.fid_valid) > 0
    rows = np.asarray(a.fid_rows)[..., None].repeat(valid.shape[-1], -1)
    assert (data.loss_mask[rows[valid], np.asarray(a.fid_pos)[valid]] == 1).all()
    # Stability rows flagged as members really are members.
    mem = np.asarray(a.stab_member)
    for j, k in enumerate([3, 7, 11]):
        expect = np.isin(np.asarray(a.stab_rows), design.members(k))
        np.testing.assert_array_equal(mem[j] > 0, expect)


def test_subset_schedule_visits_every_subset_once_per_epoch():
    s = subset_schedule(10, 4, 3, key=jax.random.key(0))
    assert s.shape == (9, 4)
    for e in range(3):
        epoch = s[3 * e: 3 * e + 3].reshape(-1)
        assert set(epoch.tolist()) == set(range(10))
        for row in s[3 * e: 3 * e + 3]:
            assert len(set(row.tolist())) == 4  # no repeat inside a step


@pytest.mark.parametrize("site", SITES)
def test_operators_learn_their_own_subset(setup, site):
    """After training, each operator lowers its members' loss more than non-members' loss."""
    _, data, lm, cache = setup
    design = _design()
    cfg = dataclasses.replace(SMALL_TRAIN, epochs=6, learning_rate=3e-2)
    out = train_operators(lm, cache, data, design, SteeringConfig(site=site, rank=8), cfg,
                          key=jax.random.key(0), progress=False)
    assert out.history[-1]["fidelity"] < out.history[0]["fidelity"] - 1e-3
    y = measure_responses(lm, site, out.state.basis, out.state.coef, data).y_qk  # [n, K]
    member = design.to_dense().T.astype(bool)                                  # [n, K]
    assert y[member].mean() > y[~member].mean() + 1e-3


def test_measurement_does_not_depend_on_batching(setup):
    _, data, lm, cache = setup
    design = _design()
    out = train_operators(lm, cache, data, design, SteeringConfig(site="logits"), SMALL_TRAIN,
                          key=jax.random.key(0), progress=False)
    q = data.subset(range(13))
    a = measure_responses(lm, "logits", out.state.basis, out.state.coef, q,
                          MeasureConfig(query_batch=4, subset_chunk=5)).y_qk
    b = measure_responses(lm, "logits", out.state.basis, out.state.coef, q,
                          MeasureConfig(query_batch=13, subset_chunk=24)).y_qk
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert np.abs(a).max() > 1e-4  # trained operators respond


def test_training_resumes_from_a_checkpoint_with_identical_results(setup, tmp_path):
    _, data, lm, cache = setup
    design = _design()
    cfg = dataclasses.replace(SMALL_TRAIN, checkpoint_every=2)
    key = jax.random.key(5)
    whole = train_operators(lm, cache, data, design, SteeringConfig(), cfg, key=key,
                            progress=False)

    class Stop(Exception):
        pass

    def stop_at(step):
        if step == 4:
            raise Stop

    with pytest.raises(Stop):
        train_operators(lm, cache, data, design, SteeringConfig(), cfg, key=key, progress=False,
                        checkpoint_dir=tmp_path / "ck", fingerprint="a", on_step=stop_at)
    seen = []
    resumed = train_operators(lm, cache, data, design, SteeringConfig(), cfg, key=key,
                              progress=False, checkpoint_dir=tmp_path / "ck", fingerprint="a",
                              on_step=seen.append)
    assert seen[0] == 4  # steps 0-3 were checkpointed and not redone
    for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(CheckpointMismatchError, match="another run"):
        train_operators(lm, cache, data, design, SteeringConfig(), cfg, key=key, progress=False,
                        checkpoint_dir=tmp_path / "ck", fingerprint="b")


def test_nan_in_training_stops_with_step_and_subset(setup, tmp_path):
    _, data, lm, cache = setup
    design = _design()
    bad_reader = np.array(cache.reader)
    bad_reader[design.members(5)] = np.nan
    bad = cache._replace(reader=bad_reader)
    with pytest.raises(NonFiniteOperatorLossError,
                       match=r"at step \d+ of \d+ \(first bad subset: \d+\)"):
        train_operators(lm, bad, data, design, SteeringConfig(), SMALL_TRAIN,
                        key=jax.random.key(0), progress=False)


def test_queries_longer_than_the_context_or_with_foreign_tokens_are_rejected(setup):
    _, data, lm, _ = setup
    params = init_steering(SteeringConfig(), d_reader=32, d_out=V, num_subsets=2,
                           key=jax.random.key(0))
    long = _rows(n=2, t=40)
    with pytest.raises(ValueError, match="context"):
        measure_responses(lm, "logits", params["basis"], params["coef"], long)
    foreign = _rows(n=2, vocab=V + 10, seed=4)
    foreign.input_ids[0, 0] = V + 5
    with pytest.raises(ValueError, match="tokenizer does not match"):
        measure_responses(lm, "logits", params["basis"], params["coef"], foreign)
    empty = _rows(n=2)
    empty.loss_mask[1] = 0
    with pytest.raises(ValueError, match="no scored token"):
        measure_responses(lm, "logits", params["basis"], params["coef"], empty)


def test_basis_reads_normalised_activations():
    basis = {"w": jnp.eye(4)[:, :2]}
    h = jnp.asarray([[[1.0, 2.0, 3.0, 4.0]]])
    np.testing.assert_allclose(np.asarray(basis_features(basis, 10 * h)),
                               np.asarray(basis_features(basis, h)), rtol=1e-5)


def test_cheap_exact_logprob_change_matches_float64_reference():
    from stride_jax.steering import delta_logprob
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 7, 40)) * 3
    base = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    p = np.exp(base)
    for scale in (1e-6, 1e-3, 0.5, 200.0):
        delta = rng.normal(size=logits.shape) * scale
        tgt = rng.integers(0, 40, logits.shape[:2])
        z = base + delta
        m = z.max(-1, keepdims=True)
        lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
        if scale < 1:
            lse = np.log1p((p * np.expm1(delta)).sum(-1))
        ref = np.take_along_axis(delta, tgt[..., None], -1)[..., 0] - lse
        got = delta_logprob(jnp.asarray(base, jnp.float32), jnp.asarray(delta, jnp.float32),
                            jnp.asarray(tgt))
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-3, atol=1e-5 * scale)


def test_training_step_and_measurement_compile_once(setup):
    """Python-side trace counting: more steps or query batches must not trigger retracing."""
    _, data, lm, cache = setup
    design = _design()
    traces = {"n": 0}

    def counting_head(params, h):
        traces["n"] += 1  # runs only while JAX traces
        return lm.head(params, h)

    counted = dataclasses.replace(lm, head=counting_head)
    train_operators(counted, cache, data, design, SteeringConfig(), SMALL_TRAIN,
                    key=jax.random.key(0), progress=False)
    per_run = traces["n"]
    traces["n"] = 0
    train_operators(counted, cache, data, design, SteeringConfig(),
                    dataclasses.replace(SMALL_TRAIN, epochs=6), key=jax.random.key(0),
                    progress=False)
    assert traces["n"] == per_run  # 3x the steps, same number of traces
    params = init_steering(SteeringConfig(), d_reader=32, d_out=V, num_subsets=24,
                           key=jax.random.key(0))
    traces["n"] = 0
    measure_responses(counted, "logits", params["basis"], params["coef"], data.subset(range(20)),
                      MeasureConfig(query_batch=4, subset_chunk=8))
    once = traces["n"]
    traces["n"] = 0
    measure_responses(counted, "logits", params["basis"], params["coef"], data.subset(range(40)),
                      MeasureConfig(query_batch=4, subset_chunk=8))
    assert traces["n"] == once
