"""Does bfloat16 cost the closed form any faithfulness? (issue 16, item 2)

Runs the default STRIDE (closed-form operators) on one task of the faithfulness benchmark
(``configs/task_<task>.yaml``) once per ``closed_form.dtype`` and scores each against the task's
retraining ground truth (LDS, Spearman over the retrained subsets, 95 % bootstrap interval),
with the wall time of each run. ``model`` is float32 here; ``bfloat16`` runs the frozen layers and
the output projection in bfloat16 with float32 factors, gradients and scores.

The ground truth is reused from ``--groundtruth-dir`` when its stamp matches the task (else built
there). On a CPU without bfloat16 units the bfloat16 run is slower (it is emulated); the point
here is the LDS. ``max_dim`` can be lowered to exercise the output projection as well
(``--max-dim 16384``: the pretrain task's 64 x 1024 gradients projected to 64 x 256).

Usage::

    python benchmarks/precision.py [--task pretrain] [--groundtruth-dir /work/gt]
                                   [--max-dim 262144,16384] [--out benchmarks/results/precision.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, ForeignLoad, print_table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="pretrain")
    p.add_argument("--groundtruth-dir", type=Path, default=ROOT / "runs" / "groundtruth")
    p.add_argument("--dtypes", default="model,bfloat16")
    p.add_argument("--max-dim", default=str(1 << 18),
                   help="closed_form.max_dim values, comma-separated")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "precision.json")
    args = p.parse_args(argv)

    from stride_jax.config import load_config
    from stride_jax.eval.groundtruth import run_groundtruth
    from stride_jax.eval.metrics import lds
    from stride_jax.eval.suite import TaskConfig, build_task, run_method
    cfg = load_config(TaskConfig, ROOT / "configs" / f"task_{args.task}.yaml")
    t0 = time.perf_counter()
    task = build_task(cfg)
    print(f"[{args.task}] built in {time.perf_counter() - t0:.0f} s: n={task.n}, "
          f"Q={task.num_queries}")
    gt = run_groundtruth(task.retrain, n=task.n, num_queries=task.num_queries,
                         cfg=cfg.groundtruth, out_dir=args.groundtruth_dir / args.task,
                         stamp=task.stamp, progress=True)
    rows = []
    scores = {}
    for max_dim in (int(x) for x in args.max_dim.split(",")):
        for dtype in args.dtypes.split(","):
            cf = dataclasses.replace(cfg.stride.closed_form, dtype=dtype, max_dim=max_dim)
            run = dataclasses.replace(cfg, stride=dataclasses.replace(cfg.stride, closed_form=cf))
            with ForeignLoad() as load:
                res = run_method("stride", task, run)
            r = lds(res.scores_qn, gt.masks_sn, gt.losses_sq)
            scores[(max_dim, dtype)] = res.scores_qn
            base = scores.get((max_dim, args.dtypes.split(",")[0]))
            import numpy as np
            corr = float(np.mean([np.corrcoef(a, b)[0, 1]
                                  for a, b in zip(base, res.scores_qn)]))
            rows.append({"max_dim": max_dim, "dtype": dtype, "lds": r.mean,
                         "lds_ci": [r.ci_low, r.ci_high], "seconds": res.seconds,
                         "corr_with_first_dtype": corr, "other_cpu": load.fraction})
            print(f"max_dim={max_dim} dtype={dtype}: LDS {r.mean:.3f} "
                  f"[{r.ci_low:.3f}, {r.ci_high:.3f}] in {res.seconds:.1f} s", flush=True)
    print_table(rows, ["max_dim", "dtype", "lds", "seconds", "corr_with_first_dtype"])
    doc = {"task": args.task, "n": task.n, "queries": task.num_queries,
           "groundtruth_subsets": int(gt.masks_sn.shape[0]), "results": rows,
           "argv": sys.argv[1:]}
    if args.out.parent == RESULTS_DIR:
        print(f"wrote {write_results(args.out.stem, doc)}")
    else:
        import json
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
