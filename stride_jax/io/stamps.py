"""Argument stamps: every stage directory records what made it, and refuses to be reused otherwise.

A stage writes ``stamp.json`` = ``{"stage", "payload", "complete"}`` before it starts (``complete``
false) and again when it finishes (``complete`` true). A rerun with the same payload reuses a
complete artifact or resumes an incomplete one; a rerun with a different payload stops with a
message naming the keys that changed, unless ``overwrite`` is given. Reuse and resumption are
logged (INFO, ``stride_jax.io.stamps``) with the stage and the short hash of its stamp, so a result
that came from disk is never silent.

Fingerprints of the inputs that stamps record live here too: :func:`array_fingerprint` (arrays,
e.g. token rows) and :func:`pytree_fingerprint` (a model's parameters).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from stride_jax.errors import StaleArtifactError
from stride_jax.io.atomic import atomic_write_text, is_writer

STAMP = "stamp.json"
# The lock of the command using a directory (stride_jax.io.outdir); replacing a stage that is
# itself an output directory (the ground truth's) must not remove it from under its holder.
LOCK_FILE = ".stride-jax.lock"

log = logging.getLogger(__name__)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def canonical_payload(payload: Mapping[str, Any]) -> Any:
    """``payload`` as it reads back from its JSON (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(payload, sort_keys=True, default=str))


def describe_changes(old: Any, new: Any, limit: int = 6) -> str:
    """``key: old -> new, ...`` for the dotted keys that differ between two payloads."""
    a, b = _flatten(old or {}), _flatten(new or {})
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:limit])
    more = f" (and {len(changed) - limit} more)" if len(changed) > limit else ""
    return shown + more


def open_stage(directory: str | Path, stage: str, payload: Mapping[str, Any], *,
               overwrite: bool = False) -> bool:
    """Prepare ``directory`` for ``stage``; return True when a complete matching artifact exists."""
    directory = Path(directory)
    payload = canonical_payload(payload)
    path = directory / STAMP
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(old, dict):
                raise ValueError(f"a JSON {type(old).__name__}, not an object")
        except ValueError as e:   # stamps are written atomically: only tampering gets here
            if not overwrite:
                raise StaleArtifactError(f"{path} is not a stage stamp ({e}); use another output "
                                         f"directory, or --overwrite to replace the stage") from None
            old = {}
        if old.get("payload") == payload and old.get("stage") == stage:
            done = bool(old.get("complete"))
            log.info("%s the %s '%s' stage in %s (stamp %s)",
                     "reusing" if done else "resuming", "complete" if done else "unfinished",
                     stage, directory, stamp_hash(payload))
            return done
        if not overwrite:
            raise StaleArtifactError(
                f"{directory} holds the '{old.get('stage')}' stage made with other arguments or "
                f"inputs ({describe_changes(old.get('payload', {}), payload)}); use another "
                f"output directory, or --overwrite to replace it")
        if is_writer():
            for entry in directory.iterdir():
                if entry.name == LOCK_FILE:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"stage": stage, "payload": payload, "complete": False},
                                       indent=1))
    log.debug("running the '%s' stage in %s (stamp %s)", stage, directory, stamp_hash(payload))
    return False


def complete_stage(directory: str | Path, stage: str, payload: Mapping[str, Any]) -> None:
    atomic_write_text(Path(directory) / STAMP, json.dumps(
        {"stage": stage, "payload": canonical_payload(payload), "complete": True}, indent=1))


def stamp_hash(payload: Mapping[str, Any]) -> str:
    """Short hash (8 hex digits) of a stamp's payload, for log lines."""
    return hashlib.sha256(json.dumps(canonical_payload(payload), sort_keys=True).encode()).hexdigest()[:8]


def _update(h: Any, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a)
    h.update(str((a.shape, a.dtype.str)).encode())
    # The buffer itself, not a.tobytes(): a memory-mapped array is hashed through the page
    # cache without a copy of the whole array in memory. Viewed as bytes, so that dtypes
    # without a buffer format (bfloat16) hash too.
    if a.size:
        h.update(a.reshape(-1).view(np.uint8).data)


def array_fingerprint(*arrays: np.ndarray, extra: Any = None) -> str:
    """sha256 (first 16 hex digits) of arrays' shapes, dtypes and bytes, plus ``extra`` as JSON."""
    h = hashlib.sha256()
    for a in arrays:
        _update(h, a)
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def pytree_fingerprint(tree: Any) -> str:
    """sha256 (first 16 hex digits) of a pytree: every leaf's key path, shape, dtype and *every
    byte* of its value.

    A model's parameters are hashed whole, not sampled: a sample can miss a fine-tune that
    touched few weights, and a stale model fingerprint silently returns another model's scores.
    sha256 runs at about 1 GB/s, which is small next to attributing a model of that size. Device
    arrays are copied to the host one leaf at a time.
    """
    import jax
    h = hashlib.sha256()
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in leaves:
        h.update(jax.tree_util.keystr(path).encode())
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype,
                                                                  jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        _update(h, np.asarray(leaf))
    return h.hexdigest()[:16]
