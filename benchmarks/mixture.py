"""Choose the default mixture's weights, in advance, on the digits and pretrain tasks only.

For each choosing task (default ``digits,pretrain``): build it, load its ground truth
(``runs/gt/<task>``, as benchmarks/lds.py makes it), score it with every component (default
``stride,ekfac``) through the registry at their default settings (``stride_jax.methods``, the
code path of ``stride-jax attribute --method``), and compute the LDS of the per-query z-score
mixture ``sum_m w_m z_m`` for every weight vector on a simplex grid (step ``--step``). The
weights with the best mean LDS over the choosing tasks (ties: the first on the grid) become the
default: this script rewrites ``stride_jax/mixture_default.json`` (unless ``--dry-run``) and
records the whole grid as its evidence in ``benchmarks/results/mixture.json``. Tasks listed in
``--report`` (default ``finetune``) are scored on the same grid for information only; they never
influence the choice.

Re-choosing after STRIDE's (or EK-FAC's) defaults change is one run of this script (it recomputes
the component scores; ``--scores-dir runs/lds_scores --reuse-scores`` takes them from
``runs/lds_scores/<task>/<method>``, as benchmarks/lds.py writes them, when you know they are
current), then
``python benchmarks/lds.py --methods mix --merge`` (or a full run) for the table.

Usage: python benchmarks/mixture.py [--choose digits,pretrain] [--report finetune]
                                    [--components stride,ekfac] [--step 0.05] [--dry-run]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, task_groundtruth, write_results  # noqa: E402

from stride_jax.config import load_config  # noqa: E402
from stride_jax.eval.metrics import lds  # noqa: E402
from stride_jax.eval.suite import TaskConfig, build_task, run_method  # noqa: E402
from stride_jax.methods import MIXTURE_FILE, mix_scores, parse_method  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def simplex(k: int, step: float) -> list[tuple[float, ...]]:
    """Weight vectors of ``k`` components on the grid ``{0, step, ..., 1}`` summing to 1."""
    m = int(round(1 / step))
    return [tuple(c / m for c in combo) for combo in itertools.product(range(m + 1), repeat=k)
            if sum(combo) == m]


def component_scores(tname: str, methods: list[str], gt_dir: Path, scores_dir: Path | None,
                     reuse: bool) -> tuple[dict, object, dict]:
    """``({method: scores}, ground truth, {method: seconds})`` on one task; with a
    ``scores_dir`` the scores are kept in ``scores_dir/<task>/<method>/scores.npy`` (and with
    ``reuse`` taken from there)."""
    cfg = load_config(TaskConfig, ROOT / "configs" / f"task_{tname}.yaml")
    task = build_task(cfg)     # its stamp checks the ground truth; deterministic in the config
    gt = task_groundtruth(task, cfg, gt_dir / tname)
    scores, seconds = {}, {}
    for m in methods:
        stored = scores_dir / tname / m / "scores.npy" if scores_dir is not None else None
        if reuse and stored is not None and stored.is_file():
            scores[m] = np.load(stored, allow_pickle=False)
            continue
        res = run_method(m, task, cfg)
        scores[m], seconds[m] = res.scores_qn, res.seconds
        if stored is not None:
            stored.parent.mkdir(parents=True, exist_ok=True)
            np.save(stored, res.scores_qn)
        print(f"[{tname}] {m}: {res.seconds:.1f} s")
    return scores, gt, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--choose", default="digits,pretrain", help="tasks the weights are chosen on")
    ap.add_argument("--report", default="finetune", help="tasks scored for information only")
    ap.add_argument("--components", default="stride,ekfac")
    ap.add_argument("--step", type=float, default=0.05)
    ap.add_argument("--groundtruth-dir", type=Path, default=ROOT / "runs" / "gt",
                    help="ground truths in DIR/<task> (checked against the task's stamp)")
    ap.add_argument("--scores-dir", type=Path, default=None,
                    help="keep each component's scores in DIR/<task>/<method>/scores.npy")
    ap.add_argument("--reuse-scores", action="store_true",
                    help="take the components' scores from --scores-dir when present")
    ap.add_argument("--dry-run", action="store_true", help="do not rewrite the default")
    args = ap.parse_args()
    comps = [parse_method(m).name for m in args.components.split(",")]
    choose = [t for t in args.choose.split(",") if t]
    report = [t for t in args.report.split(",") if t and t not in choose]
    grid = simplex(len(comps), args.step)
    table, per_task, timings = [], {}, {}
    for tname in choose + report:
        scores, gt, seconds = component_scores(tname, comps, args.groundtruth_dir,
                                               args.scores_dir, args.reuse_scores)
        timings[tname] = seconds
        per_task[tname] = [float(lds(mix_scores(scores, dict(zip(comps, w))), gt.masks_sn,
                                     gt.losses_sq, bootstrap=0).mean) for w in grid]
    mean_choose = [float(np.mean([per_task[t][i] for t in choose])) for i in range(len(grid))]
    best = int(np.argmax(mean_choose))
    weights = {m: round(w, 6) for m, w in zip(comps, grid[best]) if w > 0}
    for i, w in enumerate(grid):
        table.append({"weights": ", ".join(f"{m}={x:g}" for m, x in zip(comps, w)),
                      **{t: round(per_task[t][i], 4) for t in choose + report},
                      "mean (choose)": round(mean_choose[i], 4),
                      "": "<- chosen" if i == best else ""})
    print_table(table, ["weights", *choose, *report, "mean (choose)", ""])
    singles = {m: {t: per_task[t][grid.index(tuple(float(j == i) for j in range(len(comps))))]
                   for t in choose + report} for i, m in enumerate(comps)}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                            capture_output=True).stdout.strip() or None
    evidence = {"components": comps, "step": args.step, "chosen_on": choose,
                "reported_only": report, "grid": [list(w) for w in grid],
                "lds_by_task": per_task, "mean_lds_chosen_tasks": mean_choose,
                "chosen": weights, "chosen_index": best, "components_alone": singles,
                "component_seconds": timings, "git_commit": commit}
    path = write_results("mixture", evidence)
    text = "mix:" + ",".join(f"{m}={w:g}" for m, w in weights.items())
    print(f"chosen on {', '.join(choose)}: {text} (mean LDS {mean_choose[best]:.4f}); "
          f"evidence {path}")
    if not args.dry_run:
        MIXTURE_FILE.write_text(json.dumps({
            "weights": weights,
            "chosen_by": f"benchmarks/mixture.py: best mean LDS over {', '.join(choose)} on a "
                         f"simplex grid of step {args.step:g} over {', '.join(comps)}"
                         + (f" ({', '.join(report)} reported, not used)" if report else ""),
            "evidence": "benchmarks/results/mixture.json",
            "date": datetime.date.today().isoformat(), "git_commit": commit,
            "mean_lds_chosen_tasks": round(mean_choose[best], 4)}, indent=2) + "\n")
        print(f"wrote {MIXTURE_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
