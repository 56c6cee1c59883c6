"""Killed jobs (SIGKILL, no chance to clean up) resume with bitwise the same result, without
redoing finished work; a write killed midway leaves the previous complete file.

The commands run in fresh processes (``tests/_cli_runs.py``) and are killed at a point observed on
disk: operator training once orbax has committed a checkpoint, ground-truth retraining once a chunk
file exists.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import _cli_runs as cli
from stride_jax.io.atomic import atomic_path, atomic_write_bytes, load_npy, save_npy


def _committed_steps(state_dir) -> list[int]:
    # Orbax writes a step into "<step>.orbax-checkpoint-tmp-<time>" and renames it to "<step>"
    # when the save is complete, so only all-digit names are committed checkpoints.
    if not state_dir.is_dir():
        return []
    return sorted(int(p.name) for p in state_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _history_steps(run_dir) -> list[int]:
    history = json.loads((run_dir / "operators" / "history.json").read_text())
    return [int(point["step"]) for point in history]


# --------------------------------------------------------------------------------------------
# operator training
# --------------------------------------------------------------------------------------------

def test_killed_operator_training_resumes_bitwise_and_skips_finished_steps(tmp_path_factory,
                                                                          tmp_path):
    root = cli.tiny_model(tmp_path_factory)
    cli.start_reference_attribute_run(tmp_path_factory)     # the uninterrupted run, alongside
    env = cli.cli_env(tmp_path_factory)
    out = tmp_path / "run"
    args = cli.attribute_args(root, out)
    state_dir = out / "operators" / "checkpoints" / "state"
    seen: list[int] = []

    def checkpointed() -> bool:
        seen[:] = _committed_steps(state_dir)
        return bool(seen) and seen[-1] > 0

    killed = cli.Proc(args, env=env, log_dir=tmp_path, name="killed").kill_when(checkpointed)
    # Killed during training: a checkpoint exists, the operators were never written.
    assert not (out / "operators" / "operators.npz").exists()
    assert not (out / "scores.npy").exists()
    last = _committed_steps(state_dir)[-1]
    assert 0 < seen[-1] <= last < cli.ATTRIBUTE_STEPS, (seen, last)
    assert "resuming" not in killed.stderr

    again = cli.run_cli(args, env=env, log_dir=tmp_path, name="resumed").check()
    found = re.findall(r"resuming operator training at step (\d+) of (\d+)", again.stderr)
    assert found, f"no resume message in the rerun's stderr:\n{again.stderr[-3000:]}"
    start, total = map(int, found[-1])
    assert total == cli.ATTRIBUTE_STEPS and start == last, (start, total, last)
    # It resumed rather than restarting: the rerun executed only steps start .. total-1
    # (train.log_every=1 logs every executed step into history.json).
    reference = cli.reference_attribute_run(tmp_path_factory)
    assert _history_steps(reference) == list(range(total))
    assert _history_steps(out) == list(range(start, total))
    # ...and gives bitwise the uninterrupted run's result.
    np.testing.assert_array_equal(np.load(out / "scores.npy", allow_pickle=False),
                                  np.load(reference / "scores.npy", allow_pickle=False))
    with np.load(out / "operators" / "operators.npz", allow_pickle=False) as a, \
            np.load(reference / "operators" / "operators.npz", allow_pickle=False) as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# --------------------------------------------------------------------------------------------
# EK-FAC factor fitting (attribute --method ekfac)
# --------------------------------------------------------------------------------------------

def test_killed_ekfac_factor_fit_resumes_bitwise(tmp_path_factory, tmp_path):
    """Killed during the eigenvalue-correction pass (after a save of its running sums): the rerun
    reuses the finished covariances, resumes the pass at the saved row, and gives bitwise the
    uninterrupted run's factors and scores."""
    root = cli.tiny_model(tmp_path_factory)
    env = cli.cli_env(tmp_path_factory)
    extra = ("method=ekfac", "methods.ekfac.batch_size=2", "methods.ekfac.checkpoint_every=1")
    ref_dir, out = tmp_path / "uninterrupted", tmp_path / "run"
    reference = cli.Proc(cli.attribute_args(root, ref_dir, *extra), env=env, log_dir=tmp_path,
                         name="ekfac_reference")
    args = cli.attribute_args(root, out, *extra)
    partial = out / "factors" / "ekfac" / "lambda.partial.safetensors"
    cli.Proc(args, env=env, log_dir=tmp_path, name="ekfac_killed").kill_when(partial.exists)
    assert (out / "factors" / "kfac" / "eigen.safetensors").is_file()
    assert not (out / "factors" / "ekfac" / "factors.safetensors").exists()
    assert not (out / "scores.npy").exists()

    again = cli.run_cli(args, env=env, log_dir=tmp_path, name="ekfac_resumed").check()
    found = re.findall(r"EK-FAC eigenvalues: resuming at row (\d+) of (\d+)", again.stderr)
    assert found, again.stderr[-3000:]
    start, total = map(int, found[-1])
    assert 0 < start < total == 120, (start, total)
    assert f"reusing {out / 'factors' / 'kfac'}" in again.stderr
    reference.wait().check()
    np.testing.assert_array_equal(np.load(out / "scores.npy", allow_pickle=False),
                                  np.load(ref_dir / "scores.npy", allow_pickle=False))
    assert ((out / "factors" / "ekfac" / "factors.safetensors").read_bytes()
            == (ref_dir / "factors" / "ekfac" / "factors.safetensors").read_bytes())


# --------------------------------------------------------------------------------------------
# ground-truth retraining
# --------------------------------------------------------------------------------------------

# 200 training digits, 20 queries, 24 subsets retrained 2 at a time (12 chunks of ~0.1 s each on
# a 2-core CPU, so there is time to kill the run between the first chunk and the last).
GT_SUBSETS = 24
GT_ARGS = ("--config", str(cli.REPO / "configs" / "task_digits.yaml"),
           "digits.num_train=200", "digits.num_queries=20", "digits.optim.epochs=100",
           "digits.optim.batch_size=8", f"groundtruth.num_subsets={GT_SUBSETS}",
           "groundtruth.parallel=2")
_CHUNK = re.compile(r"^\d{6}\.npy$")


def _chunk_files(out):
    d = out / "chunks"
    return sorted(p for p in d.iterdir() if _CHUNK.match(p.name)) if d.is_dir() else []


def _retrained(run) -> int:
    found = re.findall(r"retrained now: (\d+)", run.stdout)
    assert found, run.stdout[-3000:]
    return int(found[-1])


def test_killed_groundtruth_resumes_bitwise_without_recomputing_chunks(tmp_path_factory,
                                                                      tmp_path):
    pytest.importorskip("sklearn", reason="the digits task needs scikit-learn")
    env = cli.cli_env(tmp_path_factory)
    ref_dir, out = tmp_path / "uninterrupted", tmp_path / "gt"
    # The uninterrupted run goes alongside the one that is killed (it only slows that one down,
    # which widens the window for the kill).
    reference = cli.Proc(["groundtruth", "--out", str(ref_dir), *GT_ARGS], env=env,
                         log_dir=tmp_path, name="gt_reference")
    args = ["groundtruth", "--out", str(out), *GT_ARGS]
    cli.Proc(args, env=env, log_dir=tmp_path, name="gt_killed").kill_when(
        lambda: bool(_chunk_files(out)))
    assert not (out / "groundtruth.json").exists() and not (out / "losses.npy").exists()
    chunks = _chunk_files(out)
    done = sum(load_npy(p).shape[0] for p in chunks)
    assert 0 < done < GT_SUBSETS, [p.name for p in chunks]

    again = cli.run_cli(args, env=env, log_dir=tmp_path, name="gt_resumed").check()
    whole = reference.wait().check()
    assert _retrained(whole) == GT_SUBSETS
    assert _retrained(again) == GT_SUBSETS - done       # finished chunks were not recomputed
    for name in ("losses.npy", "masks.npy"):
        np.testing.assert_array_equal(load_npy(out / name), load_npy(ref_dir / name),
                                      err_msg=name)
    # The chunks written before the kill are unchanged by the rerun.
    for p in chunks:
        np.testing.assert_array_equal(load_npy(p), load_npy(ref_dir / "chunks" / p.name))


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------

def _visible(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def test_a_writer_that_fails_midway_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "scores.npy"
    old = np.arange(12, dtype=np.float32).reshape(3, 4)
    save_npy(target, old)

    class Crash(Exception):
        pass

    with pytest.raises(Crash):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"\x93NUMPY half a file")
            raise Crash

    real_save = np.save

    def save_half_then_crash(f, arr, **kw):
        real_save(f, arr, **kw)
        f.truncate(40)          # a torn file ...
        raise Crash             # ... and the writer dies

    monkeypatch.setattr(np, "save", save_half_then_crash)
    with pytest.raises(Crash):
        save_npy(target, np.zeros((100, 100), np.float32))
    monkeypatch.undo()
    np.testing.assert_array_equal(load_npy(target), old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.npy"]   # temporaries removed


def test_a_writer_killed_midway_leaves_the_old_file(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_bytes(target, b'{"step": 1}')
    child = textwrap.dedent(f"""
        import sys, time
        from stride_jax.io.atomic import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            with open(tmp, "wb") as f:
                f.write(b'{{"step": 2, "pad": "' + b"x" * 100000)
                f.flush()
            print("writing", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=cli.REPO)
    try:
        line = proc.stdout.readline()
        assert line == b"writing\n", (line, proc.stderr.read() if proc.poll() is not None else b"")
        # The partial file exists (under a temporary name) while the writer is alive.
        assert any(p.stat().st_size > 0 for p in tmp_path.iterdir() if p.name != "state.json")
        proc.kill()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -9
    # The final name holds the previous complete file; no partial file is visible under it.
    assert target.read_bytes() == b'{"step": 1}'
    assert _visible(tmp_path) == ["state.json"]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "state.json"]
    assert all(n.startswith(".state.json.") and n.endswith(".tmp") for n in leftovers), leftovers
    # A later write still succeeds and replaces the file whole.
    atomic_write_bytes(target, b'{"step": 3}')
    assert target.read_bytes() == b'{"step": 3}'
