"""One process of a two-process STRIDE run: ``python _multihost_worker.py PID PORT WORKDIR``.

Started twice by tests/test_multihost.py, each process with 4 fake CPU devices, joined by
``jax.distributed`` over localhost (the CPU collectives are gloo's): the subset axis spans all 8
devices of both processes, the solver splits the queries over the processes. Writes its report to WORKDIR/reportPID.json.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from stride_jax.parallel import ParallelConfig, initialize


def main(pid: int, port: int, workdir: Path) -> dict:
    pcfg = ParallelConfig(devices=8, distributed=True, coordinator_address=f"127.0.0.1:{port}",
                          num_processes=2, process_id=pid, solver_devices=2)
    initialize(pcfg)          # before JAX does any work
    import jax
    import numpy as np

    from _parallel_worker import setup

    from stride_jax.attributor import Attributor, CacheConfig

    model, train, queries, cfg = setup("logits")
    # Disk cache (per process) and top-k scores, with a cross-validated (ridge) solve: the paths a
    # large multi-host run takes.
    cfg = dataclasses.replace(cfg, parallel=pcfg, cache=CacheConfig(location="disk"),
                              solve=dataclasses.replace(cfg.solve, query_chunk=2), scores="topk",
                              topk=5)
    att = Attributor(model, train, cfg, workdir=workdir, progress=False)
    ops = att.fit_operators()
    res = att.measure(queries)
    out = att.solve(res, queries.ids)
    out.write(workdir / "out", k=cfg.topk)
    # A second attributor finds every stage complete and loads it (on both processes).
    again = Attributor(model, train, cfg, workdir=workdir, progress=False).attribute(queries)
    return {"process": jax.process_index(), "processes": jax.process_count(),
            "devices": jax.device_count(), "mesh_devices": att.mesh.size,
            "coef": np.asarray(ops.coef).tolist(), "y": res.y_qk.tolist(),
            "pro_index": out.top_scores.pro_index.tolist(),
            "pro_score": out.top_scores.pro_score.tolist(),
            "opp_index": out.top_scores.opp_index.tolist(),
            "opp_score": out.top_scores.opp_score.tolist(),
            "reloaded_equal": bool(np.array_equal(again.top_scores.pro_score,
                                                  out.top_scores.pro_score))}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    pid, work = int(sys.argv[1]), Path(sys.argv[3])
    report = main(pid, int(sys.argv[2]), work)
    # A file, not stdout: a large report would fill the pipe while the other process waits for
    # this one at the runtime's shutdown barrier.
    (work / f"report{pid}.json").write_text(json.dumps(report))
