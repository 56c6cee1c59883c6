"""Argument stamps: every stage directory records what made it, and refuses to be reused otherwise.

A stage writes ``stamp.json`` = ``{"stage", "payload", "complete"}`` before it starts (``complete``
false) and again when it finishes (``complete`` true). A rerun with the same payload reuses a
complete artifact or resumes an incomplete one; a rerun with a different payload stops with a
message naming the keys that changed, unless ``overwrite`` is given.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from stride_jax.io.atomic import atomic_write_text, is_writer

STAMP = "stamp.json"
# The lock of the command using a directory (stride_jax.io.outdir); replacing a stage that is
# itself an output directory (the ground truth's) must not remove it from under its holder.
LOCK_FILE = ".stride-jax.lock"


class StaleArtifactError(ValueError):
    """A stage directory was made with different arguments or inputs."""


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
        old = json.loads(path.read_text())
        if old.get("payload") == payload and old.get("stage") == stage:
            return bool(old.get("complete"))
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
    return False


def complete_stage(directory: str | Path, stage: str, payload: Mapping[str, Any]) -> None:
    atomic_write_text(Path(directory) / STAMP, json.dumps(
        {"stage": stage, "payload": canonical_payload(payload), "complete": True}, indent=1))


def array_fingerprint(*arrays: np.ndarray, extra: Any = None) -> str:
    """sha256 (first 16 hex digits) of arrays' shapes, dtypes and bytes, plus ``extra`` as JSON."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        # The buffer itself, not a.tobytes(): a memory-mapped array is hashed through the page
        # cache without a copy of the whole array in memory.
        h.update(a.data if a.size else b"")
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
