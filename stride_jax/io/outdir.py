"""Output locations: checked before any work, stamped, locked, and cleared of stale artifacts.

Every ``stride-jax`` command that writes goes through this module, so all of them behave alike:

* :func:`check_output_dir` and :func:`check_output_file` run before any work and refuse, in one
  line, a path that cannot be written: an existing file where a directory is wanted (or the
  reverse), a read-only directory (no write permission bits, or a read-only file system), or a
  path under ``/proc``, ``/sys`` or ``/dev`` (kernel file systems; ``/dev/shm`` is fine).
* :func:`open_output_dir` stamps a command's output directory with ``run.json``:
  ``{"stage": command, "payload": what the outputs depend on, "complete": ...}``. A rerun with the same command and payload keeps everything (it resumes; stage
  directories check their own stamps, :mod:`stride_jax.io.stamps`). Anything else is refused,
  naming what differs, unless ``overwrite``; then every artifact of the earlier run is removed
  first, so no output of the earlier run survives next to the new ones (a report, a
  ``tokens.json`` the new run does not write, stale stage directories), except the stage
  directories the command keeps because they carry their own stamps. Another command's outputs
  are refused even with ``overwrite``: they may be this command's inputs (``attribute --out``
  naming the model directory must not delete the model).
* :func:`lock_output_dir` holds an exclusive lock on the directory for the whole command: a
  second process on the same ``--out`` stops at once, naming the holder's pid. The lock is an
  ``flock`` on ``.stride-jax.lock`` (holding the pid and the command), which the kernel releases
  when the holder dies, so a lock file left by a killed run is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from stride_jax.errors import OutputLockedError, OutputPathError, StaleArtifactError
from stride_jax.io.atomic import atomic_write_text, is_writer
from stride_jax.io.stamps import LOCK_FILE, canonical_payload, describe_changes

__all__ = ["LOCK_FILE", "RUN_STAMP", "OutputLockedError", "OutputPathError", "check_output_dir",
           "check_output_file", "complete_output_dir", "lock_output_dir", "open_output_dir",
           "read_run_stamp"]

RUN_STAMP = "run.json"


# --------------------------------------------------------------------------------------------
# Paths, checked before any work
# --------------------------------------------------------------------------------------------

def _kernel_fs(path: Path) -> str | None:
    """``/proc``, ``/sys`` or ``/dev`` when ``path`` lies on one (``/dev/shm`` is real memory)."""
    parts = path.absolute().parts
    top = parts[1] if len(parts) > 1 else ""
    if top in ("proc", "sys") or (top == "dev" and parts[2:3] != ("shm",)):
        return f"/{top}"
    return None


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _read_only(directory: Path) -> bool:
    """No write permission (for us, or for anyone: a directory made read-only on purpose stays so
    even for root), or a read-only file system."""
    try:
        mode = directory.stat().st_mode
    except OSError:
        return True
    return not (mode & 0o222) or not os.access(directory, os.W_OK | os.X_OK)


def _check_writable_from(path: Path, flag: str) -> None:
    """``path`` (which need not exist yet) can be created and written."""
    base = _nearest_existing(path)
    if not base.is_dir():
        raise OutputPathError(f"{flag} {path}: {base} is a file, so nothing can be created under "
                              f"it; pass another path")
    if _read_only(base):
        raise OutputPathError(
            f"{flag} {path}: {base} is read-only; make it writable (chmod -R u+w {base}) or pass "
            f"a path elsewhere")


def _check_common(path: Path, flag: str) -> None:
    if not str(path).strip():
        raise OutputPathError(f"{flag} is empty; pass a path")
    fs = _kernel_fs(path)
    if fs is not None:
        raise OutputPathError(f"{flag} {path} is under {fs}, a file system of the kernel, not a "
                              f"disk; pass a path on disk")


def check_output_dir(path: str | os.PathLike[str], *, flag: str = "--out") -> Path:
    """Refuse (:class:`OutputPathError`) a directory path that cannot hold outputs."""
    path = Path(path)
    _check_common(path, flag)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{flag} {path} is a file, not a directory; pass a directory (it is "
                              f"created if missing), or move the file away")
    _check_writable_from(path, flag)
    return path


def check_output_file(path: str | os.PathLike[str], *, flag: str = "--out",
                      example: str = "out.json") -> Path:
    """Refuse (:class:`OutputPathError`) a file path that cannot be written."""
    path = Path(path)
    _check_common(path, flag)
    if path.is_dir():
        raise OutputPathError(f"{flag} {path} is a directory; pass a file name, e.g. "
                              f"{path / example}")
    if path.exists() and not path.is_file():
        raise OutputPathError(f"{flag} {path} is not a regular file; pass a file name")
    _check_writable_from(path.parent, flag)
    return path


# --------------------------------------------------------------------------------------------
# Stamps
# --------------------------------------------------------------------------------------------

def read_run_stamp(directory: str | os.PathLike[str]) -> dict | None:
    """The ``run.json`` of ``directory``, or None (absent or unreadable)."""
    try:
        stamp = json.loads((Path(directory) / RUN_STAMP).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _present(directory: Path, patterns: Sequence[str]) -> list[Path]:
    found: dict[Path, None] = {}
    for pattern in patterns:
        for p in sorted(directory.glob(pattern)):
            found[p] = None
    return list(found)


def _remove(paths: Sequence[Path]) -> None:
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _names(directory: Path, paths: Sequence[Path], limit: int = 6) -> str:
    names = [p.relative_to(directory).as_posix() for p in paths]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def open_output_dir(directory: str | os.PathLike[str], command: str, payload: Mapping[str, Any],
                    *, overwrite: bool, artifacts: Sequence[str], keep: Sequence[str] = (),
                    flag: str = "--out") -> bool:
    """Claim ``directory`` for the outputs of ``command`` (see the module docstring).

    Args:
      payload: what the outputs depend on (config, inputs); compared with the stamp's.
      artifacts: glob patterns, relative to ``directory``, of everything ``command`` writes.
      keep: artifacts kept on ``overwrite`` when the stamp is this command's (stage directories
        with stamps of their own, which replace themselves when their arguments differ).

    Returns True when the directory holds this command's complete outputs for this payload.
    Raises :class:`StaleArtifactError` when it holds other outputs and ``overwrite`` is False.
    """
    directory = check_output_dir(directory, flag=flag)
    payload = canonical_payload(payload)
    old = read_run_stamp(directory) if directory.is_dir() else None
    if old is not None and old.get("stage") == command and old.get("payload") == payload:
        return bool(old.get("complete"))
    if old is not None and old.get("stage") != command:
        # Never replaced, not even with overwrite: they may be this command's inputs (a model).
        raise StaleArtifactError(
            f"{directory} holds the outputs of `stride-jax {old.get('stage')}`; pass another "
            f"{flag} (--overwrite only replaces outputs of `stride-jax {command}`)")
    present = _present(directory, artifacts) if directory.is_dir() else []
    if old is not None or present:
        if not overwrite:
            if old is None:
                what = (f"holds outputs of an earlier run ({_names(directory, present)}) without "
                        f"a {RUN_STAMP} saying what made them")
            else:
                what = (f"holds outputs made with other arguments or inputs "
                        f"({describe_changes(old.get('payload', {}), payload)})")
            raise StaleArtifactError(f"{directory} {what}; pass another {flag}, or --overwrite to "
                                     f"replace them")
        kept = set(keep) if old is not None else set()
        if is_writer():
            _remove(_present(directory, [a for a in artifacts if a not in kept]))
            with contextlib.suppress(FileNotFoundError):
                (directory / RUN_STAMP).unlink()
    _write_stamp(directory, command, payload, complete=False)
    return False


def _write_stamp(directory: Path, command: str, payload: Any, *, complete: bool) -> None:
    atomic_write_text(directory / RUN_STAMP, json.dumps(
        {"stage": command, "payload": payload, "complete": complete}, indent=1) + "\n")


def complete_output_dir(directory: str | os.PathLike[str]) -> None:
    """Mark the outputs stamped by :func:`open_output_dir` complete."""
    directory = Path(directory)
    stamp = read_run_stamp(directory)
    if stamp is not None:
        _write_stamp(directory, stamp["stage"], stamp["payload"], complete=True)


# --------------------------------------------------------------------------------------------
# Lock
# --------------------------------------------------------------------------------------------

def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return (f"pid {info['pid']} on {info['host']}, `stride-jax {info['command']}` since "
                f"{info['started']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that did not say which"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def lock_output_dir(directory: str | os.PathLike[str], command: str, *,
                    flag: str = "--out") -> Iterator[Path]:
    """Hold ``directory`` exclusively while the block runs (see the module docstring).

    Raises :class:`OutputLockedError` naming the holder when another live process has it. Only
    the writing process of a multi-process run takes the lock. The lock file is removed on exit.
    """
    directory = Path(directory)
    if not is_writer():
        yield directory
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    refusal = (f"{directory} is in use by another stride-jax process ({{holder}}); wait for it to "
               f"finish, or pass another {flag} (if that process is gone, delete {path})")
    try:
        import fcntl
    except ImportError:   # no flock (Windows): an exclusive create, stale pids taken over
        fcntl = None
    if fcntl is None:
        with _exclusive_create_lock(path, info, refusal):
            yield directory
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise OutputLockedError(refusal.format(holder=_holder(path))) from None
            raise
        # The holder before us may have removed the file after we opened it: lock the file that
        # is at the path now, or two processes would each hold a lock on a different file.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, info.encode())
        yield directory
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)   # closing releases the flock


@contextlib.contextmanager
def _exclusive_create_lock(path: Path, info: str, refusal: str) -> Iterator[None]:
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            try:
                pid = int(json.loads(path.read_text(encoding="utf-8"))["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                pid = None
            if pid is not None and _pid_alive(pid):
                raise OutputLockedError(refusal.format(holder=_holder(path))) from None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()   # a lock left by a dead process
    else:
        raise OutputLockedError(refusal.format(holder=_holder(path)))
    try:
        os.write(fd, info.encode())
        os.close(fd)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
