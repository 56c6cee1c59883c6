"""Retraining ground truth: the model retrained on many random subsets, and every query's loss.

For ``S`` subsets :math:`s` of a fraction :math:`\\alpha` of the ``n`` training examples (each
exactly :math:`m = \\mathrm{round}(\\alpha n)` examples, drawn by
``permutation(fold_in(key, s), n)[:m]``), the model is retrained with the attributed model's own
recipe and initialisation on the subset, and the loss :math:`L_q(\\theta_s)` of every query is
recorded. The Linear Datamodeling Score (:func:`stride_jax.eval.metrics.lds`) compares these
losses with the sums of attribution scores over each subset.

Retrains run ``parallel`` at a time (the task's retrain function vmaps over model copies); each
finished chunk is saved atomically under ``chunks/``, so a killed run resumes where it stopped and
a finished chunk is never recomputed. Because every subset and its retrain depend only on
``(seed, subset id)``, the result does not depend on where a run was interrupted.

Directory layout::

    stamp.json        what made it (task fingerprint, config); a rerun with other arguments refuses
    chunks/NNNNNN.npy losses [p, Q] of subsets NNNNNN .. NNNNNN+p-1
    masks.npy         bool [S, n] (written at the end)
    losses.npy        float64 [S, Q] (written at the end)
    groundtruth.json  config, shapes, timings
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import jax
import numpy as np

from stride_jax.config import SEED_RANGE, check_ranges, option, to_dict
from stride_jax.errors import ConfigError, DataError, ModelError, NonFiniteError
from stride_jax.io.atomic import load_npy, save_npy, write_json
from stride_jax.io.stamps import complete_stage, open_stage

log = logging.getLogger(__name__)

RetrainFn = Callable[[np.ndarray], np.ndarray]
"""``subsets_pm`` int32 ``[p, m]`` (sorted training indices) -> query losses ``[p, Q]``."""


@dataclasses.dataclass(frozen=True)
class GroundTruthConfig:
    """How many retrains, on what fraction, and how many at once."""

    num_subsets: int = option(256, "S: retrained subsets (paper: 256; fewer on small machines)")
    alpha: float = option(0.3, "fraction of the training set in each subset (paper: 0.3)")
    parallel: int = option(8, "retrains run at once (vmapped model copies); memory grows with it")
    seed: int = option(0, "seed of the subset draws (retrains reuse the attributed model's seed)")

    def __post_init__(self) -> None:
        check_ranges(self, {"num_subsets": ">= 3", "alpha": "in (0, 1)", "parallel": ">= 1",
                            "seed": SEED_RANGE},
                     fixes={"num_subsets": "a rank correlation needs a few retrains (paper: "
                                           "256)",
                            "alpha": "the fraction of the training set in each subset (paper: "
                                     "0.3)"})


class GroundTruth(NamedTuple):
    masks_sn: np.ndarray     # bool [S, n]
    losses_sq: np.ndarray    # float64 [S, Q]
    info: dict


def validate(cfg: GroundTruthConfig, n: int) -> int:
    """Check the config against ``n``; return the subset size ``m``."""
    if n < 2:
        raise ConfigError(f"ground truth needs at least 2 training examples, got {n}")
    if cfg.num_subsets < 3:
        raise ConfigError(f"groundtruth.num_subsets={cfg.num_subsets} is too few for a rank "
                          f"correlation; use >= 3 (paper: 256)")
    if cfg.parallel < 1:
        raise ConfigError(f"groundtruth.parallel={cfg.parallel} must be >= 1")
    if not 0.0 < cfg.alpha < 1.0:
        raise ConfigError(f"groundtruth.alpha={cfg.alpha} must lie strictly between 0 and 1 "
                          f"(paper: 0.3)")
    m = int(round(cfg.alpha * n))
    if not 1 <= m < n:
        raise ConfigError(f"groundtruth.alpha={cfg.alpha} gives subsets of {m} of {n} examples; "
                          f"raise alpha (or n) so that 1 <= alpha * n < n")
    return m


def subset_indices(n: int, num_subsets: int, m: int, *, key: jax.Array,
                   start: int = 0) -> np.ndarray:
    """``[num_subsets, m]`` sorted indices; subset ``s`` from ``fold_in(key, start + s)`` only."""
    out = np.empty((num_subsets, m), np.int32)
    for s in range(num_subsets):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, start + s), n))
        out[s] = np.sort(perm[:m])
    return out


def masks_from_indices(subsets_sm: np.ndarray, n: int) -> np.ndarray:
    masks = np.zeros((subsets_sm.shape[0], n), bool)
    np.put_along_axis(masks, subsets_sm.astype(np.int64), True, axis=1)
    return masks


def run_groundtruth(retrain: RetrainFn, *, n: int, num_queries: int, cfg: GroundTruthConfig,
                    out_dir: str | Path | None = None, stamp: Mapping[str, Any] | None = None,
                    overwrite: bool = False, progress: bool = True,
                    on_chunk: Callable[[int], None] | None = None) -> GroundTruth:
    """Retrain on ``cfg.num_subsets`` subsets, ``cfg.parallel`` at a time; resumable.

    Args:
      retrain: the task's retrain function (see :data:`RetrainFn`); it must be a pure function of
        the subset indices, so a resumed run equals an uninterrupted one.
      n, num_queries: training-set and query-set sizes.
      out_dir: where chunks and the result go (None: memory only, no resume).
      stamp: what identifies the task (model recipe, data fingerprints); stored and compared.
      on_chunk: called with the index of the first subset of each finished chunk (tests use it to
        interrupt a run).
    """
    m = validate(cfg, n)
    S, P = cfg.num_subsets, min(cfg.parallel, cfg.num_subsets)
    key = jax.random.key(cfg.seed)
    subsets = subset_indices(n, S, m, key=key)
    payload = {"stage": "groundtruth", "task": dict(stamp or {}), "n": n, "queries": num_queries,
               "alpha": cfg.alpha, "seed": cfg.seed}
    # num_subsets and parallel are not stamped: more subsets extend a finished run, and the chunk
    # size does not change any retrain. Chunk files are keyed by their first subset.
    out = Path(out_dir) if out_dir is not None else None
    done: dict[int, np.ndarray] = {}
    if out is not None:
        if open_stage(out, "groundtruth", payload, overwrite=overwrite) and \
                (out / "losses.npy").is_file():
            losses = load_npy(out / "losses.npy")
            if losses.shape[0] >= S:
                info = json.loads((out / "groundtruth.json").read_text())
                return GroundTruth(load_npy(out / "masks.npy")[:S], losses[:S],
                                   dict(info, retrained=0))
        (out / "chunks").mkdir(parents=True, exist_ok=True)
        for f in sorted((out / "chunks").glob("*.npy")):
            a = load_npy(f)
            if a.ndim != 2 or a.shape[1] != num_queries:
                raise DataError(f"{f} holds losses of shape {a.shape}, not [p, {num_queries}]; "
                                f"the directory is corrupt: delete it or pass --overwrite")
            done[int(f.stem)] = a

    losses = np.full((S, num_queries), np.nan, np.float64)
    for start, a in done.items():
        stop = min(start + a.shape[0], S)
        if start < S:
            losses[start:stop] = a[: stop - start]
    todo = [s for s in range(S) if np.isnan(losses[s]).all()]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=S, initial=S - len(todo), desc="retrain subsets", unit="subset",
                   dynamic_ncols=True)
    t0 = time.perf_counter()
    timings = []
    i = 0
    while i < len(todo):
        # A chunk is a run of consecutive missing subsets, at most P long.
        chunk = [todo[i]]
        while len(chunk) < P and i + len(chunk) < len(todo) and \
                todo[i + len(chunk)] == chunk[-1] + 1:
            chunk.append(todo[i + len(chunk)])
        i += len(chunk)
        idx = subsets[chunk]
        if len(chunk) < P:  # fixed shape: pad with repeats (one compile), then drop them
            idx = np.concatenate([idx, np.repeat(idx[-1:], P - len(chunk), axis=0)])
        tc = time.perf_counter()
        got = np.asarray(retrain(idx), np.float64)[: len(chunk)]
        timings.append(time.perf_counter() - tc)
        if got.shape != (len(chunk), num_queries):
            raise ModelError(f"retrain returned shape {got.shape}; expected [{len(chunk)}, "
                             f"{num_queries}]")
        if not np.isfinite(got).all():
            bad = chunk[int(np.argwhere(~np.isfinite(got))[0][0])]
            raise NonFiniteError(
                f"retraining on subset {bad} gave a non-finite query loss; lower the recipe's "
                f"learning rate (finished subsets are kept in {out}/chunks)" if out else
                f"retraining on subset {bad} gave a non-finite query loss; lower the learning rate")
        losses[chunk] = got
        if out is not None:
            save_npy(out / "chunks" / f"{chunk[0]:06d}.npy", got)
        if bar is not None:
            bar.update(len(chunk))
        if on_chunk is not None:
            on_chunk(chunk[0])
    if bar is not None:
        bar.close()
    masks = masks_from_indices(subsets, n)
    info = {"config": to_dict(cfg), "subset_size": m, "n": n, "queries": num_queries,
            "seconds": time.perf_counter() - t0, "retrained": len(todo),
            "seconds_per_chunk": timings, "task": dict(stamp or {})}
    if out is not None:
        save_npy(out / "masks.npy", masks)
        save_npy(out / "losses.npy", losses)
        write_json(out / "groundtruth.json", info, indent=1, default=str)
        complete_stage(out, "groundtruth", payload)
    return GroundTruth(masks, losses, info)


def load_groundtruth(directory: str | Path) -> GroundTruth:
    """A finished ground-truth directory (see the module docstring)."""
    d = Path(directory)
    if d.is_file():
        raise FileNotFoundError(f"{d} is a file, not a ground-truth directory; pass the --out "
                                f"directory of `stride-jax groundtruth`")
    missing = [f for f in ("masks.npy", "losses.npy", "groundtruth.json") if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{d} is not a finished ground-truth directory (missing "
                                f"{', '.join(missing)}); run `stride-jax groundtruth` into it "
                                f"(it resumes an unfinished one)")
    fix = "rerun `stride-jax groundtruth` into it (it resumes an unfinished one)"
    try:
        info = json.loads((d / "groundtruth.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{d / 'groundtruth.json'} is not valid JSON ({e}); {fix}") from None
    return GroundTruth(load_npy(d / "masks.npy", hint=fix), load_npy(d / "losses.npy", hint=fix),
                       info)
