"""Two processes == one: a multi-host run (``parallel.distributed``) over localhost.

Each process gets 4 fake CPU devices; ``jax.distributed`` joins them into one runtime of 8
devices (tests/_multihost_worker.py). Operators sharded over both processes' devices, the
responses, and the top-k scores of a cross-validated solve whose queries are split over the
processes must equal a single-process, single-device run; only process 0 writes files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
WORKER = HERE / "_multihost_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("multihost")
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", STRIDE_JAX_CACHE="off")
    logs = [open(work / f"log{pid}.txt", "w") for pid in (0, 1)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(pid), str(port), str(work)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
             for pid, log in zip((0, 1), logs)]
    try:
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:
            p.kill()
        for log in logs:
            log.close()
    for pid, p in enumerate(procs):
        assert p.returncode == 0, (work / f"log{pid}.txt").read_text()[-4000:]
    return work, [json.loads((work / f"report{pid}.json").read_text()) for pid in (0, 1)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    sys.path.insert(0, str(HERE))
    from _parallel_worker import setup

    from stride_jax.attributor import Attributor, CacheConfig
    model, train, queries, cfg = setup("logits")
    cfg = dataclasses.replace(cfg, cache=CacheConfig(location="disk"),
                              solve=dataclasses.replace(cfg.solve, query_chunk=2), scores="topk",
                              topk=5)
    att = Attributor(model, train, cfg, workdir=tmp_path_factory.mktemp("one"), progress=False)
    ops = att.fit_operators()
    res = att.measure(queries)
    return np.asarray(ops.coef), res.y_qk, att.solve(res, queries.ids)


def test_two_processes_share_one_runtime(runs):
    _, reports = runs
    assert [r["process"] for r in reports] == [0, 1]
    for r in reports:
        assert r["processes"] == 2 and r["devices"] == 8 and r["mesh_devices"] == 8


def test_two_processes_equal_one_device(runs, reference):
    _, reports = runs
    coef, y, out = reference
    for r in reports:   # both processes end with the whole result
        # Only the order of float32 reductions differs (as in test_parallel).
        np.testing.assert_allclose(np.array(r["coef"]), coef, rtol=0, atol=1e-4 * np.abs(coef).max())
        np.testing.assert_allclose(np.array(r["y"]), y, rtol=0, atol=1e-4 * np.abs(y).max())
        top = out.top_scores
        # Queries solved on two processes, top-k kept per block: same examples, same scores.
        assert np.array_equal(np.array(r["pro_index"]), top.pro_index)
        assert np.array_equal(np.array(r["opp_index"]), top.opp_index)
        scale = np.abs(top.pro_score).max()
        np.testing.assert_allclose(np.array(r["pro_score"]), top.pro_score, atol=1e-3 * scale)
        np.testing.assert_allclose(np.array(r["opp_score"]), top.opp_score, atol=1e-3 * scale)
        assert r["reloaded_equal"]


def test_process_zero_writes_once(runs):
    work, _ = runs
    out = work / "out"
    assert (out / "scores_topk.npz").is_file() and (out / "topk.jsonl").is_file()
    assert not (out / "scores.npy").exists()           # top-k only, as configured
    # Per-process caches were removed after training; no stray scratch files were left.
    assert not (work / "operators" / "cache").exists()
    assert not list(work.rglob("*.tmp"))
    assert json.loads((work / "operators" / "stamp.json").read_text())["complete"]
    assert list((work / "operators" / "checkpoints" / "state").iterdir())
