"""Streamed operator training (each step's rows gathered on the host, the activation cache never
put on the device whole) equals in-memory training; an on-disk cache resumes and round-trips."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from stride_jax.model.config import tiny_llama
from stride_jax.model.transformer import init_model
from stride_jax.steering import SteeringConfig, from_causal_lm
from stride_jax.subsets import expander_design
from stride_jax.train import OperatorTrainConfig, build_cache, train_operators
from _tiny import random_rows


@pytest.fixture(scope="module")
def setup():
    model = init_model(tiny_llama(vocab_size=64, hidden_size=16, num_heads=2, num_kv_heads=1,
                                  head_dim=8, intermediate_size=32, num_layers=2), seed=0)
    lm = from_causal_lm(model, 0)
    data = random_rows(60, 12, 64, 0)
    return lm, data, build_cache(lm, data), expander_design(60, 16, 4, key=jax.random.key(0))


@pytest.mark.parametrize("site, linearity", [("logits", 0.0), ("residual", 0.0),
                                             ("final_hidden", 0.5)])
def test_streamed_training_equals_in_memory(setup, site, linearity):
    lm, data, cache, design = setup
    cfg = OperatorTrainConfig(epochs=3, subsets_per_step=8, rows_per_subset=3, stability_rows=4,
                              tokens_per_row=5, weight_linearity=linearity,
                              linearity_probe_rows=6, linearity_sketch_dim=8)
    steer = SteeringConfig(site=site, rank=4)
    a = train_operators(lm, cache, data, design, steer, cfg, key=jax.random.key(1), progress=False)
    b = train_operators(lm, cache, data, design, steer, cfg, key=jax.random.key(1), progress=False,
                        stream=True)
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(a.state.coef)).max() > 0


def test_attributor_disk_cache_streams_and_matches_memory(tmp_path):
    """cache.location=disk: memory-mapped cache under operators/, streamed steps, same scores;
    the cache is removed once the operators are saved. bfloat16 halves it, close scores."""
    import dataclasses

    from stride_jax.attributor import AttributeConfig, Attributor, CacheConfig, DesignConfig
    from stride_jax.solve import SolveConfig
    model = init_model(tiny_llama(vocab_size=64, hidden_size=16, num_heads=2, num_kv_heads=1,
                                  head_dim=8, intermediate_size=32, num_layers=2), seed=0)
    train, queries = random_rows(50, 10, 64, 0), random_rows(3, 10, 64, 1)
    cfg = AttributeConfig(
        operators="trained",
        design=DesignConfig(num_subsets=16, per_example=3), steering=SteeringConfig(rank=4),
        train=OperatorTrainConfig(epochs=2, subsets_per_step=8, rows_per_subset=2,
                                  stability_rows=2, tokens_per_row=4),
        solve=SolveConfig(estimator="ridge", lam=1e-2))
    mem = Attributor(model, train, cfg, workdir=tmp_path / "m", progress=False).attribute(queries)
    disk_cfg = dataclasses.replace(cfg, cache=CacheConfig(location="disk"))
    disk = Attributor(model, train, disk_cfg, workdir=tmp_path / "d",
                      progress=False).attribute(queries)
    np.testing.assert_allclose(disk.scores_qn, mem.scores_qn, rtol=1e-4, atol=1e-7)
    assert not (tmp_path / "d" / "operators" / "cache").exists()
    auto_cfg = dataclasses.replace(cfg, cache=CacheConfig(memory_limit="1KiB"))
    att = Attributor(model, train, auto_cfg, workdir=tmp_path / "a", progress=False)
    assert att._cache_on_disk()
    bf = dataclasses.replace(cfg, cache=CacheConfig(location="disk", dtype="bfloat16"))
    half = Attributor(model, train, bf, workdir=tmp_path / "b", progress=False).attribute(queries)
    corr = np.corrcoef(half.scores_qn.ravel(), mem.scores_qn.ravel())[0, 1]
    # bfloat16 activations are a real (small) change, not a no-op.
    assert corr > 0.99 and not np.array_equal(half.scores_qn, mem.scores_qn), corr


def test_disk_cache_build_resumes_and_round_trips_bfloat16(setup, tmp_path):
    lm, data, cache, _ = setup
    disk = build_cache(lm, data, directory=tmp_path / "c", dtype="bfloat16", batch_size=16)
    assert disk.reader.dtype.name == "bfloat16" and isinstance(disk.reader, np.memmap)
    np.testing.assert_allclose(np.asarray(disk.reader, np.float32), cache.reader, rtol=1e-2,
                               atol=1e-2)
    again = build_cache(lm, data, directory=tmp_path / "c", dtype="bfloat16", batch_size=16)
    np.testing.assert_array_equal(np.asarray(again.final, np.float32),
                                  np.asarray(disk.final, np.float32))


def test_killed_cache_build_resumes_from_its_last_mark(setup, tmp_path, monkeypatch):
    import json

    import stride_jax.train._cache as cache_mod
    lm, data, cache, _ = setup
    row_bytes = data.seq_len * (lm.d_reader + lm.d_final) * 4
    monkeypatch.setattr(cache_mod, "MARK_BYTES", 32 * row_bytes)   # a mark every 2 batches
    calls = {"n": 0}
    real = cache_mod._feature_fn

    def dying(*a, **k):
        run = real(*a, **k)

        def once(*args):
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt   # killed during the 4th batch
            return run(*args)
        return once

    monkeypatch.setattr(cache_mod, "_feature_fn", dying)
    with pytest.raises(KeyboardInterrupt):
        build_cache(lm, data, directory=tmp_path / "c", batch_size=16)
    assert json.loads((tmp_path / "c" / "cache.json").read_text())["rows_done"] == 32
    monkeypatch.setattr(cache_mod, "_feature_fn", real)
    again = build_cache(lm, data, directory=tmp_path / "c", batch_size=16)
    whole = build_cache(lm, data, batch_size=16)   # same batch shape, never interrupted
    np.testing.assert_array_equal(np.asarray(again.reader), whole.reader)
    np.testing.assert_array_equal(np.asarray(again.final), whole.final)
    assert json.loads((tmp_path / "c" / "cache.json").read_text())["rows_done"] == len(data)
