"""Devices, hosts and placement: one place that decides how STRIDE's arrays live on devices.

STRIDE's heavy axis is the subset axis ``k``: operators are independent given the shared basis,
so operator training and measurement split their chunk of subsets over devices, each device
holding ``K / D`` operators (coefficients and their Adam moments) and computing their losses and
responses; the basis gradient is the only cross-device reduction (an all-reduce XLA inserts).
The frozen base model, the activation cache and the sampled row indices are replicated.

Axes. ``"subsets"`` (operator training, measurement) is a mesh over ``D = ParallelConfig.devices``
devices; with several processes these are global devices, ``D / P`` from each of the ``P``
processes. ``"queries"`` (the solver) is a mesh over this process's own devices: the queries are
split first over processes (:func:`process_slice`), then each process's query chunks are split
over its devices (:func:`query_sharding`). ``D = 1`` in one process is the single-device path (no
sharding annotations at all), so the parallel code is a config switch, not a fork.

Multi-host (``distributed: true``): :func:`initialize` calls ``jax.distributed.initialize`` before
JAX does any work. With no address given, JAX finds the cluster itself (TPU pods, SLURM, Open MPI,
Kubernetes); elsewhere give ``coordinator_address``, ``num_processes`` and ``process_id`` (or set
them per process with ``STRIDE_JAX_PROCESS_ID`` etc., see :class:`ParallelConfig`). Every process
runs the same program on the same inputs (each reads and tokenizes the data itself, and the
activation cache on disk is per process); only process 0 logs progress and writes files
(:func:`is_writer`; the project's atomic writers skip the write elsewhere).

Sharding changes only the order of floating-point reductions: results agree with a single device
to float tolerance (tested with 8 fake CPU devices in one process and with 2 processes of 4), and
the subset/row draws do not depend on ``D`` because every draw is keyed by
``fold_in(key, subset_id)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
from typing import Any, Iterator, Literal

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from stride_jax.config import check_ranges, option
from stride_jax.errors import ConfigError
from stride_jax.io.atomic import is_writer  # the one rule: process 0 logs and writes

SUBSETS = "subsets"
QUERIES = "queries"

__all__ = ["ParallelConfig", "QUERIES", "SUBSETS", "SubsetMesh", "initialize", "is_writer",
           "make_mesh", "make_query_mesh", "place_queries", "process_dir", "process_slice",
           "query_sharding", "to_host"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Devices sharing the subset axis, and the processes of a multi-host run (neither changes
    results beyond float rounding)."""

    devices: int = option(1, "devices the subset axis is sharded over (0: all devices of all "
                             "processes); design.num_subsets, train.subsets_per_step and "
                             "measure.subset_chunk must be multiples of it; with several "
                             "processes, a multiple of their number")
    distributed: bool = option(
        False, "multi-host: call jax.distributed.initialize() before any work, so every process "
               "of the job joins one runtime (TPU pods, GPU clusters, SLURM, Open MPI); process "
               "0 alone logs and writes")
    coordinator_address: str | None = option(
        None, "host:port of process 0 (null: found by JAX's cluster detection, or the "
              "environment variable STRIDE_JAX_COORDINATOR)")
    num_processes: int | None = option(
        None, "processes in the job (null: cluster detection, or STRIDE_JAX_NUM_PROCESSES)")
    process_id: int | None = option(
        None, "this process's rank (null: cluster detection, or STRIDE_JAX_PROCESS_ID)")
    model: Literal["auto", "replicate", "fsdp"] = option(
        "auto", "the frozen base model's weights: a full copy on every device (replicate), or "
                "each large weight split over the devices of the subset axis along its largest "
                "divisible dimension (fsdp: for a model that does not fit one device; XLA "
                "gathers each weight where it is used); auto: fsdp when the weights exceed half "
                "of a device's memory (as the device reports it; CPUs report none: replicate)")
    fsdp_min_size: int = option(
        1 << 14, "with model=fsdp, weights smaller than this many elements stay replicated "
                 "(splitting norms and biases saves nothing and costs a gather each)")
    solver_devices: int = option(
        1, "this process's devices each chunk of queries is split over in the solver (0: all "
           "local devices); solve.query_chunk is rounded up to a multiple of it")

    def __post_init__(self) -> None:
        if self.model not in ("auto", "replicate", "fsdp"):
            raise ConfigError(f"parallel.model must be 'auto', 'replicate' or 'fsdp', got "
                              f"{self.model!r}")
        extra = []
        if (self.num_processes is not None and self.process_id is not None
                and self.process_id >= self.num_processes >= 1):
            extra.append(("process_id", self.process_id,
                          f"must be below num_processes={self.num_processes} (ranks count from 0)"))
        check_ranges(self, {"devices": ">= 0", "num_processes": ">= 1", "process_id": ">= 0",
                            "fsdp_min_size": ">= 0", "solver_devices": ">= 0"},
                     fixes={"devices": "0 uses all devices",
                            "solver_devices": "0 uses all local devices"}, extra=extra)


def indivisible(devices: int, value: int) -> str:
    """What to say of a size of the subset axis (``value``) that ``devices`` do not divide."""
    return (f"not divisible by the {devices} devices of parallel.devices: the subset axis is "
            f"split evenly over devices; use a multiple of {devices} (e.g. "
            f"{devices * max(1, value // devices)}) or change parallel.devices")


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise ConfigError(f"environment variable {name}={v!r} must be an integer") from None


def initialize(cfg: ParallelConfig | None) -> bool:
    """Join the multi-host runtime when ``cfg.distributed`` (idempotent). Returns whether this is
    a multi-process run. Must run before JAX creates any array (the CLI does it first thing)."""
    if cfg is None or not cfg.distributed:
        return False
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    kw = {"coordinator_address": cfg.coordinator_address
          or os.environ.get("STRIDE_JAX_COORDINATOR") or None,
          "num_processes": cfg.num_processes if cfg.num_processes is not None
          else _env_int("STRIDE_JAX_NUM_PROCESSES"),
          "process_id": cfg.process_id if cfg.process_id is not None
          else _env_int("STRIDE_JAX_PROCESS_ID")}
    kw = {k: v for k, v in kw.items() if v is not None}
    try:
        jax.distributed.initialize(**kw)
    except RuntimeError as e:
        raise RuntimeError(
            f"parallel.distributed=true but jax.distributed.initialize({kw}) failed: {e}. Call "
            f"it before any JAX computation (stride_jax.parallel.initialize(cfg) first thing in "
            f"your script); outside TPU pods/SLURM/Open MPI give parallel.coordinator_address, "
            f"parallel.num_processes and parallel.process_id") from e
    log.info("process %d of %d joined; %d global devices", jax.process_index(),
             jax.process_count(), jax.device_count())
    return jax.process_count() > 1


def to_host(x: Any) -> np.ndarray:
    """A device array as a host numpy array, gathering shards held by other processes."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _host_input(x: Any) -> Any:
    # A multi-process placement needs the same host value on every process; an array already
    # spread over the global devices is resharded as it is.
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x
    return np.asarray(x) if jax.process_count() > 1 else x


class SubsetMesh:
    """A 1-D mesh over ``D`` devices with helpers to place subset-sharded and replicated arrays."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.size = mesh.devices.size
        self.by_subset = NamedSharding(mesh, P(SUBSETS))
        self.replicated = NamedSharding(mesh, P())

    def check_divides(self, **sizes: int) -> None:
        """Refuse sizes of the subset axis that ``D`` devices cannot split evenly."""
        bad = {k: v for k, v in sizes.items() if v % self.size}
        if bad:
            shown = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise ConfigError(f"{shown} {indivisible(self.size, min(bad.values()))}")

    def shard(self, x: Any) -> Any:
        """Place a pytree with its leading (subset) axis split over the devices."""
        return jax.tree.map(lambda a: jax.device_put(_host_input(a), self.by_subset), x)

    def replicate(self, x: Any) -> Any:
        return jax.tree.map(lambda a: jax.device_put(_host_input(a), self.replicated), x)

    def shard_weights(self, params: Any, min_size: int = 1 << 14) -> Any:
        """FSDP placement of a frozen model: every weight of at least ``min_size`` elements is
        split over the devices along its largest dimension that they divide; small ones (norms,
        biases) and indivisible ones are replicated. Each device then holds about 1/D of the
        model; a jitted function that uses a weight gets it all-gathered by XLA."""
        def place(x):
            spec = [None] * np.ndim(x)
            if np.size(x) >= min_size:
                for a in sorted(range(np.ndim(x)), key=lambda a: -np.shape(x)[a]):
                    if np.shape(x)[a] % self.size == 0:
                        spec[a] = SUBSETS
                        break
            return jax.device_put(_host_input(x), NamedSharding(self.mesh, P(*spec)))
        return jax.tree.map(place, params)

    def weights_fit(self, params: Any) -> bool:
        """Whether the weights take at most half of one device's memory (unknown: True)."""
        try:
            limit = (self.mesh.devices.flat[0].memory_stats() or {}).get("bytes_limit")
        except Exception:   # backends without memory statistics
            limit = None
        size = sum(np.size(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
        return limit is None or size <= limit // 2

    def constrain(self, x: Any) -> Any:
        """Inside jit: ask for the leading axis of every leaf to be split over the devices."""
        return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, self.by_subset), x)


def _mesh_devices(want: int) -> list:
    """``want`` devices, the same number from every process, in one global order."""
    P_ = jax.process_count()
    devices = jax.devices()
    if want == 0:
        want = len(devices)
    if want < 0:
        raise ConfigError(f"parallel.devices={want} must be >= 0 (0: all devices)")
    if want > len(devices):
        raise ConfigError(
            f"parallel.devices={want} but {'this process sees' if P_ == 1 else 'the job has'} "
            f"{len(devices)} {devices[0].platform} device(s); lower parallel.devices (0 uses "
            f"all), or on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={want} "
            f"before JAX starts")
    if want % P_:
        raise ConfigError(
            f"parallel.devices={want} is not a multiple of the {P_} processes: each process "
            f"contributes the same number of devices; use a multiple of {P_} (0: all)")
    per = want // P_
    by_proc: dict[int, list] = {}
    for d in sorted(devices, key=lambda d: (d.process_index, d.id)):
        by_proc.setdefault(d.process_index, []).append(d)
    return [d for p in sorted(by_proc) for d in by_proc[p][:per]]


def make_mesh(cfg: ParallelConfig | int | None) -> SubsetMesh | None:
    """The subset mesh for ``cfg`` (None for one device in one process: the unannotated path)."""
    want = cfg.devices if isinstance(cfg, ParallelConfig) else (cfg or 1)
    devices = _mesh_devices(want)
    if len(devices) == 1:
        return None
    return SubsetMesh(Mesh(np.array(devices), (SUBSETS,)))


def make_query_mesh(cfg: ParallelConfig | int | None) -> Mesh | None:
    """This process's mesh for the solver's query axis (None: one device)."""
    want = cfg.solver_devices if isinstance(cfg, ParallelConfig) else (cfg or 1)
    local = jax.local_devices()
    if want == 0:
        want = len(local)
    if not 1 <= want <= len(local):
        raise ConfigError(
            f"parallel.solver_devices={want} but this process has {len(local)} device(s); use "
            f"1..{len(local)} (0: all)")
    return None if want == 1 else Mesh(np.array(local[:want]), (QUERIES,))


_QUERY_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar(
    "stride_jax_query_mesh", default=None)


@contextlib.contextmanager
def query_sharding(mesh: Mesh | None) -> Iterator[None]:
    """Within the block, the solvers split each chunk of queries over ``mesh``'s devices."""
    token = _QUERY_MESH.set(mesh)
    try:
        yield
    finally:
        _QUERY_MESH.reset(token)


def query_devices() -> int:
    """Devices the current query chunks are split over (1 outside :func:`query_sharding`)."""
    mesh = _QUERY_MESH.get()
    return 1 if mesh is None else mesh.devices.size


def place_queries(x: Any, axis: int, dtype: Any = None) -> jax.Array:
    """``x`` on the device(s): split along ``axis`` (the query axis) inside
    :func:`query_sharding`, else on the default device."""
    import jax.numpy as jnp
    mesh = _QUERY_MESH.get()
    if mesh is None:
        return jnp.asarray(x, dtype)
    spec = [None] * np.ndim(x)
    spec[axis] = QUERIES
    return jax.device_put(np.asarray(x, dtype), NamedSharding(mesh, P(*spec)))


def process_dir(path: Any) -> Any:
    """``path`` itself in a single-process run, else this process's own subdirectory of it (for
    files every process writes for itself: its tokenized rows, its activation cache)."""
    if jax.process_count() == 1:
        return path
    return path / f"process{jax.process_index()}"


def process_slice(num: int) -> tuple[int, int, int]:
    """This process's share ``[start, stop)`` of ``num`` items split evenly over the processes,
    and the padded share size every process uses (so all gathers have one shape)."""
    P_, p = jax.process_count(), jax.process_index()
    per = -(-num // P_)
    start = min(p * per, num)
    return start, min(start + per, num), per
