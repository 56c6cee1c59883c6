"""Shared helpers for the benchmark scripts: machine description, timing, tables, result files.

Every script writes ``benchmarks/results/{name}.json`` through :func:`write_results`, which adds
:func:`machine_info` (no hostname) so numbers from different machines are never mixed up.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_ram_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 2)
    except (ValueError, OSError, AttributeError):
        return None


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _load_avg() -> list[float] | None:
    """System load when the results were written: other processes skew CPU timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - absent or broken: just not reported
        return None
    return getattr(mod, "__version__", "unknown")


def machine_info() -> dict[str, Any]:
    """Where the numbers came from: platform, CPU, cores, RAM, library versions, JAX devices, date.

    Deliberately hostname-free.
    """
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "cpu_model": _cpu_model(),
        "cpu_count": _cpu_count(),
        "ram_gib": _total_ram_gib(),
        "load_avg_1_5_15": _load_avg(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {m: _version(m) for m in ("jax", "jaxlib", "flax", "optax", "numpy", "torch",
                                              "transformers")},
        "env": {k: os.environ[k] for k in ("XLA_FLAGS", "JAX_PLATFORMS", "OMP_NUM_THREADS",
                                           "MKL_NUM_THREADS") if k in os.environ},
    }
    try:
        import jax

        info["jax_backend"] = jax.default_backend()
        info["jax_devices"] = [f"{d.platform}:{d.device_kind}:{d.id}" for d in jax.devices()]
    except Exception as e:  # noqa: BLE001
        info["jax_devices"] = f"unavailable ({type(e).__name__}: {e})"
    if "torch" in sys.modules:  # only report torch threads if a script set them up
        info["torch_num_threads"] = sys.modules["torch"].get_num_threads()
    return info


def cpu_busy_fraction(seconds: float = 1.0) -> float | None:
    """Fraction of all CPU time spent busy over ``seconds`` (read from ``/proc/stat``).

    Call it while this process is idle: a high value means other processes are running and CPU
    timings taken now will be pessimistic (and thread pools sized to the core count thrash).
    """
    try:
        b0, t0 = _proc_stat_busy_total()
        time.sleep(seconds)
        b1, t1 = _proc_stat_busy_total()
    except (OSError, ValueError, IndexError):
        return None
    return round((b1 - b0) / max(t1 - t0, 1), 3)


def _proc_stat_busy_total() -> tuple[int, int]:
    with open("/proc/stat", encoding="utf-8") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    return total - idle, total


def _self_ticks() -> int:
    with open("/proc/self/stat", encoding="utf-8") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime of all threads, in clock ticks


class ForeignLoad:
    """Context manager: share of the machine's CPU time used by *other* processes meanwhile.

    ``with ForeignLoad() as fl: ...`` then ``fl.fraction`` (0 = nobody else ran, 1 = every core
    was busy with someone else's work; ``None`` where ``/proc`` is unavailable). Both counters are
    in clock ticks, so the value is coarse (10 ms ticks) over short windows.
    """

    fraction: float | None = None

    def __enter__(self):
        try:
            self._start = (*_proc_stat_busy_total(), _self_ticks())
        except (OSError, ValueError, IndexError):
            self._start = None
        return self

    def __exit__(self, *exc):
        if self._start is None:
            return False
        try:
            busy1, total1 = _proc_stat_busy_total()
            self1 = _self_ticks()
        except (OSError, ValueError, IndexError):
            return False
        busy0, total0, self0 = self._start
        dt = total1 - total0
        if dt > 0:
            self.fraction = round(max(0.0, (busy1 - busy0) - (self1 - self0)) / dt, 3)
        return False


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/{name}.json`` atomically (temp file + ``os.replace``)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    doc = {"benchmark": name, "machine": machine_info(), **payload}
    text = json.dumps(doc, indent=2, sort_keys=False, default=_json_default) + "\n"
    fd, tmp = tempfile.mkstemp(dir=RESULTS_DIR, prefix=f".{name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; results are meant to be shared
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:
        pass
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:  # NaN
            return "nan"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1e4:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def print_table(rows: list[dict[str, Any]], columns: Sequence[str], *, file=None) -> str:
    """Print ``rows`` as a plain-text table of ``columns`` (numbers right-aligned); returns it."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows)
               for c in columns]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(list(columns)), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells]
    text = "\n".join(out)
    print(text, file=file or sys.stdout, flush=True)
    return text


def _block(x: Any) -> Any:
    try:
        import jax
    except ImportError:
        return x
    return jax.block_until_ready(x)


def timeit(fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 5) -> dict[str, Any]:
    """Time ``fn()`` (results passed through ``jax.block_until_ready``).

    Runs ``warmup`` untimed calls then ``repeat`` timed ones; returns ``median_s``, ``min_s`` and
    ``runs`` (every timed duration, seconds).
    """
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    for _ in range(warmup):
        _block(fn())
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        _block(fn())
        runs.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(runs), "min_s": min(runs), "runs": runs}


def time_first_call(fn: Callable[[], Any]) -> float:
    """Seconds of one (blocked) call: for the first call of a jitted function, compile + run."""
    t0 = time.perf_counter()
    _block(fn())
    return time.perf_counter() - t0


def wait_for_idle(max_wait_s: float, *, threshold: float = 0.2, probe_s: float = 1.0) -> float | None:
    """Wait (up to ``max_wait_s``) until the CPUs are less than ``threshold`` busy; returns the last
    busy fraction seen."""
    deadline = time.monotonic() + max_wait_s
    busy = cpu_busy_fraction(probe_s)
    while busy is not None and busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy_fraction(probe_s)
    return busy


def timeit_uncontended(fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 5,
                       max_other_cpu: float = 0.1, attempts: int = 3,
                       wait_s: float = 60.0) -> dict[str, Any]:
    """:func:`timeit` on a shared machine: retry while other processes took too much CPU.

    Each attempt first waits (up to ``wait_s``) for idle CPUs, then times ``fn`` under
    :class:`ForeignLoad`. The attempt with the least foreign load is returned, with
    ``other_cpu`` (that load) and ``attempts`` added.
    """
    best = None
    for i in range(1, max(1, attempts) + 1):
        if i > 1:
            wait_for_idle(wait_s)
        with ForeignLoad() as load:
            stats = timeit(fn, warmup=warmup if i == 1 else 1, repeat=repeat)
        stats["other_cpu"] = load.fraction
        stats["attempts"] = i
        if best is None or (load.fraction or 0.0) < (best["other_cpu"] or 0.0):
            best = dict(stats)
        if load.fraction is None or load.fraction <= max_other_cpu:
            break
    best["attempts"] = i
    return best


def task_groundtruth(task: Any, cfg: Any, directory: Path, *, progress: bool = True) -> Any:
    """The retraining ground truth of a built task (``cfg``: its ``TaskConfig``) in
    ``directory``: loaded when finished and stamped with this task, resumed or made otherwise;
    one made for another version of the task (its stamp differs) is refused, naming what changed,
    so a benchmark never scores against a stale ground truth."""
    from stride_jax.eval.groundtruth import run_groundtruth
    return run_groundtruth(task.retrain, n=task.n, num_queries=task.num_queries,
                           cfg=cfg.groundtruth, out_dir=directory, stamp=task.stamp,
                           progress=progress)
