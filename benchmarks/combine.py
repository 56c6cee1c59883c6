"""Issue 8 idea: combine STRIDE's scores with a cheap gradient, similarity or lexical signal.

Reads the scores ``benchmarks/lds.py`` stores under ``runs/lds_scores/<task>/<method>/`` and the
ground truths under ``runs/gt/<task>``, and scores, with the LDS, the per-query z-score mixture
``w * z(stride) + (1 - w) * z(other)`` for every other method and the FIXED weights w = 0.25,
0.5, 0.75 (not tuned per task). Reported next to each method alone. Nothing is retrained; the
mixture costs STRIDE's time plus the other method's.

Usage: python benchmarks/combine.py [--scores runs/lds_scores] [--groundtruth runs/gt]
Writes benchmarks/results/combine.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_results  # noqa: E402

from stride_jax.apps.select import zscore  # noqa: E402  (the one per-query z-score)
from stride_jax.eval.groundtruth import load_groundtruth  # noqa: E402
from stride_jax.eval.metrics import lds  # noqa: E402

WEIGHTS = (0.25, 0.5, 0.75)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scores", type=Path, default=Path("runs/lds_scores"))
    ap.add_argument("--groundtruth", type=Path, default=Path("runs/gt"))
    args = ap.parse_args()
    rows = []
    for task_dir in sorted(p for p in args.scores.iterdir() if p.is_dir()):
        task = task_dir.name
        gt = load_groundtruth(args.groundtruth / task)
        scores = {m.name: np.load(m / "scores.npy", allow_pickle=False)
                  for m in sorted(task_dir.iterdir()) if (m / "scores.npy").is_file()}
        if "stride" not in scores:
            continue

        def score(s):
            return float(lds(s, gt.masks_sn, gt.losses_sq, bootstrap=0).mean)

        alone = {m: score(s) for m, s in scores.items()}
        for m, s in scores.items():
            row = {"task": task, "method": m, "alone": alone[m], "stride_alone": alone["stride"]}
            if m != "stride":
                for w in WEIGHTS:
                    row[f"mix_w{w}"] = score(w * zscore(scores["stride"]) + (1 - w) * zscore(s))
                row["best_fixed_mix_gain"] = max(row[f"mix_w{w}"] for w in WEIGHTS) - alone[m]
            rows.append(row)
    print_table(rows, ["task", "method", "alone", "stride_alone",
                       *[f"mix_w{w}" for w in WEIGHTS], "best_fixed_mix_gain"])
    write_results("combine", {"benchmark": "combine", "machine": machine_info(),
                              "weights": WEIGHTS, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
