"""Helpers for tests that run the ``stride-jax`` command in fresh processes.

Shared by ``test_resume_kill.py`` and ``test_determinism.py``: a tiny pretrained model with train
and query JSONL files, and one uninterrupted ``attribute`` run (the reference both compare with)
are made once per test session, so neither test file pays for them twice. The reference runs in
the background while a test starts its own runs (independent processes share the CPU better than
one, and a loaded CPU only widens the window in which a kill test kills).

Every run gets ``JAX_PLATFORMS=cpu`` and a per-session XLA compilation cache (``STRIDE_JAX_CACHE``
pointing into pytest's temporary directory), so later processes skip most compilation and the
user's own cache is never touched (concurrent runs may compile the same function twice; a torn
cache entry is only a warning and a recompile in JAX).
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from stride_jax.recipes import pretrain
from _tiny import TINY, write_pairs

REPO = Path(__file__).resolve().parents[1]

# Generous: a slow, shared CI box must not flake; on a 2-core machine a run takes 5-20 s.
TIMEOUT_S = 300.0


# 40 subsets, 8 per step, 8 epochs: 40 training steps, a checkpoint every 2 (20 in all), and a
# log point every step, so history.json counts the steps a run executed.
ATTRIBUTE_STEPS = 40
ATTRIBUTE_OVERRIDES = (
    "operators=trained",   # the stages these runs resume and compare are the trained pipeline's
    "design.num_subsets=40", "design.per_example=4", "train.subsets_per_step=8", "train.epochs=8",
    "train.rows_per_subset=4", "train.stability_rows=4", "train.tokens_per_row=8",
    "train.checkpoint_every=2", "train.log_every=1", "topk=3")

_SESSION: dict[str, object] = {}
_STARTED: list[subprocess.Popen] = []


@atexit.register
def _stop_leftovers() -> None:
    # A test that failed before waiting for its background run must not leave it running.
    for p in _STARTED:
        if p.poll() is None:
            p.kill()
            p.wait()


def _session_dir(tmp_path_factory, name: str) -> Path:
    key = f"dir:{name}"
    if key not in _SESSION:
        _SESSION[key] = tmp_path_factory.mktemp(name)
    return _SESSION[key]  # type: ignore[return-value]


def cli_env(tmp_path_factory, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", STRIDE_JAX_CACHE=str(_session_dir(tmp_path_factory, "xla")),
               PYTHONUNBUFFERED="1")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)   # it would take precedence over ours
    env.update(extra)
    return env


def cli_command(*args: str) -> list[str]:
    # -q: no progress bars (log lines, which go to stderr, are kept).
    return [sys.executable, "-m", "stride_jax.cli", "-q", *args]


class Run:
    """A finished (or killed) command: exit status and the text it wrote."""

    def __init__(self, returncode: int, stdout: str, stderr: str, seconds: float):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr
        self.seconds = seconds

    def check(self) -> "Run":
        assert self.returncode == 0, (f"exit status {self.returncode}\n--- stdout\n"
                                      f"{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}")
        return self


class Proc:
    """A command started in the background; its output goes to files (never a pipe, which a
    chatty child could fill and block on)."""

    def __init__(self, args: Sequence[str], *, env: dict[str, str], log_dir: Path, name: str):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"
        self._out, self._err = open(self.out_path, "wb"), open(self.err_path, "wb")
        self.t0 = time.perf_counter()
        self.popen = subprocess.Popen(cli_command(*args), stdout=self._out, stderr=self._err,
                                      stdin=subprocess.DEVNULL, env=env, cwd=REPO)
        _STARTED.append(self.popen)

    def running(self) -> bool:
        return self.popen.poll() is None

    def _result(self) -> Run:
        self._out.close()
        self._err.close()
        return Run(self.popen.returncode, self.out_path.read_text(errors="replace"),
                   self.err_path.read_text(errors="replace"), time.perf_counter() - self.t0)

    def wait(self, timeout: float = TIMEOUT_S) -> Run:
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(f"{self.popen.args} did not finish in {timeout:.0f} s:\n"
                                 f"{self._result().stderr[-3000:]}") from None
        return self._result()

    def kill_when(self, ready: Callable[[], bool], *, timeout: float = TIMEOUT_S,
                  poll_s: float = 0.005) -> Run:
        """SIGKILL the process as soon as ``ready()`` holds; fails if it exits first."""
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.running():
                run = self._result()
                raise AssertionError(f"the process exited (status {run.returncode}) before the "
                                     f"kill point was reached\n{run.stderr[-3000:]}")
            if time.monotonic() > deadline:
                self.popen.kill()
                self.popen.wait()
                raise AssertionError(f"the kill point was not reached in {timeout:.0f} s")
            time.sleep(poll_s)
        assert self.running(), "the process finished before it could be killed"
        os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=60)
        assert self.popen.returncode == -signal.SIGKILL, self.popen.returncode
        return self._result()


def run_cli(args: Sequence[str], *, env: dict[str, str], log_dir: Path, name: str,
            timeout: float = TIMEOUT_S) -> Run:
    return Proc(args, env=env, log_dir=log_dir, name=name).wait(timeout)


def tiny_model(tmp_path_factory) -> Path:
    """A directory with ``model/`` (the tiny pretrained model), ``train.jsonl`` (120 rows) and
    ``queries.jsonl`` (3 prompt/completion queries); made once per session."""
    if "model" not in _SESSION:
        root = _session_dir(tmp_path_factory, "cli_model")
        write_pairs(root, pretrain(TINY, root / "model", progress=False))
        _SESSION["model"] = root
    return _SESSION["model"]  # type: ignore[return-value]


def attribute_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["attribute", "--model", str(root / "model"), "--train", str(root / "train.jsonl"),
            "--queries", str(root / "queries.jsonl"), "--out", str(out),
            *ATTRIBUTE_OVERRIDES, *extra]


def start_reference_attribute_run(tmp_path_factory) -> None:
    """Start the one uninterrupted ``attribute`` run (seed 0) in the background, once."""
    if "reference" not in _SESSION:
        root = tiny_model(tmp_path_factory)
        out = _session_dir(tmp_path_factory, "reference_run") / "run"
        _SESSION["reference"] = (Proc(attribute_args(root, out), log_dir=out.parent,
                                      name="reference",
                                      env=cli_env(tmp_path_factory, PYTHONHASHSEED="1")), out)


def reference_attribute_run(tmp_path_factory) -> Path:
    """The output directory of the uninterrupted run (started if need be, then waited for)."""
    start_reference_attribute_run(tmp_path_factory)
    proc, out = _SESSION["reference"]  # type: ignore[misc]
    proc.wait().check()
    return out
