"""Time and peak memory of each STRIDE stage as n, K and Q grow (issue 5).

Each configuration runs the :class:`~stride_jax.attributor.Attributor` stages (``design()``,
``fit_operators()`` = activation cache + operator training, ``measure(queries)``,
``solve(responses)``) on synthetic data (uniform random tokens, every next token scored) in a
*fresh subprocess*, so every peak is that run's own. Per stage it records:

* wall time, the process's CPU time, and the share of the machine's CPU other processes used
  meanwhile (``other_cpu``: this machine is shared, so wall times are noisy);
* peak memory: ``VmRSS`` sampled every 50 ms by a background thread (also ``RssAnon``, the
  process's own allocations, and ``RssFile``, pages of memory-mapped files such as the on-disk
  cache, which the kernel can drop at will), plus the exact ``VmHWM`` high-water mark, reset at
  every stage boundary through ``/proc/self/clear_refs``;
* :func:`stride_jax.parallel.memory.plan_memory`'s estimate of the stage's peak (host + device:
  on a CPU both are the same RAM), printed next to the measurement;
* the on-disk activation cache's size (``cache.location=disk``), measured when training starts
  (the Attributor deletes it once the operators are saved).

Stages: ``design``, ``cache`` (one forward pass over the training rows), ``train`` (operator
training; ``checkpoint_s`` is the part spent in orbax saves), ``operators_io`` (the rest of
``fit_operators``: stamps with their fingerprint of the training rows, saving the operators,
removing the cache), ``measure`` and ``solve``; ``data`` (building the synthetic rows) and
``setup`` (imports, model init) are recorded but not part of ``total_s``. Times include JAX
compilation, as a user would see them.

Sweeps (``--sweep n,K,Q``, default all three):

* ``n``: n = 1k, 10k, 100k, 1M training rows of T = 64 tokens, K = 1000, Q = 16, on the "mini"
  model (the bundled tiny architecture at d = 64: 2 layers, 2 heads, SwiGLU 256, vocabulary 2048,
  randomly initialised), which halves the activation cache (1M rows: 16 GiB in bfloat16) and
  the forward pass while keeping the vocabulary-sized costs of training and measurement. Every n
  runs with ``cache.location=disk, dtype=bfloat16``; n < 100k also with the in-memory float32
  cache, for comparison.
* ``K``: K = 100, 500, 1000, 2000, 4000 at n = 10k, Q = 16, the bundled tiny model (``tiny``:
  ``tiny_llama()`` defaults, 2 layers, d = 128, vocabulary 2048, randomly initialised), memory
  cache.
* ``Q``: Q = 8, 64, 512 at n = 10k, K = 1000, the tiny model, memory cache.

STRIDE settings: the defaults of :class:`~stride_jax.attributor.AttributeConfig` (d = 40 subsets
per example, rank 32, ``logits`` site, 64 subsets per step, 8 + 8 rows per subset, 16 positions
per row, ``solve.estimator=auto``) except ``design.num_subsets=K``, ``train.epochs=2`` (default
20) and the cache settings above. Operator training takes ``ceil(K / subsets_per_step) * epochs``
steps (32 for K = 1000), *independent of n by design*; the per-step cost does not depend on n
either. So with enough n only the cache (and design, stamps) should grow, linearly.

Linearity: the script fits ``log t = a + b log n`` over the disk series for the total and each
stage (b = 1 is linear; fixed costs make b < 1 at small n), and ``t = t0 + c n`` (fixed cost plus
per-row cost).

Usage:
  python benchmarks/scaling.py [--sweep n,K,Q] [--max-n 100000] [--min-n N] [--n 1000,10000]
                               [--K 100,500] [--Q 8,64] [--timeout 2700] [--out PATH] [--quick]
                               [--fresh] [--keep] [--progress]

``--quick``: tiny sizes for a smoke run (a 16-wide model, n = 256 and 1024, K <= 32, Q <= 8,
T = 16, one epoch, d = 4, a fixed-penalty ridge solve, and a persistent XLA compilation cache
under the work directory: about a minute once that cache is warm, 2-3 minutes cold on a busy
2-core machine); it writes ``benchmarks/results/scaling_quick.json``.
Otherwise results go to ``benchmarks/results/scaling.json`` (``--out`` to change; the plot
lands next to it with a ``.png`` suffix). A run *merges* its configurations into an existing
results file (same configuration: replaced), so the sweeps can be run one at a time; ``--fresh``
starts the file anew. Run directories go to ``runs/scaling/<config>/`` and are removed after
each run unless ``--keep``. ``--timeout`` (seconds per configuration) kills a run that takes too
long; the partial measurements (finished stages, rows cached so far and the rate) are kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS_DIR, _json_default, _proc_stat_busy_total,  # noqa: E402
                     _self_ticks, machine_info, print_table)

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("design", "cache", "train", "operators_io", "measure", "solve")
ALL_STAGES = ("setup", "data") + STAGES

# Model architectures (tiny_llama overrides); every one randomly initialised with seed 0.
MODELS = {
    "tiny": {},   # the bundled tiny model: 2 layers, d=128, 4 heads (2 KV), SwiGLU 512, vocab 2048
    "mini": dict(hidden_size=64, num_heads=2, num_kv_heads=1, head_dim=32,
                 intermediate_size=256),                                    # vocab 2048
    "micro": dict(vocab_size=64, hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8,
                  intermediate_size=32),                                    # --quick only
}

FULL = dict(n=(1_000, 10_000, 100_000, 1_000_000), n_K=1000, n_Q=16, n_model="mini",
            disk_from=100_000, K=(100, 500, 1000, 2000, 4000), K_n=10_000, K_Q=16,
            Q=(8, 64, 512), Q_n=10_000, Q_K=1000, kq_model="tiny", T=64, epochs=2,
            per_example=None, solve=None)
QUICK = dict(n=(256, 1024), n_K=16, n_Q=4, n_model="micro", disk_from=512, K=(32,), K_n=256,
             K_Q=4, Q=(8,), Q_n=256, Q_K=16, kq_model="micro", T=16, epochs=1, per_example=4,
             solve="ridge, lam=0.01")


# ---------------------------------------------------------------------------------------------
# The worker: one configuration, in its own process
# ---------------------------------------------------------------------------------------------

def _status() -> dict[str, int]:
    """Memory counters of this process, bytes."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) * 1024
    return out


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class StageMonitor:
    """Wall/CPU time and peak memory per stage; a stage may be entered several times (summed)."""

    def __init__(self, interval: float = 0.05, on_tick=None):
        self.interval = interval
        self.stats: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.current: str | None = None
        self.hwm_reset_ok = _reset_hwm()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._on_tick = on_tick
        self._start_snapshot = None
        self.switch("setup")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _entry(self, name):
        if name not in self.stats:
            self.order.append(name)
            self.stats[name] = {"seconds": 0.0, "cpu_s": 0.0, "machine_busy_ticks": 0,
                                "machine_ticks": 0, "self_ticks": 0, "peak_rss": 0,
                                "peak_anon": 0, "peak_file": 0, "hwm": 0, "samples": 0}
        return self.stats[name]

    def _sample(self):
        try:
            s = _status()
        except OSError:
            return
        with self._lock:
            if self.current is None:
                return
            e = self._entry(self.current)
            e["peak_rss"] = max(e["peak_rss"], s.get("VmRSS", 0))
            e["peak_anon"] = max(e["peak_anon"], s.get("RssAnon", 0))
            e["peak_file"] = max(e["peak_file"], s.get("RssFile", 0) + s.get("RssShmem", 0))
            e["samples"] += 1

    def _run(self):
        last_tick = time.monotonic()
        while not self._stop.wait(self.interval):
            self._sample()
            if self._on_tick is not None and time.monotonic() - last_tick > 10:
                last_tick = time.monotonic()
                self._on_tick()

    def switch(self, name: str | None) -> None:
        """End the running stage (if any) and start ``name`` (None: stop timing)."""
        self._sample()
        now = time.perf_counter()
        cpu = sum(os.times()[:2])
        try:
            busy, total = _proc_stat_busy_total()
            mine = _self_ticks()
        except (OSError, ValueError, IndexError):
            busy = total = mine = 0
        with self._lock:
            if self.current is not None and self._start_snapshot is not None:
                t0, c0, b0, tot0, m0 = self._start_snapshot
                e = self._entry(self.current)
                e["seconds"] += now - t0
                e["cpu_s"] += cpu - c0
                e["machine_busy_ticks"] += busy - b0
                e["machine_ticks"] += total - tot0
                e["self_ticks"] += mine - m0
                try:
                    e["hwm"] = max(e["hwm"], _status().get("VmHWM", 0))
                except OSError:
                    pass
            self.current = name
            if name is not None:
                _reset_hwm()
                self._entry(name)
                self._start_snapshot = (time.perf_counter(), sum(os.times()[:2]), busy, total,
                                        mine)

    def close(self):
        self.switch(None)
        self._stop.set()
        self._thread.join(timeout=2)

    def report(self) -> dict[str, dict[str, Any]]:
        out = {}
        with self._lock:
            items = [(k, dict(self.stats[k])) for k in self.order]
            running = self.current
            snap = self._start_snapshot
        for name, e in items:
            if name == running and snap is not None:   # partial report of a running stage
                e["seconds"] += time.perf_counter() - snap[0]
                e["running"] = True
            ticks = e.pop("machine_ticks")
            busy = e.pop("machine_busy_ticks")
            mine = e.pop("self_ticks")
            e["other_cpu"] = round(max(0, busy - mine) / ticks, 3) if ticks > 0 else None
            e["peak_rss"] = max(e["peak_rss"], e["hwm"]) if self.hwm_reset_ok else e["peak_rss"]
            out[name] = e
        return out


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)


def _du(path: Path) -> dict[str, int]:
    """Apparent and allocated bytes of the files under ``path``."""
    apparent = allocated = 0
    for p in path.rglob("*"):
        if p.is_file():
            st = p.stat()
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return {"apparent": apparent, "allocated": allocated}


def synthetic_rows(n: int, T: int, vocab: int, seed: int, prefix: str, chunk: int = 1 << 17):
    """``n`` rows of ``T`` uniform random tokens, every next token scored (the last column is
    never scored); generated in chunks into preallocated int32 arrays (1M x 64: 256 MB each)."""
    import numpy as np

    from stride_jax.data import TokenizedSet
    ids = np.empty((n, T), np.int32)
    for s in range(0, n, chunk):
        rng = np.random.default_rng([seed, s])
        ids[s:s + chunk] = rng.integers(0, vocab, (min(chunk, n - s), T), dtype=np.int32)
    mask = np.ones((n, T), np.int32)
    loss = np.ones((n, T), np.int32)
    loss[:, -1] = 0
    names = [f"{prefix}{i}" for i in range(n)]
    return TokenizedSet(names, ids, mask, loss, names)


def attribute_config(spec: dict):
    from stride_jax.attributor import AttributeConfig, CacheConfig
    # The stages timed here (cache, operator training, measurement, solve) are the trained
    # pipeline's; the closed-form default is timed by benchmarks/lds.py and closed_form_sweep.py.
    cfg = AttributeConfig(operators="trained")
    # K and d together: the design refuses a d above K at every step.
    design = dataclasses.replace(cfg.design, num_subsets=spec["K"],
                                 per_example=spec.get("per_example") or cfg.design.per_example)
    solve = cfg.solve
    if spec.get("solve"):   # --quick: a fixed-penalty ridge (no cross-validation to compile)
        solve = dataclasses.replace(solve, estimator="ridge", lam=0.01)
    return dataclasses.replace(
        cfg, design=design, train=dataclasses.replace(cfg.train, epochs=spec["epochs"]),
        cache=CacheConfig(location=spec["location"], dtype=spec["dtype"]), solve=solve)


def _plan(cfg, model, n: int, T: int, Q: int) -> dict:
    import jax
    from flax import nnx

    from stride_jax.parallel.memory import MemoryBudgetError, Shapes, plan_memory
    from stride_jax.steering import resolve_layer
    c = model.config
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    layer = resolve_layer(cfg.steering, c.num_layers)
    shapes = Shapes(n=n, seq_len=T, num_queries=Q, d_reader=c.hidden_size, d_final=c.hidden_size,
                    vocab=c.vocab_size, params_bytes=params_bytes,
                    upper_layers=c.num_layers - layer - 1)
    plan = plan_memory(cfg, shapes)
    out = {"stages": {s.stage: {"host": s.host, "device": s.device, "total": s.host + s.device,
                                "detail": s.detail} for s in plan.stages},
           "text": plan.format()}
    try:   # what `stride-jax attribute --memory-budget 24GiB` would say
        plan_memory(cfg, shapes, budget="24GiB")
        out["fits_24GiB"] = True
    except MemoryBudgetError as e:
        out["fits_24GiB"] = False
        out["budget_24GiB_error"] = str(e)
    return out


def worker(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    out_path = Path(spec["result_path"])
    workdir = Path(spec["workdir"])
    result: dict[str, Any] = {"spec": spec, "status": "running", "pid": os.getpid()}
    mon: StageMonitor | None = None

    def dump(status=None):
        if status:
            result["status"] = status
        if mon is not None:
            result["stages"] = mon.report()
            result["current_stage"] = mon.current
            try:
                result["vm_hwm_total"] = max(result.get("vm_hwm_total", 0),
                                             _status().get("VmHWM", 0))
            except OSError:
                pass
        cache_meta = workdir / "operators" / "cache" / "cache.json"
        if cache_meta.is_file():
            try:
                result["cache_rows_done"] = json.loads(cache_meta.read_text())["rows_done"]
            except (OSError, ValueError, KeyError):
                pass
        _write_json(out_path, result)

    mon = StageMonitor(on_tick=dump)
    t_start = time.perf_counter()
    import jax
    import numpy as np
    if spec.get("compile_cache"):
        jax.config.update("jax_compilation_cache_dir", spec["compile_cache"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

    import stride_jax.attributor as attributor_mod
    from stride_jax.attributor import Attributor
    from stride_jax.model.config import tiny_llama
    from stride_jax.model.transformer import init_model
    from stride_jax.train import _checkpoint

    mcfg = tiny_llama(**MODELS[spec["model"]])
    model = init_model(mcfg, seed=0)
    cfg = attribute_config(spec)
    result["model_config"] = {k: getattr(mcfg, k) for k in (
        "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
        "intermediate_size")}
    result["params"] = int(sum(x.size for x in jax.tree.leaves(
        __import__("flax").nnx.state(model, __import__("flax").nnx.Param))))
    from stride_jax.config import to_dict
    result["attribute_config"] = to_dict(cfg)
    result["plan"] = _plan(cfg, model, spec["n"], spec["T"], spec["Q"])

    try:
        result["baseline"] = _status()   # the runtime (Python, JAX, XLA), the model, no data
    except OSError:
        pass
    mon.switch("data")
    train = synthetic_rows(spec["n"], spec["T"], mcfg.vocab_size, 1, "t")
    queries = synthetic_rows(spec["Q"], spec["T"], mcfg.vocab_size, 2, "q")
    result["data_bytes"] = int(train.input_ids.nbytes * 3)
    dump()

    # Stage boundaries inside fit_operators: wrap what the Attributor calls.
    orig_build, orig_train = attributor_mod.build_cache, attributor_mod.train_operators
    orig_save = _checkpoint.OperatorCheckpointer.save
    ckpt_s = [0.0]

    def build_cache(*a, **kw):
        mon.switch("cache")
        dump()
        try:
            return orig_build(*a, progress=spec.get("progress", False),
                              **{k: v for k, v in kw.items() if k != "progress"})
        finally:
            mon.switch("operators_io")

    def train_operators(*a, **kw):
        d = workdir / "operators" / "cache"
        if d.is_dir():
            result["disk_cache_bytes"] = _du(d)
        mon.switch("train")
        dump()
        try:
            return orig_train(*a, **kw)
        finally:
            mon.switch("operators_io")

    def save(self, *a, **kw):
        t = time.perf_counter()
        try:
            return orig_save(self, *a, **kw)
        finally:
            ckpt_s[0] += time.perf_counter() - t

    attributor_mod.build_cache, attributor_mod.train_operators = build_cache, train_operators
    _checkpoint.OperatorCheckpointer.save = save

    att = Attributor(model, train, cfg, workdir=workdir, overwrite=True, progress=False)
    result["cache_on_disk"] = att._cache_on_disk()
    mon.switch("design")
    att.design()
    dump()
    mon.switch("operators_io")
    att.fit_operators()
    result["checkpoint_s"] = ckpt_s[0]
    result["train_history"] = att.history
    result["train_steps"] = int(math.ceil(spec["K"] / min(cfg.train.subsets_per_step, spec["K"]))
                                * cfg.train.epochs)
    dump()
    mon.switch("measure")
    responses = att.measure(queries)
    dump()
    mon.switch("solve")
    res = att.solve(responses, queries.ids)
    mon.close()
    result["scores_finite"] = bool(np.isfinite(res.scores_qn).all())
    result["wall_s"] = time.perf_counter() - t_start
    dump("ok")


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------

def configurations(args) -> list[dict]:
    P = QUICK if args.quick else FULL
    base = dict(T=P["T"], epochs=P["epochs"], per_example=P["per_example"], solve=P["solve"])
    out = []

    def add(sweep, model, n, K, Q, location, dtype):
        cid = f"{sweep}-{model}-n{n}-K{K}-Q{Q}-{location}-{dtype}"
        out.append(dict(base, id=cid, sweep=sweep, model=model, n=n, K=K, Q=Q,
                        location=location, dtype=dtype))

    sweeps = args.sweep.split(",")
    if "n" in sweeps:
        ns = args.n or P["n"]
        ns = [n for n in ns if (args.max_n is None or n <= args.max_n)
              and (args.min_n is None or n >= args.min_n)]
        for n in ns:
            if n < P["disk_from"]:
                add("n", P["n_model"], n, P["n_K"], P["n_Q"], "memory", "float32")
            add("n", P["n_model"], n, P["n_K"], P["n_Q"], "disk", "bfloat16")
    if "K" in sweeps:
        for K in args.K or P["K"]:
            add("K", P["kq_model"], P["K_n"], K, P["K_Q"], "memory", "float32")
    if "Q" in sweeps:
        for Q in args.Q or P["Q"]:
            add("Q", P["kq_model"], P["Q_n"], P["Q_K"], Q, "memory", "float32")
    return out


def run_one(spec: dict, args) -> dict:
    workdir = Path(args.workdir) / spec["id"]
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    cc = args.compile_cache
    if cc is None:
        cc = str(Path(args.workdir) / "xla_cache") if args.quick else "off"
    spec = dict(spec, workdir=str(workdir), result_path=str(workdir / "result.json"),
                progress=args.progress, compile_cache=None if cc == "off" else cc)
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker",
                             str(spec_path)], start_new_session=True, cwd=ROOT)
    timed_out = False
    try:
        rc = proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    elapsed = time.perf_counter() - t0
    res_path = Path(spec["result_path"])
    res = json.loads(res_path.read_text()) if res_path.is_file() else {"spec": spec}
    res["returncode"] = rc
    res["elapsed_s"] = elapsed
    if timed_out:
        res["status"] = f"timed out after {args.timeout} s"
    elif rc != 0:
        res["status"] = f"failed (exit status {rc})"
    # Rows cached before a kill: how far it got and at what rate.
    meta = workdir / "operators" / "cache" / "cache.json"
    if meta.is_file():
        try:
            res["cache_rows_done"] = json.loads(meta.read_text())["rows_done"]
        except (OSError, ValueError, KeyError):
            pass
        res["disk_cache_bytes"] = _du(meta.parent)
    summarize(res)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return res


def summarize(res: dict) -> None:
    """Flat per-run numbers for the tables (in place)."""
    spec = res["spec"]
    st = res.get("stages", {})
    row: dict[str, Any] = {"id": spec["id"], "sweep": spec["sweep"], "model": spec["model"],
                           "n": spec["n"], "K": spec["K"], "Q": spec["Q"],
                           "cache": f"{spec['location']}-{spec['dtype'].replace('float', 'f')}",
                           "status": res.get("status")}
    for s in ("data",) + STAGES:
        row[f"{s}_s"] = st[s]["seconds"] if s in st else None
        row[f"{s}_peak_rss_gib"] = st[s]["peak_rss"] / 2**30 if s in st else None
        row[f"{s}_peak_anon_gib"] = st[s]["peak_anon"] / 2**30 if s in st else None
        plan = res.get("plan", {}).get("stages", {}).get(s)
        row[f"{s}_plan_gib"] = plan["total"] / 2**30 if plan else None
    done = [s for s in STAGES if s in st and not st[s].get("running")]
    row["total_s"] = sum(st[s]["seconds"] for s in done) if len(done) == len(STAGES) else None
    row["peak_rss_gib"] = max((st[s]["peak_rss"] for s in STAGES if s in st), default=0) / 2**30
    row["peak_anon_gib"] = max((st[s]["peak_anon"] for s in STAGES if s in st), default=0) / 2**30
    row["vm_hwm_gib"] = res.get("vm_hwm_total", 0) / 2**30
    base = res.get("baseline", {}).get("RssAnon")
    row["baseline_anon_gib"] = base / 2**30 if base else None
    row["peak_anon_over_baseline_gib"] = (row["peak_anon_gib"] - row["baseline_anon_gib"]
                                          if base else None)
    plan = res.get("plan", {}).get("stages", {})
    row["plan_peak_gib"] = max((v["total"] for v in plan.values()), default=0) / 2**30 or None
    row["plan_fits_24GiB"] = res.get("plan", {}).get("fits_24GiB")
    disk = res.get("disk_cache_bytes")
    row["disk_cache_gib"] = disk["allocated"] / 2**30 if disk else None
    row["checkpoint_s"] = res.get("checkpoint_s")
    row["train_steps"] = res.get("train_steps")
    hist = res.get("train_history") or []
    row["train_compile_s"] = hist[0].get("compile_s") if hist else None
    other = [st[s]["other_cpu"] for s in STAGES if s in st and st[s].get("other_cpu") is not None]
    row["other_cpu_max"] = max(other) if other else None
    if "cache_rows_done" in res and "cache" in st and st["cache"]["seconds"] > 0:
        row["cache_rows_done"] = res["cache_rows_done"]
        row["cache_rows_per_s"] = res["cache_rows_done"] / st["cache"]["seconds"]
    elif "cache" in st and st["cache"]["seconds"] > 0 and not st["cache"].get("running"):
        row["cache_rows_per_s"] = spec["n"] / st["cache"]["seconds"]
    if row.get("cache_rows_per_s"):
        row["cache_tokens_per_s"] = row["cache_rows_per_s"] * spec["T"]
    res["summary"] = row


def loglog_slope(xs, ys) -> dict | None:
    import numpy as np
    pts = [(x, y) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return None
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    b, a = np.polyfit(lx, ly, 1)
    out = {"slope": float(b), "points": len(pts), "n_range": [pts[0][0], pts[-1][0]]}
    if len(pts) >= 2:
        out["last_two_slope"] = float((ly[-1] - ly[-2]) / (lx[-1] - lx[-2]))
    # fixed + per-row cost: t = t0 + c n (least squares, relative weights)
    x = np.array([p[0] for p in pts], float)
    y = np.array([p[1] for p in pts], float)
    A = np.stack([np.ones_like(x), x], 1) / y[:, None]
    (t0, c), *_ = np.linalg.lstsq(A, np.ones_like(y), rcond=None)
    out["fixed_s"] = float(t0)
    out["per_million_rows_s"] = float(c * 1e6)
    out["max_rel_residual"] = float(np.max(np.abs((t0 + c * x) - y) / y))
    return out


def linearity(results: list[dict]) -> dict:
    """Log-log slopes of time (total and per stage) and peak memory vs n, per cache series."""
    out = {}
    rows = [r["summary"] for r in results if r["spec"]["sweep"] == "n"]
    for series in sorted({r["cache"] for r in rows}):
        rs = sorted((r for r in rows if r["cache"] == series), key=lambda r: r["n"])
        ns = [r["n"] for r in rs]
        entry = {"n": ns, "total": loglog_slope(ns, [r["total_s"] for r in rs])}
        for s in STAGES:
            entry[s] = loglog_slope(ns, [r[f"{s}_s"] for r in rs])
        entry["peak_rss"] = loglog_slope(ns, [r["peak_rss_gib"] for r in rs])
        entry["peak_anon"] = loglog_slope(ns, [r["peak_anon_gib"] for r in rs])
        out[series] = entry
    return out


def _legend(ax, **kw) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, **kw)


def plot(doc: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        print("matplotlib is not installed (pip install -e .[eval]); no plot written")
        return None
    rows = [r["summary"] for r in doc["results"]]
    colors = dict(zip(STAGES + ("total",), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))

    def stage_lines(ax, sweep, x, series_style):
        for series, style in series_style.items():
            rs = sorted((r for r in rows if r["sweep"] == sweep and r["cache"] == series),
                        key=lambda r: r[x])
            if not rs:
                continue
            for s in STAGES + ("total",):
                pts = [(r[x], r[f"{s}_s" if s != "total" else "total_s"]) for r in rs]
                pts = [p for p in pts if p[1]]
                if pts:
                    ax.plot(*zip(*pts), style, color=colors[s], lw=2.5 if s == "total" else 1.2,
                            label=f"{s} ({series})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylabel("wall time (s)")
        ax.grid(alpha=0.3, which="both")

    ax = axes[0][0]
    stage_lines(ax, "n", "n", {"disk-bf16": "o-", "memory-f32": "s--"})
    ns = sorted({r["n"] for r in rows if r["sweep"] == "n"})
    if len(ns) >= 2:   # a slope-1 guide through the largest total
        tot = [r for r in rows if r["sweep"] == "n" and r["total_s"]]
        if tot:
            top = max(tot, key=lambda r: r["n"])
            ax.plot(ns, [top["total_s"] * n / top["n"] for n in ns], ":", color="gray",
                    label="linear in n")
    ax.set_xlabel("training rows n")
    ax.set_title("time per stage vs n (K=%s, Q=%s)" % (
        next((r["K"] for r in rows if r["sweep"] == "n"), "?"),
        next((r["Q"] for r in rows if r["sweep"] == "n"), "?")))
    _legend(ax, ncol=2)

    ax = axes[0][1]
    for series, style in {"disk-bf16": "o-", "memory-f32": "s--"}.items():
        rs = sorted((r for r in rows if r["sweep"] == "n" and r["cache"] == series),
                    key=lambda r: r["n"])
        if not rs:
            continue
        x = [r["n"] for r in rs]
        ax.plot(x, [r["peak_rss_gib"] for r in rs], style, color="C0",
                label=f"peak RSS ({series})")
        ax.plot(x, [r["peak_anon_gib"] for r in rs], style, color="C1",
                label=f"peak anonymous RSS ({series})")
        ax.plot(x, [r["peak_anon_over_baseline_gib"] for r in rs], style, color="C4",
                label=f"peak anonymous RSS - runtime baseline ({series})")
        ax.plot(x, [r["plan_peak_gib"] for r in rs], style, color="C2", alpha=0.6,
                label=f"plan_memory estimate ({series})")
        if series == "disk-bf16":
            ax.plot(x, [r["disk_cache_gib"] for r in rs], style, color="C3", alpha=0.6,
                    label="on-disk cache size")
    ax.axhline(24, color="gray", ls=":", label="24 GiB")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training rows n")
    ax.set_ylabel("GiB")
    ax.set_title("peak memory vs n")
    ax.grid(alpha=0.3, which="both")
    _legend(ax)

    for ax, sweep in ((axes[1][0], "K"), (axes[1][1], "Q")):
        stage_lines(ax, sweep, sweep, {"memory-f32": "o-"})
        ax.set_xlabel(sweep)
        fixed = next((r for r in rows if r["sweep"] == sweep), None)
        if fixed:
            other = "n=%d, Q=%d" % (fixed["n"], fixed["Q"]) if sweep == "K" else \
                "n=%d, K=%d" % (fixed["n"], fixed["K"])
            ax.set_title(f"time per stage vs {sweep} ({other})")
        _legend(ax, ncol=2)
    m = doc.get("machine", {})
    fig.suptitle(f"STRIDE scaling ({m.get('cpu_model', '?')}, {m.get('cpu_count', '?')} cores)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


TIME_COLS = ["sweep", "model", "n", "K", "Q", "cache", "design_s", "cache_s", "train_s",
             "operators_io_s", "measure_s", "solve_s", "total_s", "cache_tokens_per_s",
             "other_cpu_max", "status"]
MEM_COLS = ["sweep", "n", "K", "Q", "cache", "peak_rss_gib", "peak_anon_gib", "vm_hwm_gib",
            "baseline_anon_gib", "peak_anon_over_baseline_gib", "plan_peak_gib",
            "plan_fits_24GiB", "disk_cache_gib"]
STAGE_MEM_COLS = ["sweep", "n", "K", "Q", "cache"] + [
    f"{s}_{k}" for s in ("cache", "train", "measure", "solve")
    for k in ("peak_anon_gib", "peak_rss_gib", "plan_gib")]


def print_tables(results: list[dict]) -> None:
    rows = [r["summary"] for r in results]
    print("\ntime per stage (s):")
    print_table(rows, TIME_COLS)
    print("\npeak memory (GiB; RSS = anonymous + mapped files, e.g. the on-disk cache's pages; "
          "plan = plan_memory host + device):")
    print_table(rows, MEM_COLS)
    print("\npeak memory per stage (GiB):")
    print_table(rows, STAGE_MEM_COLS)


def print_linearity(lin: dict) -> None:
    if not lin:
        return
    print("\nlinearity in n (log-log slope; 1 = linear; fit t = fixed_s + per_million_rows_s "
          "* n / 1e6):")
    rows = []
    for series, e in lin.items():
        for what in ("total",) + STAGES + ("peak_rss", "peak_anon"):
            f = e.get(what)
            if f:
                rows.append({"series": series, "what": what,
                             "n": f"{f['n_range'][0]}..{f['n_range'][1]}", "slope": f["slope"],
                             "last_two_slope": f["last_two_slope"], "fixed_s": f["fixed_s"],
                             "per_million_rows_s": f["per_million_rows_s"],
                             "max_rel_residual": f["max_rel_residual"]})
    print_table(rows, ["series", "what", "n", "slope", "last_two_slope", "fixed_s",
                       "per_million_rows_s", "max_rel_residual"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", default="n,K,Q", help="comma-separated: n, K, Q")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke run, < 1 min)")
    p.add_argument("--max-n", type=int, default=None, help="largest n of the n sweep")
    p.add_argument("--min-n", type=int, default=None, help="smallest n of the n sweep")
    ints = lambda s: tuple(int(float(v)) for v in s.split(","))  # noqa: E731
    p.add_argument("--n", type=ints, default=None, help="n values (default 1e3,1e4,1e5,1e6)")
    p.add_argument("--K", type=ints, default=None, help="K values of the K sweep")
    p.add_argument("--Q", type=ints, default=None, help="Q values of the Q sweep")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/"
                                               "scaling.json, scaling_quick.json with --quick)")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "scaling"), help="run directories")
    p.add_argument("--timeout", type=float, default=None, help="seconds per configuration")
    p.add_argument("--fresh", action="store_true", help="do not merge into an existing file")
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("--progress", action="store_true", help="progress bar of the cache stage")
    p.add_argument("--compile-cache", default=None,
                   help="persistent XLA compilation cache directory for the runs, or 'off' "
                        "(default: off, so every run compiles from scratch; with --quick "
                        "WORKDIR/xla_cache)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--report", action="store_true",
                   help="run nothing: print the tables and redraw the plot of the results file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(Path(args.worker))
        return 0
    out = Path(args.out) if args.out else RESULTS_DIR / (
        "scaling_quick.json" if args.quick else "scaling.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = []
    if out.is_file() and not args.fresh:
        try:
            previous = json.loads(out.read_text()).get("results", [])
        except (OSError, ValueError):
            previous = []
    if args.report:
        doc = json.loads(out.read_text())
        doc["linearity"] = linearity(doc["results"])
        print_tables(doc["results"])
        print_linearity(doc["linearity"])
        if not args.no_plot:
            print(f"plot: {plot(doc, out.with_suffix('.png'))}")
        return 0
    specs = configurations(args)
    if not specs:
        print("no configuration selected", file=sys.stderr)
        return 2
    results = {r["spec"]["id"]: r for r in previous}
    P = QUICK if args.quick else FULL
    ran = []

    def write():
        rs = list(results.values())
        order = {"n": 0, "K": 1, "Q": 2}
        rs.sort(key=lambda r: (order.get(r["spec"]["sweep"], 9), r["spec"]["n"], r["spec"]["K"],
                               r["spec"]["Q"], r["spec"]["location"]))
        doc = {"benchmark": "scaling", "machine": machine_info(), "quick": args.quick,
               "models": {k: {**MODELS[k], "base": "tiny_llama"} for k in MODELS},
               "sweeps": {k: v for k, v in P.items()},
               "settings": "AttributeConfig defaults except design.num_subsets=K, "
                           f"train.epochs={P['epochs']}"
                           + (f", design.per_example={P['per_example']}" if P["per_example"]
                              else "")
                           + (f", solve: {P['solve']}" if P["solve"] else "")
                           + ", cache as per configuration; operator training "
                           "steps = ceil(K / subsets_per_step) * epochs, independent of n",
               "linearity": linearity(rs), "results": rs}
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
        os.replace(tmp, out)
        return doc

    for spec in specs:
        print(f"\n== {spec['id']} ==", flush=True)
        res = run_one(spec, args)
        results[spec["id"]] = res
        ran.append(res)
        print_table([res["summary"]], TIME_COLS)
        write()
    doc = write()
    print_tables(ran)
    print_linearity(doc["linearity"])
    if not args.no_plot:
        png = plot(doc, out.with_suffix(".png"))
        if png:
            print(f"plot: {png}")
    print(f"results: {out}")
    return 0 if all(r.get("status") == "ok" for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
