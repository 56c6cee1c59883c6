"""Method names, their settings and their parsing (``method`` / ``--method``, ``methods.*``).

The run config (:class:`~stride_jax.attributor.AttributeConfig`) reads this module, and
:mod:`stride_jax.methods` runs what it names; it imports nothing that runs a method, so the
config layer does not depend on the runners (and they may depend on it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal, NamedTuple

from stride_jax.config import check_ranges, option
from stride_jax.errors import ConfigError

METHODS = ("stride", "ekfac", "kfac", "trak", "logra", "tracin", "graddot", "influence", "repsim",
           "bm25")
ALIASES = {"if": "influence"}
GRADIENT_METHODS = ("ekfac", "kfac", "influence", "trak", "logra", "tracin", "graddot")
# Fixed per-method key indices (the first eight are those the suite always used).
KEY_INDEX = {"stride": 0, "influence": 1, "trak": 2, "logra": 3, "tracin": 4, "graddot": 5,
             "repsim": 6, "bm25": 7, "ekfac": 8, "kfac": 8}
# Kept beside the package root (package data, rewritten by benchmarks/mixture.py).
MIXTURE_FILE = Path(__file__).resolve().parents[1] / "mixture_default.json"


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
_DAMPING = {"damping": "> 0", "damping_fraction": "> 0"}
_DAMPING_FIX = {"damping": "or null: damping_fraction x the mean eigenvalue"}


@dataclasses.dataclass(frozen=True)
class EkfacConfig:
    """K-FAC / EK-FAC (:mod:`stride_jax.baselines.ekfac`)."""

    layers: str = option("blocks", "covered dense layers: blocks (every dense layer of the "
                                   "transformer blocks, as kronfluence's peer runs), all, mlp, attn, "
                                   "or a regular expression on layer names")
    fisher: Literal["true", "empirical"] = option(
        "true", "true: labels sampled from the model (Grosse et al.); empirical: the data labels")
    damping: float | None = option(None, "damping lambda; null: damping_fraction x the mean "
                                         "eigenvalue, per layer")
    damping_fraction: float = option(0.1, "relative damping used when damping is null "
                                          "(kronfluence's heuristic: 0.1)")
    batch_size: int = option(16, "rows per forward/backward pass (result-neutral up to rounding)")
    query_chunk: int | None = option(None, "queries preconditioned at once (each block is one pass "
                                           "over the training rows); null: all that fit "
                                           "query_memory")
    query_memory: str = option("1GiB", "memory for one block of preconditioned query gradients "
                                       "when query_chunk is null")
    checkpoint_every: int = option(64, "batches between atomic saves of a factor pass (resume)")

    def __post_init__(self) -> None:
        extra = _bytes_problems(self, "query_memory")
        if self.layers not in ("blocks", "all", "mlp", "attn"):
            import re
            try:
                re.compile(self.layers)
            except re.error as err:
                extra.append(("layers", self.layers, f"is neither blocks, all, mlp, attn nor a "
                                                     f"valid regular expression ({err})"))
        check_ranges(self, {**_DAMPING, "batch_size": ">= 1", "query_chunk": ">= 1",
                            "checkpoint_every": ">= 1"},
                     fixes={**_DAMPING_FIX, "query_chunk": "or null: as many as fit "
                                                           "query_memory"}, extra=extra)


def _bytes_problems(cfg: Any, name: str) -> list[tuple[str, Any, str]]:
    from stride_jax.parallel.memory import parse_bytes
    try:
        parse_bytes(getattr(cfg, name))
    except ConfigError as e:
        return [(name, getattr(cfg, name), f"is not a size: {e}")]
    return []


@dataclasses.dataclass(frozen=True)
class TrakConfig:
    """TRAK-style scores (:func:`stride_jax.baselines.gradient.trak`)."""

    proj_dim: int = option(2048, "projection dimension k")
    projection: Literal["auto", "gaussian", "sjlt"] = option(
        "auto", "gaussian when P x k floats fit 512 MiB, else a sparse JL transform")
    damping: float | None = option(None, "Gram damping; null: damping_fraction x the mean "
                                         "eigenvalue of the projected Gram")
    damping_fraction: float = option(0.1, "relative damping used when damping is null")

    def __post_init__(self) -> None:
        check_ranges(self, {**_DAMPING, "proj_dim": ">= 1"}, fixes=_DAMPING_FIX)


@dataclasses.dataclass(frozen=True)
class LograConfig:
    """LoGra-style scores (:func:`stride_jax.baselines.gradient.logra`)."""

    rank: int = option(16, "projection rank per side of each weight matrix")
    damping: float | None = option(None, "Gram damping; null: damping_fraction x the mean "
                                         "eigenvalue")
    damping_fraction: float = option(0.1, "relative damping used when damping is null")

    def __post_init__(self) -> None:
        check_ranges(self, {**_DAMPING, "rank": ">= 1"}, fixes=_DAMPING_FIX)


@dataclasses.dataclass(frozen=True)
class InfluenceConfig:
    """Exact influence functions, empirical Fisher (:func:`stride_jax.baselines.gradient.influence`)."""

    damping: float | None = option(None, "Fisher damping; null: damping_fraction x the mean "
                                         "eigenvalue")
    damping_fraction: float = option(0.1, "relative damping used when damping is null")
    memory_budget: str = option("4GiB", "refuse when the (n + Q) x P gradients exceed this")

    def __post_init__(self) -> None:
        check_ranges(self, _DAMPING, fixes=_DAMPING_FIX,
                     extra=_bytes_problems(self, "memory_budget"))


@dataclasses.dataclass(frozen=True)
class TracinConfig:
    """TracInCP (:func:`stride_jax.baselines.gradient.tracin`)."""

    checkpoints: tuple[str, ...] = option(
        (), "HF model directories saved along training (CLI); empty: the attributed model alone, "
            "which makes TracIn the gradient dot product (graddot) times its learning rate")
    learning_rates: tuple[float, ...] = option(
        (), "the learning rate in effect at each checkpoint; empty: 1 each")

    def __post_init__(self) -> None:
        extra = []
        if self.learning_rates and len(self.learning_rates) != len(self.checkpoints):
            extra.append(("learning_rates", list(self.learning_rates),
                          f"must give one rate per checkpoint ({len(self.checkpoints)}), or "
                          f"none: 1 each"))
        if not all(math.isfinite(r) and r > 0 for r in self.learning_rates):
            extra.append(("learning_rates", list(self.learning_rates),
                          "must be finite numbers > 0"))
        check_ranges(self, {}, extra=extra)


@dataclasses.dataclass(frozen=True)
class Bm25Config:
    """BM25 on token ids (:func:`stride_jax.baselines.text.bm25_scores`)."""

    k1: float = option(1.5, "term-frequency saturation")
    b: float = option(0.75, "length normalisation")

    def __post_init__(self) -> None:
        check_ranges(self, {"k1": ">= 0", "b": "in [0, 1]"})


@dataclasses.dataclass(frozen=True)
class MethodsConfig:
    """Settings of every method other than STRIDE (whose settings are the run config itself).
    Every setting is range-checked on construction (a typo must not cost a factor fit)."""

    ekfac: EkfacConfig = option(EkfacConfig(), "EK-FAC and K-FAC")
    trak: TrakConfig = option(TrakConfig(), "TRAK")
    logra: LograConfig = option(LograConfig(), "LoGra")
    influence: InfluenceConfig = option(InfluenceConfig(), "exact influence functions (if)")
    tracin: TracinConfig = option(TracinConfig(), "TracIn")
    bm25: Bm25Config = option(Bm25Config(), "BM25")
    repsim_layer: Literal["final", "reader"] = option("final", "hidden state compared by repsim")
    chunk: int = option(32, "examples per per-example-gradient chunk (trak, logra, tracin, graddot, "
                            "influence)")

    def __post_init__(self) -> None:
        check_ranges(self, {"chunk": ">= 1"})


# ---------------------------------------------------------------------------------------------
# Method names
# ---------------------------------------------------------------------------------------------
class MethodSpec(NamedTuple):
    """A parsed method: a single ``name``, or a mixture (``name == "mix"``) of ``components``
    ``((method, weight), ...)``."""

    name: str
    components: tuple[tuple[str, float], ...] = ()

    @property
    def text(self) -> str:
        if self.name != "mix":
            return self.name
        return "mix:" + ",".join(f"{m}={w:g}" for m, w in self.components)

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(m for m, _ in self.components) if self.name == "mix" else (self.name,)


def default_mixture() -> dict[str, float]:
    """The default mixture's weights (``stride_jax/mixture_default.json``)."""
    data = json.loads(MIXTURE_FILE.read_text(encoding="utf-8"))
    return {str(k): float(v) for k, v in data["weights"].items()}


def _canonical(name: str) -> str:
    name = name.strip()
    name = ALIASES.get(name, name)
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(METHODS)}, if, or a "
                         f"mixture such as mix:stride=0.25,ekfac=0.75 (mix: the default mixture)")
    return name


def parse_method(text: str) -> MethodSpec:
    """``"ekfac"`` -> ``MethodSpec("ekfac")``; ``"mix:stride=0.25,ekfac=0.75"`` -> a mixture;
    ``"mix"`` or ``"mix:default"`` -> the default mixture. Errors name the problem."""
    text = str(text).strip()
    if text in ("mix", "mix:default"):
        comps = tuple(default_mixture().items())
    elif text.startswith("mix:"):
        comps = []
        for part in text[4:].split(","):
            if "=" not in part:
                raise ConfigError(f"mixture component {part.strip()!r} in {text!r} needs a weight: "
                                 f"write METHOD=WEIGHT, e.g. mix:stride=0.25,ekfac=0.75")
            m, w = part.split("=", 1)
            try:
                weight = float(w)
            except ValueError:
                raise ConfigError(f"weight {w.strip()!r} of {m.strip()!r} in {text!r} is not a "
                                 f"number") from None
            if not math.isfinite(weight):
                raise ConfigError(f"weight of {m.strip()!r} in {text!r} must be finite")
            comps.append((_canonical(m), weight))
        names = [m for m, _ in comps]
        dup = sorted({m for m in names if names.count(m) > 1})
        if dup:
            raise ConfigError(f"{text!r} lists {dup} more than once; give each method one weight")
        if not any(w != 0 for _, w in comps):
            raise ConfigError(f"{text!r} has no nonzero weight")
        comps = tuple(comps)
    else:
        return MethodSpec(_canonical(text))
    return MethodSpec("mix", comps)
