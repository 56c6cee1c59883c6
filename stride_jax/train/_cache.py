"""The frozen model's activations on the training set, computed once and reused.

Operator training never updates the base model, so the reader-layer activations and the final
hidden states of every training row are computed in one pass (:func:`build_cache`) and training
touches only the small operator network. The cache lives in memory when it fits, or in ``.npy``
files read through memory maps (``directory=...``), written chunk by chunk so a killed build
resumes from the last finished chunk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax.data import TokenizedSet
from stride_jax.errors import ConfigError, DataError
from stride_jax.steering import LMFunctions


class ActivationCache(NamedTuple):
    """``reader [n, T, D]`` (reader layer) and ``final [n, T, d]`` (final hidden), float32 or
    bfloat16, in memory or memory-mapped from disk."""

    reader: np.ndarray
    final: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.reader.shape[0])

    def nbytes(self) -> int:
        return int(self.reader.nbytes + self.final.nbytes)


DTYPES = ("float32", "bfloat16")


def _np_dtype(name: str):
    if name not in DTYPES:
        raise ConfigError(f"cache dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    import ml_dtypes
    return np.dtype(np.float32) if name == "float32" else np.dtype(ml_dtypes.bfloat16)


def _feature_fn(lm: LMFunctions, dtype):
    @jax.jit
    def run(params, ids, mask):
        h_reader, h_final = lm.features(params, ids, mask)
        return h_reader.astype(dtype), h_final.astype(dtype)
    return run


def check_rows_fit(lm: LMFunctions, data: TokenizedSet, what: str) -> None:
    if data.seq_len > lm.max_len:
        raise DataError(f"{what} rows have {data.seq_len} tokens but the model's context is "
                        f"{lm.max_len}; re-tokenize with seq_len <= {lm.max_len}")
    in_vocab = lm.input_vocab_size or lm.vocab_size
    if len(data) and int(data.input_ids.max()) >= in_vocab:
        raise DataError(f"{what} token ids reach {int(data.input_ids.max())} but the model's "
                        f"vocabulary has {in_vocab} entries: the tokenizer does not match the "
                        f"model; use the tokenizer saved with the model")
    if len(data) and data.targets is None and data.loss_mask[:, -1].any():
        row = data.ids[int(np.flatnonzero(data.loss_mask[:, -1])[0])]
        raise DataError(f"{what} row {row!r} has loss_mask 1 in its last column, which predicts "
                        f"no token: loss_mask[:, t] marks the position that predicts token t+1; "
                        f"build the rows with TokenizedSet.from_arrays, which shifts for you")
    if len(data) and data.targets is not None:
        scored = data.targets[data.loss_mask > 0]
        if scored.size and (scored.min() < 0 or scored.max() >= lm.vocab_size):
            raise DataError(f"{what} targets must lie in 0 .. {lm.vocab_size - 1} (the model's "
                            f"output classes); found {int(scored.min())} .. {int(scored.max())}")


MARK_BYTES = 256 << 20


def build_cache(lm: LMFunctions, data: TokenizedSet, *, batch_size: int = 64,
                directory: str | os.PathLike | None = None, progress: bool = False,
                dtype: str = "float32") -> ActivationCache:
    """Run the frozen model over ``data`` once; keep reader and final activations.

    Batches are padded to a fixed shape so the feature function compiles once. ``dtype``
    ``bfloat16`` halves the cache (activations rounded to 8 mantissa bits); ``directory`` keeps
    it in memory-mapped files that a killed build resumes chunk by chunk.
    """
    check_rows_fit(lm, data, "training")
    n, t = data.input_ids.shape
    np_dtype = _np_dtype(dtype)
    run = _feature_fn(lm, jnp.dtype(np_dtype))
    shapes = {"reader": (n, t, lm.d_reader), "final": (n, t, lm.d_final)}
    if directory is None:
        arrays = {k: np.empty(s, np_dtype) for k, s in shapes.items()}
        done = 0
    else:
        # A resumed build must be of this model: never another one's activations.
        lm = lm.with_fingerprint()
        arrays, done = _open_disk_cache(Path(directory), shapes, lm.fingerprint, dtype)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, initial=done, desc="cache activations", unit="row", dynamic_ncols=True)
    row_bytes = t * (lm.d_reader + lm.d_final) * np.dtype(np_dtype).itemsize
    unmarked = 0
    for start in range(done, n, batch_size):
        stop = min(start + batch_size, n)
        idx = np.arange(start, start + batch_size) % n  # pad the last batch by wrapping
        hr, hf = run(lm.params, jnp.asarray(data.input_ids[idx]),
                     jnp.asarray(data.attention_mask[idx]))
        arrays["reader"][start:stop] = np.asarray(hr)[: stop - start]
        arrays["final"][start:stop] = np.asarray(hf)[: stop - start]
        unmarked += (stop - start) * row_bytes
        # Progress is made durable (flush + fsync + cache.json) every MARK_BYTES and at the end:
        # marking every batch spent ~12% of the stage in fsync; a kill loses at most that much.
        if directory is not None and (unmarked >= MARK_BYTES or stop == n):
            _mark_progress(Path(directory), stop, lm.fingerprint, arrays, dtype)
            unmarked = 0
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    return ActivationCache(arrays["reader"], arrays["final"])


def _open_disk_cache(directory: Path, shapes, fingerprint: str, dtype: str = "float32"):
    directory.mkdir(parents=True, exist_ok=True)
    meta_path = directory / "cache.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    fresh = meta is None or meta.get("fingerprint") != fingerprint or \
        {k: list(v) for k, v in shapes.items()} != meta.get("shapes") or \
        meta.get("dtype", "float32") != dtype
    np_dtype = _np_dtype(dtype)
    arrays = {}
    for name, shape in shapes.items():
        path = directory / f"{name}.npy"
        if fresh or not path.is_file():
            arrays[name] = np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=shape)
        else:
            # .npy stores bfloat16 as opaque 2-byte records: view them as what they are.
            arrays[name] = np.load(path, mmap_mode="r+", allow_pickle=False).view(np_dtype)
    done = 0 if fresh else int(meta.get("rows_done", 0))
    if fresh:
        _mark_progress(directory, 0, fingerprint, arrays, dtype)
    return arrays, done


def _mark_progress(directory: Path, rows_done: int, fingerprint: str, arrays,
                   dtype: str = "float32") -> None:
    from stride_jax.io.atomic import atomic_path
    for a in arrays.values():
        if isinstance(a, np.memmap):
            a.flush()
    # every_process: in a multi-host run each process caches into a directory of its own.
    with atomic_path(directory / "cache.json", every_process=True) as tmp:
        tmp.write_text(json.dumps(
            {"fingerprint": fingerprint, "rows_done": rows_done, "dtype": dtype,
             "shapes": {k: list(v.shape) for k, v in arrays.items()}}))
