"""Device meshes and placement: one place that decides how STRIDE's arrays live on devices.

STRIDE's heavy axis is the subset axis ``k``: operators are independent given the shared basis,
so operator training and measurement split their chunk of subsets over devices, each device
holding ``K / D`` operators (coefficients and their Adam moments) and computing their losses and
responses; the basis gradient is the only cross-device reduction (an all-reduce XLA inserts).
The frozen base model, the activation cache and the sampled row indices are replicated.

One mesh axis, ``"subsets"``, over ``D = ParallelConfig.devices`` local devices. ``D = 1`` is the
single-device path (no sharding annotations at all), so the parallel code is a config switch,
not a fork. Sharding changes only the order of floating-point reductions: results agree with a
single device to float tolerance (tested on 8 fake CPU devices), and the subset/row draws do not
depend on ``D`` because every draw is keyed by ``fold_in(key, subset_id)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from stride_jax.config import option

SUBSETS = "subsets"

__all__ = ["ParallelConfig", "SubsetMesh", "SUBSETS", "make_mesh"]


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How many devices share the subset axis (does not change results beyond float rounding)."""

    devices: int = option(1, "devices the subset axis is sharded over (0: all local devices); "
                             "design.num_subsets, train.subsets_per_step and "
                             "measure.subset_chunk must be multiples of it")


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
            raise ValueError(
                f"{shown} not divisible by the {self.size} devices of parallel.devices: the "
                f"subset axis is split evenly over devices; use a multiple of {self.size} "
                f"(e.g. {self.size * max(1, min(bad.values()) // self.size)}) or change "
                f"parallel.devices")

    def shard(self, x: Any) -> Any:
        """Place a pytree with its leading (subset) axis split over the devices."""
        return jax.device_put(x, self.by_subset)

    def replicate(self, x: Any) -> Any:
        return jax.device_put(x, self.replicated)

    def constrain(self, x: Any) -> Any:
        """Inside jit: ask for the leading axis of every leaf to be split over the devices."""
        return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, self.by_subset), x)


def make_mesh(cfg: ParallelConfig | int | None) -> SubsetMesh | None:
    """The subset mesh for ``cfg`` (None for a single device: the unannotated path)."""
    want = cfg.devices if isinstance(cfg, ParallelConfig) else (cfg or 1)
    devices = jax.local_devices()
    if want == 0:
        want = len(devices)
    if want < 0:
        raise ValueError(f"parallel.devices={want} must be >= 0 (0: all local devices)")
    if want > len(devices):
        raise ValueError(
            f"parallel.devices={want} but this process sees {len(devices)} "
            f"{devices[0].platform} device(s); lower parallel.devices (0 uses all), or on CPU "
            f"set XLA_FLAGS=--xla_force_host_platform_device_count={want} before JAX starts")
    if want == 1:
        return None
    return SubsetMesh(Mesh(devices[:want], (SUBSETS,)))
