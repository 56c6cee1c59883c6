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
from stride_jax.parallel.memory import (RUNTIME, MemoryBudgetError, Shapes, parse_bytes,
                                        plan_memory)
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
        operators="trained",
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
    resident = params + 4 * n * T * 64 + 12 * n * T + RUNTIME   # params, cache, tokens
    est_train = st["train"].device - resident
    est_measure = st["measure"].device - params
    xla_train = train_mem["temp"] + train_mem["argument"]
    xla_measure = measure_mem["temp"] + measure_mem["argument"]
    # Calibrated constants, not fitted per shape: never below XLA's own numbers (the process
    # needs more: test_measurement_plan_covers_the_process), within a factor of 2.5 above.
    assert 1.0 <= est_train / xla_train <= 2.5, (est_train, train_mem)
    assert 1.0 <= est_measure / xla_measure <= 2.5, (est_measure, measure_mem)


TRAINED = AttributeConfig(operators="trained")
SHAPES = Shapes(n=4332, seq_len=64, num_queries=200, d_reader=128, d_final=128, vocab=2048,
                params_bytes=3_000_000, upper_layers=0)


def test_budget_lowers_only_result_neutral_chunks():
    cfg = AttributeConfig(operators="trained",
                          measure=MeasureConfig(query_batch=64, subset_chunk=256),
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
        plan_memory(TRAINED, SHAPES, budget="1600MiB")
    million = dataclasses.replace(SHAPES, n=1_000_000)
    in_memory = AttributeConfig(operators="trained", cache=CacheConfig(location="memory"))
    with pytest.raises(MemoryBudgetError, match=r"the cache stage needs about 6[0-9.]+ GiB"):
        plan_memory(in_memory, million, budget="24GiB")


def test_disk_cache_keeps_the_plan_flat_in_n():
    """With the cache on disk (cache.location auto picks it above memory_limit) neither the host
    nor the device holds it: n = 1M fits 24 GiB, and bfloat16 halves what is on disk."""
    million = dataclasses.replace(SHAPES, n=1_000_000)
    plan = plan_memory(AttributeConfig(operators="trained", cache=CacheConfig(dtype="bfloat16")),
                       million, budget="24GiB")
    st = {s.stage: s for s in plan.stages}
    assert "bfloat16 on disk" in st["cache"].detail
    small = {s.stage: s for s in plan_memory(AttributeConfig(operators="trained", cache=CacheConfig(
        location="disk")), SHAPES).stages}
    # Only the O(n) token arrays and design grow with n, not the n x T x (D + d) activations.
    grow = st["train"].device - small["train"].device
    assert grow < 20 * (million.n - SHAPES.n) * million.seq_len
    with pytest.raises(ValueError, match="cache.location=disk needs a run directory"):
        plan_memory(AttributeConfig(operators="trained", cache=CacheConfig(location="disk")),
                    SHAPES, has_workdir=False)


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2 ** 30 and parse_bytes("8 GB") == 8 * 10 ** 9
    assert parse_bytes("512MiB") == 512 * 2 ** 20 and parse_bytes(1000) == 1000
    with pytest.raises(ValueError, match="write e.g. 24GiB"):
        parse_bytes("lots")


def test_plan_follows_topk_scores_and_fsdp():
    import dataclasses

    from stride_jax.parallel import ParallelConfig
    big = dataclasses.replace(SHAPES, n=1_000_000, num_queries=1000, params_bytes=8 * 2 ** 30)
    cfg = TRAINED
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


def test_measurement_plan_covers_the_process():
    """Issue 16: the plan said 11.1 GiB for the measurement and the process reached 23-24 GB. On
    the CPU the vmapped measurement chunk holds about twice what XLA's analysis reports; the
    plan counts what the process really holds (measured in a fresh process: its peak resident
    memory during the stage, above what it held before), within a factor of 2."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    here = Path(__file__).parent
    env = dict(os.environ, JAX_PLATFORMS="cpu", STRIDE_JAX_CACHE="off",
               PYTHONPATH=os.pathsep.join([str(here.parent), str(here),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(here / "_memory_worker.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(next(x for x in proc.stdout.splitlines()
                        if x.startswith("REPORT "))[len("REPORT "):])
    used = r["peak"] - r["before"]
    planned = r["plan_host"] + r["plan_device"] - RUNTIME - r["resident_counted"]
    assert used <= planned <= 2 * used, (used, planned, r)


@pytest.mark.parametrize("V, d, T, B, site, max_dim", [
    (1024, 32, 32, 8, "logits", 1 << 18),           # full Fisher, no projection
    (4096, 64, 64, 16, "logits", 1 << 14),          # diagonal Fisher, projected to k = 256
    (2048, 64, 48, 8, "final_hidden", 1 << 18),
])
def test_closed_form_estimates_track_xla_compiled_memory(V, d, T, B, site, max_dim):
    """The default path's stages against XLA's analysis of the real kernels (the factor pass's
    and the query/score pass's program): never below it, within a factor of 2."""
    import jax.numpy as jnp
    import numpy as np

    from stride_jax.train import ClosedFormConfig, fit_factors
    from stride_jax.train import _closed_form as cf
    from stride_jax.train._train import _memory_analysis
    model = init_model(tiny_llama(vocab_size=V, hidden_size=d, num_heads=2, num_kv_heads=1,
                                  head_dim=d // 2, intermediate_size=2 * d, num_layers=2),
                       seed=0)
    lm = from_causal_lm(model, 0)
    rows, Q = random_rows(B, T, V, 0), 6
    ccfg = ClosedFormConfig(batch_size=B, max_dim=max_dim, full_metric_limit=2048)
    factors = fit_factors(lm, rows, site, ccfg, key=jax.random.key(0))
    batch = cf._batch_arrays(rows, np.arange(B))
    C = V if site == "logits" else d
    full = C <= ccfg.full_metric_limit
    sums = {"a": jnp.zeros((d, d)), "p": jnp.zeros(V), "n": jnp.zeros(()),
            "pp": jnp.zeros((C, C) if (full or site != "logits") else (C,))}
    xla_stats = sum(_memory_analysis(cf._stat_fn(lm, site, full), sums, lm.params,
                                     *batch).values())
    xla_rows = sum(_memory_analysis(cf._rows_fn(lm, site), lm.params,
                                    jnp.asarray(factors.t_phi), jnp.asarray(factors.t_out),
                                    jnp.zeros((Q, factors.dim)), *batch).values())
    params = sum(x.nbytes for x in jax.tree.leaves(lm.params))
    cfg = AttributeConfig(steering=SteeringConfig(site=site), closed_form=ccfg)
    st = {s.stage: s for s in plan_memory(cfg, Shapes(
        n=100, seq_len=T, num_queries=Q, d_reader=d, d_final=d, vocab=V,
        params_bytes=params)).stages}
    assert 1.0 <= st["factors"].device / xla_stats <= 2.0, (st["factors"], xla_stats)
    for stage in ("queries", "scores"):
        assert 1.0 <= st[stage].device / xla_rows <= 2.0, (st[stage], xla_rows)


def test_a_cpu_budget_covers_host_and_devices_together():
    """On a CPU the devices are the host's memory: the budget bounds both at once, and the
    closed form fits by lowering its batch size (result-neutral) or refuses by name."""
    cfg = AttributeConfig(closed_form=dataclasses.replace(AttributeConfig().closed_form,
                                                          batch_size=64))
    free = plan_memory(cfg, SHAPES)
    st = {s.stage: s for s in free.stages}
    total = max(s.host + s.device for s in free.stages)
    assert free.peak_host < total and free.peak_device < total
    fitted = plan_memory(cfg, SHAPES, budget=int(total * 0.9), unified=True)
    assert fitted.config.closed_form.batch_size < 64 and fitted.peak_total <= total * 0.9
    assert any(c.startswith("closed_form.batch_size: 64 -> ") for c in fitted.changes)
    # Separately each fits 0.9 x the total: without unified the plan would accept it as is.
    assert plan_memory(cfg, SHAPES, budget=int(total * 0.9)).changes == ()
    with pytest.raises(MemoryBudgetError, match=r"the \w+ stage needs about .*host and devices "
                                                r"together"):
        plan_memory(cfg, SHAPES, budget=RUNTIME, unified=True)
    assert st["scores"].host > RUNTIME
