"""Peak resident memory of one measurement chunk pass, in a fresh process (tests/test_memory.py).

Prints ``REPORT {json}``: the process's resident bytes before the measurement and its peak
during it (``VmHWM`` after resetting it), the bytes already resident that the plan's stage
counts (weights, operators), and the plan's estimate of the stage (host + device: on a CPU one
memory).
"""

from __future__ import annotations

import json

import jax


def resident() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                out[line.split()[0][:-1]] = int(line.split()[1]) * 1024
    return out


def main() -> None:
    from stride_jax.attributor import AttributeConfig, DesignConfig
    from stride_jax.measure import MeasureConfig, measure_responses
    from stride_jax.model.config import tiny_llama
    from stride_jax.model.transformer import init_model
    from stride_jax.parallel.memory import Shapes, plan_memory
    from stride_jax.steering import SteeringConfig, from_causal_lm, init_steering
    from _tiny import random_rows
    V, d, T, qb, sc, r = 4096, 64, 32, 8, 32, 16
    model = init_model(tiny_llama(vocab_size=V, hidden_size=d, num_heads=2, num_kv_heads=1,
                                  head_dim=32, intermediate_size=128, num_layers=2), seed=0)
    lm = from_causal_lm(model, 0)
    steering = SteeringConfig(site="logits", rank=r)
    ops = init_steering(steering, d_reader=d, d_out=V, num_subsets=sc, key=jax.random.key(0))
    coef = 0.01 * jax.random.normal(jax.random.key(1), ops["coef"].shape)
    queries = random_rows(qb, T, V, 1)
    params = sum(x.nbytes for x in jax.tree.leaves(lm.params))
    cfg = AttributeConfig(operators="trained", design=DesignConfig(num_subsets=sc, per_example=4),
                          steering=steering, measure=MeasureConfig(query_batch=qb,
                                                                   subset_chunk=sc))
    plan = {s.stage: s for s in plan_memory(cfg, Shapes(
        n=100, seq_len=T, num_queries=qb, d_reader=d, d_final=d, vocab=V,
        params_bytes=params)).stages}["measure"]
    before = resident()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:   # restart VmHWM from the current RSS
        f.write("5")
    measure_responses(lm, "logits", ops["basis"], coef, queries, cfg.measure)
    print("REPORT " + json.dumps({
        "before": before, "peak": resident()["VmHWM"],
        "resident_counted": params + int(coef.nbytes) + sum(
            x.nbytes for x in jax.tree.leaves(ops["basis"])),
        "plan_host": plan.host, "plan_device": plan.device}))


if __name__ == "__main__":
    main()
