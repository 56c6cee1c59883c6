"""Memory planning: the peak memory of each STRIDE stage, from the config and the shapes alone.

Before a run, :func:`plan_memory` estimates the bytes each stage holds at its peak, on the host
and per device, and (given a budget) shrinks the chunk sizes that do not change results
(``measure.query_batch``, ``measure.subset_chunk``, ``solve.query_chunk``) until every stage fits.
Settings that do change results (``train.subsets_per_step``, rows, tokens, K, rank) are never
touched: when they do not fit, the plan refuses, naming the stage and the settings to lower.

Closed-form operators (the default, :func:`_closed_form_stages`), per device, ``B`` rows per
device per batch of ``T`` tokens, ``D`` the reader width, ``C`` the site width, ``k`` the
projected output side:

* the factor pass: about three ``[B T, V]`` float32 temporaries (logits, softmax and their
  products), ``c_closed * 12 B T V``, plus the running factor sums twice (in and out:
  ``8 (D^2 + V + C^2)``, ``C`` for a diagonal Fisher); at ``final_hidden`` also ``U^T p`` per
  token and the unembedding;
* the query and score passes (one program): two ``[B T, V]`` temporaries and the per-token
  whitened terms, ``c_closed * 4 B T (2 V + D + k)``, the transforms ``4 (D^2 + C k)``, the
  queries' gradients ``4 Q D k`` and the batch's gradients ``4 B D k`` (four batches in flight
  in the query pass, two in the score pass);
* on the host: the factor sums and their eigendecompositions in float64 (``24 (D^2 + C^2)``,
  ``32 C`` diagonal) and the projection and transform in float64 (``16 C k``), the queries'
  gradients, and the scores ``4 Q n`` (dense) or ``24 Q topk``.

``closed_form.batch_size`` is the result-neutral knob. ``c_closed`` = 1.3 keeps the estimates
above XLA's compiled-memory analysis of the real kernels on every shape tested, and within 2x
of it (``tests/test_memory.py``).

Every stage also counts :data:`RUNTIME` on the host: the interpreter, JAX's runtime and XLA's
compiler (a measured process of a 4-layer model holds ~0.5 GiB before any array and compiling a
kernel takes a few hundred MiB more). On a CPU the host and the devices are one memory: with
``unified=True`` a budget bounds ``host + devices x device``.

Trained operators, estimates in float32 bytes (``b`` rows and ``bs`` stability rows per subset, ``T'`` scored
positions per row, ``S`` subsets per device per step, ``C`` the operator output width, ``V`` the
vocabulary, ``D`` devices):

* design: ``12 n d`` (sorted pairs, CSR, per-example slots) plus padded members ``4 K max|S_k|``;
* activation cache: ``w n T (D_reader + d_final)`` (``w`` = 4 for float32, 2 for bfloat16) on
  the host, the same again on each device during training (the cache is replicated), plus the
  token arrays ``12 n T``; with ``cache`` on disk (:func:`cache_on_disk`) the host holds none of
  it resident and each device only the step's ``S b + bs`` rows;
* operator state: coefficients and two Adam moments, ``12 K r C / D``;
* training step (XLA temporaries): the steered log-softmax over the vocabulary for every
  (subset, row, position), ``c_train * S (b + bs) T' V`` floats, plus the chunk's gathered
  coefficients and gradients ``16 S r C``; the residual site adds the upper layers' activations;
* measurement: ``c_measure * (subset_chunk / D) * query_batch * T * V`` floats plus the base
  log-probabilities ``3 * query_batch * T * V``. ``c_measure`` = 4.5 is calibrated against the
  process's resident memory, not XLA's analysis: on the CPU the vmapped chunk peaks at ~3.7
  such floats, twice what XLA's buffer assignment reports (issue 16: a plan of 11.1 GiB, a
  process of 23-24 GB; ``tests/test_memory.py`` measures a process);
* recovery: ``c_solve * query_chunk * (n + K)`` doubles plus the ridge's ``2 K^2`` Gram and
  eigenvectors, plus the scores: ``4 Q n`` dense, or with ``scores=topk`` one block's
  ``4 query_chunk n`` and ``24 Q topk``;
* the frozen base model: its bytes on every device, or ``1/D`` of them with
  ``parallel.model=fsdp``.

The constants ``c_*`` are calibrated against XLA's own compiled-memory analysis of the jitted
training step and measurement chunk (``tests/test_memory.py`` checks the estimates stay within
a factor of 2 of XLA's numbers on several shapes).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from stride_jax.errors import ConfigError, MemoryBudgetError

__all__ = ["MemoryBudgetError", "MemoryPlan", "RUNTIME", "Shapes", "StageMemory", "available_memory",
           "cache_on_disk", "format_bytes", "parse_bytes", "plan_memory", "scores_dense"]

# Calibrated against XLA's memory_analysis() and the process's peak (see the module docstring).
C_TRAIN = 3.0
C_MEASURE = 4.5
C_SOLVE = 6.0
C_CLOSED = 1.3
# Host bytes of the process before any array: interpreter, JAX runtime, XLA compilations.
RUNTIME = 1 << 30


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What the plan needs to know about the model and the data."""

    n: int                 # training rows
    seq_len: int           # tokens per row
    num_queries: int
    d_reader: int
    d_final: int
    vocab: int
    params_bytes: int = 0  # the frozen base model (all of it, before any FSDP split)
    upper_layers: int = 0  # layers above the reader (residual site)


@dataclasses.dataclass(frozen=True)
class StageMemory:
    stage: str
    host: int              # bytes held on the host
    device: int            # bytes per device
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    stages: tuple[StageMemory, ...]
    config: Any            # the AttributeConfig, with chunk sizes possibly lowered
    budget: int | None
    changes: tuple[str, ...]
    devices: int = 1
    unified: bool = False  # the devices share the host's memory (a CPU)

    @property
    def peak_host(self) -> int:
        return max(s.host for s in self.stages)

    @property
    def peak_device(self) -> int:
        return max(s.device for s in self.stages)

    @property
    def peak_total(self) -> int:
        """The most memory of one machine a stage holds: host plus all its devices."""
        return max(s.host + self.devices * s.device for s in self.stages)

    def format(self) -> str:
        lines = [f"{'stage':<12} {'host':>10} {'per device':>11}  detail"]
        for s in self.stages:
            lines.append(f"{s.stage:<12} {format_bytes(s.host):>10} {format_bytes(s.device):>11}"
                         f"  {s.detail}")
        peak = f"peak: host {format_bytes(self.peak_host)}, per device " \
               f"{format_bytes(self.peak_device)}"
        if self.unified:
            peak += f", together {format_bytes(self.peak_total)} (one memory)"
        if self.budget is not None:
            peak += f" (budget {format_bytes(self.budget)})"
        lines.append(peak)
        for c in self.changes:
            lines.append(f"  to fit: {c}")
        return "\n".join(lines)


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "t": 1e12, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: str | int) -> int:
    """``'24GiB'``, ``'8 GB'``, ``'512MiB'`` or a plain integer -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot read the memory size {text!r}; write e.g. 24GiB, 8GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def available_memory() -> tuple[int | None, int | None, bool]:
    """``(host, per device, unified)``: the host memory available now (``MemAvailable``), each
    accelerator's memory limit as JAX reports it (None on a CPU), and whether the devices are
    the host's own memory (a CPU backend). The default budget of ``stride-jax attribute``."""
    import jax
    host = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
    except OSError:
        pass
    dev = jax.local_devices()[0]
    unified = dev.platform == "cpu"
    limit = None
    if not unified:
        try:
            limit = (dev.memory_stats() or {}).get("bytes_limit")
        except Exception:   # backends without memory statistics
            limit = None
    return host, limit, unified


def format_bytes(b: float) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if b >= size:
            return f"{b / size:.2f} {unit}"
    return f"{int(b)} B"


def cache_on_disk(cache_cfg, *, rows: int, seq_len: int, width: int, has_workdir: bool) -> bool:
    """Whether the activation cache goes to disk (``cache.location``; ``auto``: when its
    ``rows x seq_len x width`` values exceed ``memory_limit``, given a run directory)."""
    if cache_cfg.location == "memory":
        return False
    if not has_workdir:
        if cache_cfg.location == "disk":
            raise ConfigError("cache.location=disk needs a run directory (workdir / --out)")
        return False
    if cache_cfg.location == "disk":
        return True
    itemsize = 4 if cache_cfg.dtype == "float32" else 2
    return rows * seq_len * width * itemsize > parse_bytes(cache_cfg.memory_limit)


def scores_dense(cfg, *, num_queries: int, n: int) -> bool:
    """Whether the solve keeps the dense ``[Q, n]`` score matrix (``cfg.scores``; ``auto``: when
    its float32 bytes fit ``scores_memory_limit``), else each query's top ``topk``."""
    if cfg.scores != "auto":
        return cfg.scores == "dense"
    return 4 * num_queries * n <= parse_bytes(cfg.scores_memory_limit)


def closed_form_dims(cfg, s: Shapes) -> tuple[int, int, int, bool]:
    """``(D, C, k, full)`` of closed-form operators: reader width, site width, the output side's
    width after projection, and whether the site Fisher is kept in full."""
    from stride_jax.train._closed_form import reader_of
    C = s.vocab if cfg.steering.site == "logits" else s.d_final
    cf = cfg.closed_form
    D = s.d_final if reader_of(cf, C) == "final" else s.d_reader
    k = C if D * C <= cf.max_dim else max(1, cf.max_dim // D)
    return D, C, k, C <= cf.full_metric_limit or cfg.steering.site != "logits"


def _closed_form_stages(cfg, s: Shapes, devices: int) -> list[StageMemory]:
    """Closed-form operators: two streamed passes over the training rows and one over the
    queries (see the module docstring for the terms)."""
    D, C, k, full = closed_form_dims(cfg, s)
    diagonal = cfg.steering.site == "logits" and not full
    V, T, Q, d = s.vocab, s.seq_len, s.num_queries, s.d_final
    B = -(-cfg.closed_form.batch_size // devices)          # rows per device per batch
    BT = B * T
    p = s.params_bytes // devices if cfg.parallel.model == "fsdp" else s.params_bytes
    tokens = 12 * s.n * T + RUNTIME
    metric = C if diagonal else C * C
    # Factor pass: the sums in and out, three [B T, V] temporaries.
    stats = C_CLOSED * 12 * BT * V + 8 * (D * D + V + metric)
    if cfg.steering.site == "final_hidden":
        stats += C_CLOSED * 4 * BT * d + 4 * d * V          # U^T p per token, the unembedding U
    host_factors = 8 * (3 * D * D + (4 * C if diagonal else 3 * C * C) + 2 * C * k) + 4 * C * k
    if cfg.steering.site == "final_hidden":
        host_factors += 16 * d * V
    # The query and score program: transforms, the queries' gradients, two [B T, V]
    # temporaries and the per-token terms, and each batch's gradients.
    program = 4 * (D * D + C * k) + 4 * Q * D * k + C_CLOSED * 4 * BT * (2 * V + D + k)
    grads = 4 * B * D * k + 4 * Q * B
    g_q = 4 * Q * D * k
    dense = scores_dense(cfg, num_queries=Q, n=s.n)
    scores = 4 * Q * s.n if dense else 24 * Q * cfg.topk
    return [
        StageMemory("factors", int(tokens + host_factors), int(p + stats),
                    f"A {D}x{D}, S {C}x{C if not diagonal else 1} "
                    f"({'diagonal' if diagonal else 'full'}), batch_size={B * devices}"),
        StageMemory("queries", int(tokens + g_q + 4 * C * k), int(p + program + 4 * grads),
                    f"{Q} query gradients of {D}x{k}"),
        StageMemory("scores", int(tokens + g_q + 4 * C * k + scores),
                    int(p + program + 2 * grads + 64 * 4 * Q * B),
                    f"n={s.n}, scores {'dense' if dense else f'top {cfg.topk}'}"),
    ]


def _stages(cfg, s: Shapes, devices: int, *, has_workdir: bool = True) -> list[StageMemory]:
    if getattr(cfg, "operators", "trained") == "closed_form":
        return _closed_form_stages(cfg, s, devices)
    from stride_jax.subsets import default_num_subsets
    d = cfg.design.per_example
    K = cfg.design.num_subsets or default_num_subsets(s.n, d, multiple=devices)
    site, r = cfg.steering.site, cfg.steering.rank
    C = s.vocab if site == "logits" else s.d_final
    V = s.vocab
    T = s.seq_len
    t_cfg = cfg.train
    Tp = T if t_cfg.tokens_per_row <= 0 else min(t_cfg.tokens_per_row, T)
    S = max(1, min(t_cfg.subsets_per_step, K) // devices)
    members = 4 * K * math.ceil(1.5 * s.n * d / K)        # padded to the largest subset
    design = 12 * s.n * d + members
    itemsize = 4 if cfg.cache.dtype == "float32" else 2
    width = s.d_reader + s.d_final
    on_disk = cache_on_disk(cfg.cache, rows=s.n, seq_len=T, width=width, has_workdir=has_workdir)
    cache = itemsize * s.n * T * width
    tokens = 12 * s.n * T + RUNTIME
    state = 12 * K * r * C // devices + 3 * 4 * s.d_reader * r
    rows = t_cfg.rows_per_subset + t_cfg.stability_rows
    step = C_TRAIN * 4 * S * rows * Tp * V + 16 * S * r * C
    # On disk the cache stays in (reclaimable) page cache; the device gets each step's rows only.
    host_cache = 0 if on_disk else cache
    device_cache = itemsize * (S * devices * t_cfg.rows_per_subset + t_cfg.stability_rows) * T * \
        width if on_disk else cache
    if site == "residual":
        # the upper layers rerun on whole rows for every subset (activations kept for backward)
        step += 4 * S * rows * T * s.d_final * max(1, s.upper_layers) * 30
    qb = min(cfg.measure.query_batch, s.num_queries)
    sc = -(-min(cfg.measure.subset_chunk, K) // devices)      # rounded up to the devices
    measure = C_MEASURE * 4 * sc * qb * T * V + 3 * 4 * qb * T * V
    if site == "residual":
        # XLA keeps half as many [subsets, rows, T, V] floats there (measured), plus the upper
        # layers' activations.
        measure += 4 * sc * qb * T * s.d_final * max(1, s.upper_layers) * 4 - \
            C_MEASURE / 2 * 4 * sc * qb * T * V
    qc = min(cfg.solve.query_chunk, s.num_queries)
    solve = C_SOLVE * 8 * qc * (s.n + K) + (2 * 8 * K * K if cfg.solve.estimator != "lasso" else 0)
    Q = s.num_queries
    dense = scores_dense(cfg, num_queries=Q, n=s.n)
    # Dense: the [Q, n] matrix; top-k: one block's [query_chunk, n] plus 2 k entries per query.
    scores = 4 * Q * s.n if dense else 4 * qc * s.n + 24 * Q * cfg.topk
    # FSDP: each device holds 1/D of the frozen weights (plus transient gathers of one layer's).
    p = s.params_bytes // devices if cfg.parallel.model == "fsdp" else s.params_bytes
    return [
        StageMemory("design", design + RUNTIME, 0, f"K={K}, d={d}"),
        StageMemory("cache", host_cache + tokens, p + 4 * 64 * T * width,
                    f"{s.n} rows x {T} tokens x {width} {cfg.cache.dtype}"
                    f"{' on disk' if on_disk else ''}"),
        StageMemory("train", host_cache + tokens + design,
                    int(p + device_cache + tokens + state + step),
                    f"state {format_bytes(state)}, step {format_bytes(step)} "
                    f"({S} subsets/device x {rows} rows x {Tp} positions x V={V})"),
        StageMemory("measure", RUNTIME + 4 * s.num_queries * K + 12 * K * r * C,
                    int(p + 12 * K * r * C // devices + measure),
                    f"query_batch={qb}, subset_chunk={sc * devices}"),
        StageMemory("solve", int(RUNTIME + solve + 4 * Q * K + scores), 0,
                    f"query_chunk={qc}, n={s.n}, K={K}, scores "
                    f"{'dense' if dense else f'top {cfg.topk}'}"),
    ]


def plan_memory(cfg, shapes: Shapes, *, budget: int | str | None = None, devices: int = 1,
                device_budget: int | str | None = None, has_workdir: bool = True,
                unified: bool = False) -> MemoryPlan:
    """Estimate each stage's peak; with a budget, lower the result-neutral chunk sizes to fit.

    ``budget`` bounds the host, ``device_budget`` each device (default: the same as ``budget``).
    ``unified``: the devices are the host's own memory (a CPU): ``budget`` then bounds the host
    and all devices together. Raises :class:`MemoryBudgetError` naming the stage and what to
    change when even the smallest chunks do not fit.
    """
    host_b = parse_bytes(budget) if budget is not None else None
    dev_b = parse_bytes(device_budget) if device_budget is not None else host_b
    changes: list[str] = []
    original = cfg
    stages = _stages(cfg, shapes, devices, has_workdir=has_workdir)
    if host_b is None:
        return MemoryPlan(tuple(stages), cfg, None, (), devices, unified)

    def need(stage: StageMemory) -> tuple[str, int, int]:
        """Where a stage is over budget (``""``: it fits), what it needs and the budget there."""
        if unified:
            total = stage.host + devices * stage.device
            return ("host and devices together" if total > host_b else "", total, host_b)
        if stage.host > host_b:
            return "host", stage.host, host_b
        if dev_b is not None and stage.device > dev_b:
            return "per device", stage.device, dev_b
        return "", 0, 0

    def over(stage: StageMemory) -> bool:
        return bool(need(stage)[0])

    def by_name(name):
        return next((s for s in stages if s.stage == name), None)

    if getattr(cfg, "operators", "trained") == "closed_form":
        # The one result-neutral knob: rows per forward pass.
        while any(over(st) for st in stages) and cfg.closed_form.batch_size > max(1, devices):
            cfg = dataclasses.replace(cfg, closed_form=dataclasses.replace(
                cfg.closed_form, batch_size=max(devices, cfg.closed_form.batch_size // 2)))
            stages = _stages(cfg, shapes, devices, has_workdir=has_workdir)
    # Shrink the result-neutral chunks, halving the largest contributor first.
    for _ in range(64 if getattr(cfg, "operators", "trained") != "closed_form" else 0):
        if not over(by_name("measure")) or (
                cfg.measure.subset_chunk <= devices and cfg.measure.query_batch <= 1):
            break
        m = cfg.measure
        if m.subset_chunk > devices and m.subset_chunk // 2 >= devices:
            new = max(devices, (m.subset_chunk // 2) // devices * devices)
            cfg = dataclasses.replace(cfg, measure=dataclasses.replace(m, subset_chunk=new))
        else:
            cfg = dataclasses.replace(cfg, measure=dataclasses.replace(
                m, query_batch=max(1, m.query_batch // 2)))
        stages = _stages(cfg, shapes, devices, has_workdir=has_workdir)
    for _ in range(64 if getattr(cfg, "operators", "trained") != "closed_form" else 0):
        if not over(by_name("solve")) or cfg.solve.query_chunk <= 1:
            break
        cfg = dataclasses.replace(cfg, solve=dataclasses.replace(
            cfg.solve, query_chunk=max(1, cfg.solve.query_chunk // 2)))
        stages = _stages(cfg, shapes, devices, has_workdir=has_workdir)
    for section, key in (("measure", "query_batch"), ("measure", "subset_chunk"),
                         ("solve", "query_chunk"), ("closed_form", "batch_size")):
        was, now = getattr(getattr(original, section), key), getattr(getattr(cfg, section), key)
        if was != now:
            changes.append(f"{section}.{key}: {was} -> {now}")
    plan = MemoryPlan(tuple(stages), cfg, host_b, tuple(changes), devices, unified)
    bad = [s for s in stages if over(s)]
    if bad:
        s = bad[0]
        fix = {
            "design": "lower design.per_example or design.num_subsets",
            "cache": "use fewer or shorter training rows (data.seq_len), or a machine with more "
                     "memory (the activation cache is n x T x (D_reader + d_final) floats)",
            "train": "lower train.subsets_per_step, train.rows_per_subset, train.stability_rows "
                     "or train.tokens_per_row, use the final_hidden site (C = d_model instead of "
                     "the vocabulary), or shard over more devices (parallel.devices)",
            "measure": "shard over more devices (parallel.devices) or use the final_hidden site",
            "factors": "use the final_hidden site (its Fisher is d x d, not V x V), lower "
                       "closed_form.full_metric_limit (a diagonal Fisher) or closed_form.max_dim",
            "queries": "attribute fewer queries per run, or lower closed_form.max_dim",
            "scores": "set scores=topk (each query's top scores instead of the dense Q x n "
                      "matrix), attribute fewer queries per run, or lower closed_form.max_dim",
            "solve": "set scores=topk (keep each query's top scores instead of the dense "
                     "Q x n matrix), lower design.num_subsets (the ridge Gram is K x K) or use "
                     "solve.estimator=lasso",
        }[s.stage]
        where, needed, limit = need(s)
        raise MemoryBudgetError(
            f"the {s.stage} stage needs about {format_bytes(needed)} ({where}; {s.detail}) but "
            f"the budget is {format_bytes(limit)}, even with the smallest result-neutral chunks; "
            f"{fix}")
    return plan
