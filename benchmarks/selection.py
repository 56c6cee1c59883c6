"""Data selection with attributions: fine-tune on each method's top-k rows, compare target loss.

The task (:mod:`stride_jax.tasks.selection`): a base model pretrained on two plays; a candidate
pool of ~2,270 rows, half train rows of Shakespeare's poems and half rows of three other plays
(distractors), in a fixed random order; 50 held-out poem rows as targets and the other held-out
poem rows (never used to select) as an evaluation set. Every method scores the same attributed
model (the base fine-tuned on the whole pool) for the targets, the scores are aggregated over
targets (:func:`stride_jax.apps.select.aggregate`, ``zscore`` unless stated) and the top k kept
(:func:`stride_jax.apps.select.select_top`). Each selection is then evaluated by fine-tuning the
*base* on it alone (the fine-tuning recipe of task (b), ceil(3 k / 16) steps) and reading the
mean per-token loss of the targets and of the held-out poem rows.

Compared at each k (default 5 %, 10 %, 20 % of the pool): STRIDE (configs/task_finetune.yaml's
settings, i.e. the defaults; also with the ``mean`` and ``rank`` aggregates), TRAK and exact
influence functions (the suite's default damping, 0.1 x the mean eigenvalue: there is no ground
truth here to tune it on, unlike benchmarks/lds.py), BM25, random selections (mean +- std over
``--random`` draws) and, as a reference that uses the domain labels no method sees, random
selections of poem rows only ("poems only"). Also the base model before fine-tuning and the
base fine-tuned on the whole pool. Lower loss is better.

Usage:
  python benchmarks/selection.py [--ks 0.05,0.1,0.2] [--random 8] [--methods stride,trak,...]
                                 [--set distractor_ratio=1.0 ...] [--set-method stride.seed=1 ...]
Writes benchmarks/results/selection.json; method scores go to runs/selection/<method>/
(scores.npy + ids.json, readable by `stride-jax select --run`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ForeignLoad, machine_info, print_table, write_results  # noqa: E402

from stride_jax.apps.select import aggregate, select_top  # noqa: E402
from stride_jax.config import load_config, to_dict  # noqa: E402
from stride_jax.eval.suite import TaskConfig, run_method  # noqa: E402
from stride_jax.tasks.selection import SelectionTaskConfig, build_selection_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _selections(task, scores: dict, k: int, num_random: int, seed: int,
                aggregates: dict) -> dict[str, np.ndarray]:
    """Name -> ``[r, k]`` index arrays (r = 1 for a method, ``num_random`` for random draws)."""
    sel: dict[str, np.ndarray] = {}
    for method, s in scores.items():
        for how in aggregates.get(method, ("zscore",)):
            name = method if how == "zscore" else f"{method} ({how})"
            sel[name] = select_top(aggregate(s, how), k)[None]
    rng = np.random.default_rng([seed, k])
    sel["random"] = np.stack([rng.choice(task.n, k, replace=False) for _ in range(num_random)])
    poems = np.flatnonzero(task.in_domain)
    if k <= len(poems):
        sel["poems only (oracle)"] = np.stack([rng.choice(poems, k, replace=False)
                                               for _ in range(num_random)])
    return sel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="0.05,0.1,0.2",
                    help="selection sizes: fractions of the pool (< 1) or counts")
    ap.add_argument("--random", type=int, default=8, help="random draws per k (>= 5)")
    ap.add_argument("--methods", default="stride,trak,influence,bm25")
    ap.add_argument("--aggregates", default="stride:zscore,mean,rank",
                    help="extra aggregates per method, e.g. 'stride:zscore,mean,rank;trak:zscore'"
                         " (others: zscore only)")
    ap.add_argument("--method-config", type=Path, default=ROOT / "configs" / "task_finetune.yaml",
                    help="TaskConfig YAML whose stride/baselines/seed sections are used")
    ap.add_argument("--set", action="append", default=[], metavar="key=value",
                    help="override of SelectionTaskConfig, e.g. distractor_ratio=0.5")
    ap.add_argument("--set-method", action="append", default=[], metavar="key=value",
                    help="override of the method config (TaskConfig), e.g. stride.train.epochs=5")
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "selection")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random selections")
    ap.add_argument("--name", default="selection", help="results file stem")
    args = ap.parse_args()
    if args.random < 1:
        raise SystemExit("--random must be >= 1")

    from stride_jax.cli import enable_compilation_cache
    enable_compilation_cache(ROOT / "runs" / "xla_cache")
    import jax
    m = machine_info()
    device = f"{jax.default_backend()}: {m['cpu_model']} x {m['cpu_count']}"

    cfg = load_config(SelectionTaskConfig, None, args.set)
    mcfg = load_config(TaskConfig, args.method_config, args.set_method)
    aggregates = {}
    for part in filter(None, args.aggregates.split(";")):
        meth, hows = part.split(":", 1)
        aggregates[meth] = tuple(hows.split(","))

    t0 = time.perf_counter()
    task = build_selection_task(cfg)
    build_s = time.perf_counter() - t0
    Q, E = task.num_queries, task.num_eval
    n_in = int(task.in_domain.sum())
    print(f"[selection] built in {build_s:.0f} s: pool n={task.n} ({n_in} poem rows, "
          f"{task.n - n_in} distractor rows), {Q} targets, {E} held-out poem rows")
    results: dict = {
        "device": device, "argv": sys.argv[1:], "task_config": to_dict(cfg),
        "method_config": {"file": str(args.method_config), "overrides": args.set_method,
                          "stride": to_dict(mcfg.stride), "baselines": to_dict(mcfg.baselines),
                          "seed": mcfg.seed},
        "n": task.n, "pool_poem_rows": n_in, "targets": Q, "heldout_eval_rows": E,
        "build_seconds": build_s, "methods": {}, "rows": [],
        "base_model": {"target_loss": float(task.pretrained_losses[:Q].mean()),
                       "heldout_loss": float(task.pretrained_losses[Q:].mean()) if E else None},
        "full_pool": {"target_loss": float(task.full_losses[:Q].mean()),
                      "heldout_loss": float(task.full_losses[Q:].mean()) if E else None},
    }

    scores: dict[str, np.ndarray] = {}
    for method in args.methods.split(","):
        with ForeignLoad() as fl:
            res = run_method(method, task, mcfg, workdir=args.workdir / method / "stages"
                             if method == "stride" else None, progress=True)
        scores[method] = res.scores_qn
        out = args.workdir / method
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "scores.npy", res.scores_qn)
        (out / "ids.json").write_text(json.dumps({"queries": list(task.queries.ids),
                                                  "train": list(task.train.ids)}) + "\n")
        v = aggregate(res.scores_qn, "zscore")
        # How much of the domain signal a method's ranking carries, without any retraining:
        # AUC of the zscore aggregate for "poem row" vs "distractor row".
        pos, neg = v[task.in_domain], v[~task.in_domain]
        auc = float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())
        results["methods"][method] = {"seconds": res.seconds, "foreign_load": fl.fraction,
                                      "info": res.info, "poem_auc_zscore": auc}
        print(f"[selection] {method}: scores {res.scores_qn.shape} in {res.seconds:.1f} s, "
              f"poem-vs-distractor AUC of its aggregate {auc:.3f}")
        write_results(args.name, results)

    ks = []
    for s in args.ks.split(","):
        f = float(s)
        ks.append(max(1, int(round(f * task.n))) if f < 1 else int(f))
    table = []
    for k in ks:
        sel = _selections(task, scores, k, args.random, args.seed, aggregates)
        names = list(sel)
        stacked = np.concatenate([sel[nm] for nm in names])
        t0 = time.perf_counter()
        losses = task.retrain_all(stacked)
        retrain_s = time.perf_counter() - t0
        at = 0
        rand_target = None
        by_name = {}
        for nm in names:
            r = len(sel[nm])
            L = losses[at:at + r]
            at += r
            tgt, hel = L[:, :Q].mean(1), (L[:, Q:].mean(1) if E else None)
            poem = task.in_domain[sel[nm]].mean(1)
            row = {"k": k, "fraction": k / task.n, "selection": nm, "draws": r,
                   "target_loss": float(tgt.mean()),
                   "target_loss_std": float(tgt.std(ddof=1)) if r > 1 else None,
                   "heldout_loss": None if hel is None else float(hel.mean()),
                   "heldout_loss_std": float(hel.std(ddof=1)) if r > 1 and E else None,
                   "poem_fraction": float(poem.mean()),
                   "per_target_loss": L[:, :Q].mean(0).tolist()}
            if nm == "random":
                rand_target = row
            by_name[nm] = row
        for nm, row in by_name.items():
            row["target_minus_random"] = row["target_loss"] - rand_target["target_loss"]
            if rand_target["target_loss_std"]:
                row["target_minus_random_in_random_std"] = (
                    row["target_minus_random"] / rand_target["target_loss_std"])
            if E and nm != "random":
                row["heldout_minus_random"] = (row["heldout_loss"]
                                               - by_name["random"]["heldout_loss"])
            # Per target: the fraction of targets whose loss is lower than under random (mean).
            row["targets_better_than_random"] = float(np.mean(
                np.asarray(row["per_target_loss"]) < np.asarray(rand_target["per_target_loss"])))
            results["rows"].append(row)

            def pm(mean, std):
                return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"
            table.append({
                "k": f"{k} ({100 * k / task.n:.0f}%)", "selection": nm,
                "target loss": pm(row["target_loss"], row["target_loss_std"]),
                "Δ vs random": f"{row['target_minus_random']:+.4f}",
                "held-out poem loss": ("-" if not E else
                                       pm(row["heldout_loss"], row["heldout_loss_std"])),
                "poem %": f"{100 * row['poem_fraction']:.0f}"})
        # Overlap of the methods' selections (Jaccard).
        meths = [nm for nm in names if sel[nm].shape[0] == 1]
        sets = {nm: set(sel[nm][0].tolist()) for nm in meths}
        results.setdefault("overlap", {})[str(k)] = {
            f"{a} | {b}": len(sets[a] & sets[b]) / len(sets[a] | sets[b])
            for i, a in enumerate(meths) for b in meths[i + 1:]}
        results.setdefault("retrain_seconds", {})[str(k)] = retrain_s
        print(f"[selection] k={k}: {len(stacked)} fine-tunes in {retrain_s:.0f} s")
        write_results(args.name, results)
    for label, key in (("base model (no fine-tuning)", "base_model"),
                       (f"full pool ({task.n} rows)", "full_pool")):
        table.append({"k": "-", "selection": label,
                      "target loss": f"{results[key]['target_loss']:.4f}", "Δ vs random": "",
                      "held-out poem loss": ("-" if not E else
                                             f"{results[key]['heldout_loss']:.4f}"),
                      "poem %": f"{100 * n_in / task.n:.0f}" if key == "full_pool" else "-"})
    print()
    results["table"] = print_table(table, ["k", "selection", "target loss", "Δ vs random",
                                           "held-out poem loss", "poem %"])
    print("\nscoring cost and ranking quality (AUC: aggregate separates poem rows from "
          "distractors):")
    for meth, info in results["methods"].items():
        print(f"  {meth:10s} {info['seconds']:7.1f} s   AUC {info['poem_auc_zscore']:.3f}")
    results["machine_load_note"] = ("times are wall clock on a shared machine; foreign_load is "
                                    "the share of CPU other processes used meanwhile")
    print(f"\nwrote {write_results(args.name, results)}")


if __name__ == "__main__":
    main()
