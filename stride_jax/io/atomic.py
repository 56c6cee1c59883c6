"""Atomic file writes.

Every artifact the pipeline produces (configs, scores, checkpoints) is written to a temporary
file in the destination directory, flushed and fsync'ed, then moved onto the final name with
``os.replace``. A reader therefore sees either the old complete file or the new complete file,
never a torn one, even if the writer is killed midway. The temporary file lives in the same
directory because ``os.replace`` is only atomic within one filesystem.

A write that fails because the disk (or the quota) is full raises :class:`DiskFullError`, which
names the file and says what to do; the temporary file is removed and the previous file is kept.

NaN and infinity never reach a file: :func:`save_npy`, :func:`save_npz` and :func:`json_text` /
:func:`write_json` refuse them (:class:`~stride_jax.errors.NonFiniteError`, a
``FloatingPointError``, naming the file), so a computation that went wrong upstream
stops with an error instead of leaving a result that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from stride_jax.errors import DataError, DiskFullError, NonFiniteError

__all__ = [
    "DiskFullError",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "is_writer",
    "json_text",
    "load_npy",
    "save_npy",
    "save_npz",
    "write_json",
]


# errno values that mean "no room to write": the device is full, or the user's quota is spent.
_FULL = {errno.ENOSPC} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())


def _disk_full(target: Path) -> DiskFullError:
    err = DiskFullError(
        f"the disk is full (no space left on the device) while writing {target}; free some space "
        f"or choose an output directory on another disk, then rerun (the previous {target.name}, "
        f"if any, is intact and finished stages are reused)")
    err.errno = errno.ENOSPC
    return err


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not supported everywhere (e.g. Windows), hence best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_writer() -> bool:
    """True in the process that writes files: the only one, or process 0 of a multi-process run
    (every process computes the same artifacts; one copy is written)."""
    import jax
    return not jax.distributed.is_initialized() or jax.process_index() == 0


@contextlib.contextmanager
def _discarded(target: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="stride-jax-not-written-") as d:
        yield Path(d) / target.name


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, every_process: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    The caller writes the complete file to the yielded path (by any means, e.g. a library that
    only accepts file names). When the ``with`` block exits normally, the temporary file is
    fsync'ed and ``os.replace``d onto ``path``. If the block raises, the temporary file is
    removed and ``path`` is left untouched. Parent directories are created as needed. A full disk
    (``ENOSPC``/``EDQUOT``, at any point) raises :class:`DiskFullError`. In a multi-process run
    only process 0 writes (:func:`is_writer`); elsewhere the yielded path is a scratch file that
    is discarded, unless ``every_process`` (a file of this process's own, e.g. in a per-process
    directory).
    """
    target = Path(path)
    if not (every_process or is_writer()):   # another process writes this file
        with _discarded(target) as tmp:
            yield tmp
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp",
                                        dir=target.parent)
    except OSError as e:
        if e.errno in _FULL:
            raise _disk_full(target) from e
        raise
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"atomic_path: nothing was written to the temporary file {tmp}")
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        # Writes and fsync report a full disk as a bare "[Errno 28]" that names no file.
        if isinstance(e, OSError) and not isinstance(e, DiskFullError) and e.errno in _FULL:
            raise _disk_full(target) from e
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + ``os.replace``)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically, encoded with ``encoding`` (UTF-8 by default)."""
    atomic_write_bytes(path, text.encode(encoding))


def _nonfinite_error(what: str, detail: str) -> NonFiniteError:
    return NonFiniteError(
        f"refusing to write {what}: {detail} is NaN or infinite, and no output may hold one; "
        f"nothing was written (a computation upstream went wrong: rerun with -v for where, and "
        f"report it if the inputs are sound)")


def _checked(path, array, name: str = "") -> np.ndarray:
    """``array`` as NumPy, refusing object dtypes (pickle) and NaN/inf (:class:`NonFiniteError`)."""
    arr = np.asarray(array)
    what = f"{path}[{name!r}]" if name else str(path)
    if arr.dtype.hasobject:
        raise ValueError(f"refusing to save an object array to {what} (it would need pickle)")
    if np.issubdtype(arr.dtype, np.inexact) and not np.isfinite(arr).all():
        bad = ~np.isfinite(arr)
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise _nonfinite_error(what, f"{int(bad.sum())} of its {arr.size} values (first at "
                                     f"index {first})")
    return arr


def save_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Save ``array`` as a ``.npy`` file atomically. Object arrays are refused (no pickles), and
    so are NaN/inf values (:class:`NonFiniteError`)."""
    arr = _checked(path, array)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)


def _first_nonfinite(obj, where: str = "") -> str | None:
    if isinstance(obj, float) or isinstance(obj, np.floating):
        return None if math.isfinite(obj) else (where or "a value")
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = _first_nonfinite(v, f"{where}.{k}" if where else str(k))
        if found is not None:
            return found
    return None


def json_text(obj, *, what: str, **kwargs) -> str:
    """``json.dumps(obj, **kwargs)`` that refuses NaN/inf (not JSON; readers choke or misread
    them) with a :class:`NonFiniteError` naming ``what`` and the first offending key."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError as e:
        where = _first_nonfinite(obj)
        if where is None and "Out of range float" not in str(e):
            raise
        raise _nonfinite_error(what, f"the value at {where or '?'}") from None


def write_json(path: str | os.PathLike[str], obj, **kwargs) -> None:
    """Write ``obj`` as JSON (plus a newline) atomically, refusing NaN/inf (:func:`json_text`)."""
    atomic_write_text(path, json_text(obj, what=str(path), **kwargs) + "\n")


def save_npz(path: str | os.PathLike[str], **arrays: np.ndarray) -> None:
    """Save named arrays as an (uncompressed) ``.npz`` file atomically; object arrays and NaN/inf
    values are refused as by :func:`save_npy`."""
    checked = {name: _checked(path, a, name) for name, a in arrays.items()}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **checked)


def load_npy(path: str | os.PathLike[str], *, what: str = ".npy array", hint: str = "",
             mmap_mode: str | None = None) -> np.ndarray:
    """Load a ``.npy`` file written by :func:`save_npy` (``allow_pickle=False``).

    A file that is not one (no ``.npy`` header, truncated, an object array that would need
    pickle) raises :class:`DataError` naming the file, ``what`` it should hold and the ``hint``.
    The header is checked first: NumPy reads any other file as a pickle.
    """
    tail = f"; {hint}" if hint else ""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":
        what_is = "it is empty" if not magic else "it lacks the .npy header"
        raise DataError(f"{path} is not a .npy file ({what_is}){tail}")
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path} is not a {what} ({e}){tail}") from None
