"""Forward-pass and training-step throughput: our jitted JAX model vs. transformers' PyTorch model.

Both frameworks run the *same* weights: our randomly initialised model is exported with
:func:`stride_jax.model.hf.to_hf` and loaded with ``AutoModelForCausalLM.from_pretrained``. Every
measurement is float32 on CPU, same batch shapes, in one process (one framework at a time, so
their thread pools do not compete).

* forward: ours is ``jax.jit`` of the whole model (``nnx.merge`` inside); PyTorch is eager under
  ``torch.no_grad()`` with ``use_cache=False`` and HF's default attention implementation.
* train: one full-model AdamW step on the mean next-token cross entropy (ours: ``optax.adamw`` +
  ``optax.softmax_cross_entropy_with_integer_labels``, jitted with the parameters and optimizer
  state donated; PyTorch: ``loss.backward(); optimizer.step(); optimizer.zero_grad()`` with
  ``torch.optim.AdamW``).

Compile time (JAX: trace + lower + XLA compile, measured ahead of time) and the first call are
reported separately from the steady state (median of ``--repeat`` timed calls after a warm-up).

Usage::

    python benchmarks/forward.py                      # both configs
    python benchmarks/forward.py --configs tiny --quick
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import (machine_info, print_table, time_first_call,
                         timeit_uncontended, wait_for_idle, write_results)
else:  # pragma: no cover - imported as benchmarks.forward
    from ._common import (machine_info, print_table, time_first_call,
                          timeit_uncontended, wait_for_idle, write_results)

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stride_jax.model import ModelConfig, init_model, tiny_llama
from stride_jax.model.hf import to_hf

LR = 1e-4
WEIGHT_DECAY = 0.01

# Shared-machine guard (set from the command line): retry a measurement while other processes
# used more than MAX_OTHER_CPU of the machine during it.
MEASURE = {"max_other_cpu": 0.1, "attempts": 3, "wait_s": 60.0}


def _measure(fn, *, warmup: int, repeat: int) -> dict:
    return timeit_uncontended(fn, warmup=warmup, repeat=repeat, **MEASURE)


def smollm2_135m() -> ModelConfig:
    """SmolLM2-135M's architecture (weights are random here)."""
    return ModelConfig(family="llama", vocab_size=49152, hidden_size=576, num_layers=30,
                       num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
                       max_position_embeddings=2048, norm_eps=1e-5, rope_theta=100000.0,
                       tie_word_embeddings=True)


CONFIGS = {
    "tiny": (lambda: tiny_llama(vocab_size=2048), 32, 64),
    "smollm2-135m": (smollm2_135m, 4, 128),
}


# ----------------------------------------------------------------------------------------------
# Ours (JAX)
# ----------------------------------------------------------------------------------------------

def _next_token_loss(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def bench_jax(model, ids_np: np.ndarray, *, warmup: int, repeat: int, train_steps: int) -> dict:
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(ids_np, dtype=jnp.int32)
    n_tok = ids_np.size
    out: dict = {}

    # Forward -----------------------------------------------------------------------------------
    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids)

    t0 = time.perf_counter()
    fwd = jax.jit(forward).lower(state, ids).compile()
    compile_s = time.perf_counter() - t0
    first_s = time_first_call(lambda: fwd(state, ids))
    stats = _measure(lambda: fwd(state, ids), warmup=warmup, repeat=repeat)
    logits = np.asarray(fwd(state, ids))
    out["forward"] = dict(compile_s=compile_s, first_call_s=first_s, **stats,
                          tokens_per_s=n_tok / stats["median_s"])

    # Train step --------------------------------------------------------------------------------
    tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)

    def loss_fn(params, ids):
        return _next_token_loss(nnx.merge(graphdef, params)(ids), ids)

    def train_step(params, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    # Train on a copy so the forward's weights (shared with torch) stay untouched.
    params = jax.tree.map(jnp.copy, state)
    opt_state = tx.init(params)
    t0 = time.perf_counter()
    step = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, ids).compile()
    compile_s = time.perf_counter() - t0

    carry = {"params": params, "opt": opt_state}
    losses = []

    def run():
        carry["params"], carry["opt"], loss = step(carry["params"], carry["opt"], ids)
        losses.append(loss)
        return loss

    first_s = time_first_call(run)
    stats = _measure(run, warmup=warmup, repeat=train_steps)
    out["train"] = dict(compile_s=compile_s, first_call_s=first_s, **stats,
                        tokens_per_s=n_tok / stats["median_s"],
                        losses=[float(x) for x in losses])
    # Free the trained copy before the next framework runs (the closure keeps `carry` alive, so
    # empty it rather than `del` a name the closure reads).
    carry.clear()
    del params, opt_state
    return out, logits


# ----------------------------------------------------------------------------------------------
# transformers (PyTorch eager)
# ----------------------------------------------------------------------------------------------

def bench_torch(hf_dir: Path, ids_np: np.ndarray, *, warmup: int, repeat: int,
                train_steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids = torch.from_numpy(ids_np.astype(np.int64))
    n_tok = ids_np.size
    out: dict = {"attn_implementation": getattr(model.config, "_attn_implementation", None)}

    # Forward -----------------------------------------------------------------------------------
    model.eval()

    def forward():
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits

    first_s = time_first_call(forward)
    stats = _measure(forward, warmup=warmup, repeat=repeat)
    logits = forward().numpy()
    out["forward"] = dict(compile_s=None, first_call_s=first_s, **stats,
                          tokens_per_s=n_tok / stats["median_s"])

    # Train step --------------------------------------------------------------------------------
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    losses = []

    def train_step():
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        return None

    first_s = time_first_call(train_step)
    stats = _measure(train_step, warmup=warmup, repeat=train_steps)
    out["train"] = dict(compile_s=None, first_call_s=first_s, **stats,
                        tokens_per_s=n_tok / stats["median_s"],
                        losses=losses)
    # Free the model's gradients and optimiser state (the closures read `model` and `opt`).
    opt.zero_grad(set_to_none=True)
    opt.state.clear()
    return out, logits


# ----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny,smollm2-135m",
                   help=f"comma-separated, from {sorted(CONFIGS)}")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed calls per measurement (default 10 for tiny, 3 for larger; "
                        "--quick: 3 / 1)")
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: the number of usable cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="on a shared machine, wait up to SECONDS for the CPUs to be idle first")
    p.add_argument("--max-other-cpu", type=float, default=0.1,
                   help="retry a measurement when other processes used more than this share of "
                        "the CPUs during it (default 0.1)")
    p.add_argument("--attempts", type=int, default=3, help="measurement attempts (default 3)")
    p.add_argument("--attempt-wait", type=float, default=60.0, metavar="SECONDS",
                   help="before a retry, wait up to SECONDS for idle CPUs (default 60)")
    p.add_argument("--name", default="forward", help="results file name (benchmarks/results/NAME.json)")
    args = p.parse_args(argv)

    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {sorted(CONFIGS)}")

    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    MEASURE.update(max_other_cpu=args.max_other_cpu, attempts=args.attempts,
                   wait_s=args.attempt_wait)
    busy = wait_for_idle(args.wait_idle)
    if busy is not None and busy > 0.2:
        print(f"WARNING: the CPUs were {100 * busy:.0f}% busy before starting (other processes); "
              "timings will be pessimistic and noisy, torch's OpenMP pool especially",
              file=sys.stderr, flush=True)
    cores = machine_info()["cpu_count"]
    threads = args.threads or cores
    torch.set_num_threads(threads)
    print(f"torch.set_num_threads({threads}) [cores={cores}]; jax devices: {jax.devices()}",
          flush=True)

    results = {}
    rows = []
    for name in names:
        make_config, batch, seq = CONFIGS[name]
        config = make_config()
        small = config.num_params() < 20_000_000
        repeat = args.repeat or ((3 if small else 1) if args.quick else (10 if small else 3))
        warmup = 1
        print(f"\n== {name}: {config.num_params() / 1e6:.1f}M params, batch {batch} x seq {seq}, "
              f"repeat {repeat}", flush=True)
        model = init_model(config, seed=args.seed)
        ids = np.random.default_rng(args.seed).integers(0, config.vocab_size, (batch, seq),
                                                        dtype=np.int64)
        ours, ours_logits = bench_jax(model, ids, warmup=warmup, repeat=repeat, train_steps=repeat)
        with tempfile.TemporaryDirectory(prefix="stride_bench_") as tmp:
            to_hf(model, tmp)
            del model
            theirs, torch_logits = bench_torch(Path(tmp), ids, warmup=warmup, repeat=repeat,
                                               train_steps=repeat)
        diff = float(np.max(np.abs(ours_logits - torch_logits)))
        del ours_logits, torch_logits
        entry = {
            "config": {k: v for k, v in config.__dict__.items() if k != "rope_scaling"},
            "num_params": config.num_params(),
            "batch": batch, "seq": seq, "tokens_per_call": batch * seq,
            "warmup": warmup, "repeat": repeat,
            "max_abs_logit_diff": diff,
            "jax": ours, "torch": theirs,
        }
        for phase in ("forward", "train"):
            j, t = ours[phase], theirs[phase]
            entry.setdefault("ratio_ours_over_torch", {})[phase] = (
                j["tokens_per_s"] / t["tokens_per_s"])
            for fw, r in (("jax (ours)", j), ("torch eager", t)):
                rows.append({"config": name, "phase": phase, "framework": fw,
                             "compile_s": r["compile_s"], "first_call_s": r["first_call_s"],
                             "step_ms": 1e3 * r["median_s"], "tokens/s": r["tokens_per_s"],
                             "ours/torch": (j["tokens_per_s"] / t["tokens_per_s"]
                                            if fw.startswith("jax") else None),
                             "other_cpu": r["other_cpu"]})
        print(f"   max |logits_jax - logits_torch| = {diff:.2e}; "
              f"train losses jax {ours['train']['losses'][:2]} torch {theirs['train']['losses'][:2]}",
              flush=True)
        results[name] = entry

    print()
    print_table(rows, ["config", "phase", "framework", "compile_s", "first_call_s", "step_ms",
                       "tokens/s", "ours/torch", "other_cpu"])
    path = write_results(args.name, {
        "description": "tokens/s of a float32 CPU forward pass and AdamW training step, "
                       "jitted JAX (stride_jax) vs transformers PyTorch eager, same weights",
        "torch_num_threads": threads,
        "cpu_busy_before_start": busy,
        "notes": {
            "jax_forward": "jax.jit of the whole model; compile_s = trace+lower+compile (AOT)",
            "jax_train": "jax.jit(value_and_grad + optax.adamw), params/opt state donated",
            "torch_forward": "eager, torch.no_grad(), use_cache=False",
            "torch_train": "loss.backward(); AdamW.step(); zero_grad() (torch defaults)",
            "first_call_s": "one call after compile (jax) / the very first call (torch)",
            "tokens_per_s": "batch*seq / median steady-state seconds per call",
            "other_cpu": "share of all CPU time used by other processes during the timed calls; "
                         "above ~0.1 the numbers are contaminated (torch's OpenMP pool suffers "
                         "most: with all cores oversubscribed each parallel region waits for a "
                         "scheduler slice)",
            "attempts": "a measurement is retried (after waiting for idle CPUs) while other_cpu "
                        "exceeds measure_guard.max_other_cpu; the least contended attempt is kept",
        },
        "measure_guard": dict(MEASURE),
        "results": results,
    })
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
