"""Memory planning: per-stage estimates agree with XLA's own compiled-memory analysis, a budget
lowers only result-neutral chunk sizes, and an impossible budget is refused by name."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from stride_jax.attributor import AttributeConfig, CacheConfig, DesignConfig
from stride_jax.measure import MeasureConfig, measure_responses
from stride_jax.model.config import tiny_llama
from stride_jax.model.transformer import init_model
from stride_jax.parallel.memory import (MemoryBudgetError, Shapes, parse_bytes, plan_memory)
from stride_jax.solve import SolveConfig
from stride_jax.steering import SteeringConfig, from_causal_lm
from stride_jax.subsets import expander_design
from stride_jax.train import OperatorTrainConfig, build_cache, train_operators
from _tiny import random_rows


@pytest.mark.parametrize("site, V", [("logits", 1024), ("final_hidden", 1024), ("residual", 512)])
def test_estimates_track_xla_compiled_memory(site, V):
    T, n, K = 32, 120, 32
    model = init_model(tiny_llama(vocab_size=V, hidden_size=32, num_heads=2, num_kv_heads=1,
                                  head_dim=16, intermediate_size=64, num_layers=3), seed=0)
    lm = from_causal_lm(model, 1)
    train, queries = random_rows(n, T, V, 0), random_rows(6, T, V, 1)
    cfg = AttributeConfig(
        design=DesignConfig(num_subsets=K, per_example=4), steering=SteeringConfig(site=site, rank=8),
        train=OperatorTrainConfig(epochs=1, subsets_per_step=16, rows_per_subset=4,
                                  stability_rows=4, tokens_per_row=8),
        measure=MeasureConfig(query_batch=4, subset_chunk=16))
    design = expander_design(n, K, 4, key=jax.random.key(0))
    train_mem, measure_mem = {}, {}
    out = train_operators(lm, build_cache(lm, train), train, design, cfg.steering, cfg.train,
                          key=jax.random.key(1), progress=False, compiled_memory=train_mem)
    measure_responses(lm, site, out.state.basis, out.state.coef, queries, cfg.measure,
                      compiled_memory=measure_mem)
    params = sum(x.nbytes for x in jax.tree.leaves(lm.params))
    plan = plan_memory(cfg, Shapes(n=n, seq_len=T, num_queries=6, d_reader=32, d_final=32,
                                   vocab=V, params_bytes=params, upper_layers=1))
    st = {s.stage: s for s in plan.stages}
    resident = params + 4 * n * T * 64 + 12 * n * T       # replicated params, cache, tokens
    est_train = st["train"].device - resident
    est_measure = st["measure"].device - params
    xla_train = train_mem["temp"] + train_mem["argument"]
    xla_measure = measure_mem["temp"] + measure_mem["argument"]
    # Calibrated constants, not fitted per shape: within a factor of 2.5 either way.
    assert 0.4 <= est_train / xla_train <= 2.5, (est_train, train_mem)
    assert 0.4 <= est_measure / xla_measure <= 2.5, (est_measure, measure_mem)


SHAPES = Shapes(n=4332, seq_len=64, num_queries=200, d_reader=128, d_final=128, vocab=2048,
                params_bytes=3_000_000, upper_layers=0)


def test_budget_lowers_only_result_neutral_chunks():
    cfg = AttributeConfig(measure=MeasureConfig(query_batch=64, subset_chunk=256),
                          solve=SolveConfig(query_chunk=256))
    free = plan_memory(cfg, SHAPES)
    assert free.changes == () and free.config == cfg
    budget = int(free.peak_device * 0.8)
    assert max(s.device for s in free.stages if s.stage == "measure") > budget
    fitted = plan_memory(cfg, SHAPES, budget=budget)
    assert fitted.peak_device <= budget and fitted.peak_host <= budget
    assert fitted.config.train == cfg.train and fitted.config.design == cfg.design
    assert fitted.config.measure.subset_chunk < 256
    assert any(c.startswith("measure.subset_chunk: 256 -> ") for c in fitted.changes)
    assert "to fit: measure.subset_chunk" in fitted.format()


def test_impossible_budget_is_refused_naming_the_stage_and_the_fix():
    with pytest.raises(MemoryBudgetError, match=r"the train stage needs about .* train\."
                                                r"subsets_per_step"):
        plan_memory(AttributeConfig(), SHAPES, budget="600MiB")
    million = dataclasses.replace(SHAPES, n=1_000_000)
    in_memory = AttributeConfig(cache=CacheConfig(location="memory"))
    with pytest.raises(MemoryBudgetError, match=r"the cache stage needs about 6[0-9.]+ GiB"):
        plan_memory(in_memory, million, budget="24GiB")


def test_disk_cache_keeps_the_plan_flat_in_n():
    """With the cache on disk (cache.location auto picks it above memory_limit) neither the host
    nor the device holds it: n = 1M fits 24 GiB, and bfloat16 halves what is on disk."""
    million = dataclasses.replace(SHAPES, n=1_000_000)
    plan = plan_memory(AttributeConfig(cache=CacheConfig(dtype="bfloat16")), million,
                       budget="24GiB")
    st = {s.stage: s for s in plan.stages}
    assert "bfloat16 on disk" in st["cache"].detail
    small = {s.stage: s for s in plan_memory(AttributeConfig(cache=CacheConfig(
        location="disk")), SHAPES).stages}
    # Only the O(n) token arrays and design grow with n, not the n x T x (D + d) activations.
    grow = st["train"].device - small["train"].device
    assert grow < 20 * (million.n - SHAPES.n) * million.seq_len
    with pytest.raises(ValueError, match="cache.location=disk needs a run directory"):
        plan_memory(AttributeConfig(cache=CacheConfig(location="disk")), SHAPES,
                    has_workdir=False)


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2 ** 30 and parse_bytes("8 GB") == 8 * 10 ** 9
    assert parse_bytes("512MiB") == 512 * 2 ** 20 and parse_bytes(1000) == 1000
    with pytest.raises(ValueError, match="write e.g. 24GiB"):
        parse_bytes("lots")


def test_plan_follows_topk_scores_and_fsdp():
    import dataclasses

    from stride_jax.parallel import ParallelConfig
    big = dataclasses.replace(SHAPES, n=1_000_000, num_queries=1000, params_bytes=8 * 2 ** 30)
    cfg = AttributeConfig()
    solve = {s.stage: s for s in plan_memory(cfg, big).stages}["solve"]
    # 1000 x 1M float32 scores = 4 GB > scores_memory_limit (2 GiB): auto keeps the top k only.
    assert "scores top 10" in solve.detail
    dense = {s.stage: s for s in plan_memory(dataclasses.replace(cfg, scores="dense"),
                                             big).stages}["solve"]
    # The dense matrix against one block of 256 queries' scores and 2 x 10 entries per query.
    assert dense.host - solve.host == 4 * 1000 * 10 ** 6 - 4 * 256 * 10 ** 6 - 24 * 1000 * 10
    rep = plan_memory(cfg, big, devices=8).stages
    fsdp = plan_memory(dataclasses.replace(cfg, parallel=ParallelConfig(devices=8, model="fsdp")),
                       big, devices=8).stages
    for a, b in zip(rep, fsdp):
        if a.stage in ("cache", "train", "measure"):   # 7/8 of the 8 GiB weights leave each device
            assert a.device - b.device == 8 * 2 ** 30 - 2 ** 30
