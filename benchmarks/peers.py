"""External peers on our tasks: kronfluence's EK-FAC (PyTorch, CPU) on the same model and data.

For each LM task: build it (train its model with our recipe), export the attributed model with
``to_hf``, write its training and query rows, run kronfluence (``benchmarks/peers_kronfluence.py``)
with each strategy, and score the result with our LDS code against the same ground truth as
``benchmarks/lds.py`` (``runs/gt/<task>``, made by ``stride-jax groundtruth`` or by lds.py).

Needs the optional extra: ``pip install -c constraints.txt -e .[peers]`` (then remove the
torchvision it drags in). Usage:

  python benchmarks/peers.py [--tasks pretrain,finetune] [--strategies ekfac,kfac,identity]

Writes benchmarks/results/peers.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results  # noqa: E402
from peers_kronfluence import run_kronfluence  # noqa: E402

from stride_jax.config import load_config  # noqa: E402
from stride_jax.eval.groundtruth import load_groundtruth  # noqa: E402
from stride_jax.eval.metrics import lds  # noqa: E402
from stride_jax.eval.suite import TaskConfig, build_task  # noqa: E402
from stride_jax.model.hf import to_hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="pretrain,finetune")
    ap.add_argument("--strategies", default="ekfac,kfac,identity")
    ap.add_argument("--groundtruth-dir", type=Path, default=ROOT / "runs" / "gt")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest here)")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    results: dict = {"tasks": {}}
    table = []
    for tname in args.tasks.split(","):
        cfg = load_config(TaskConfig, ROOT / "configs" / f"task_{tname}.yaml")
        task = build_task(cfg)
        gt = load_groundtruth(args.groundtruth_dir / tname)
        if gt.losses_sq.shape[1] != task.num_queries or gt.masks_sn.shape[1] != task.n:
            raise SystemExit(f"{args.groundtruth_dir / tname} does not match the {tname} task; "
                             f"run `stride-jax groundtruth --config configs/task_{tname}.yaml`")
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            to_hf(task.model, tmp / "model")
            np.savez(tmp / "rows.npz",
                     **{f"train_{k}": v for k, v in task.train_examples.items()},
                     **{f"query_{k}": v for k, v in task.query_examples.items()})
            for strategy in args.strategies.split(","):
                scores, info = run_kronfluence(tmp / "model", tmp / "rows.npz", strategy=strategy,
                                               workdir=tmp / f"kf_{strategy}")
                r = lds(scores, gt.masks_sn, gt.losses_sq)
                row = {"method": f"kronfluence-{strategy}", "lds": r.to_dict(), **info}
                row["lds"].pop("per_query", None)
                rows.append(row)
                seconds = info["fit_factors_s"] + info["scores_s"]
                table.append({"task": tname, "method": row["method"], "LDS": r.format(),
                              "seconds": round(seconds, 1)})
                print(f"[{tname}] kronfluence {strategy}: {r.format()}  ({seconds:.1f} s)")
        results["tasks"][tname] = {"n": task.n, "queries": task.num_queries, "rows": rows}
        write_results("peers", results)
    print_table(table, ["task", "method", "LDS", "seconds"])


if __name__ == "__main__":
    main()
