"""The headline table: every method's LDS and wall time on every task, side by side, in one run.

For each task (configs/task_<task>.yaml): build the task (train its model), make or resume its
retraining ground truth, run every method on the same model, data and queries, and score each
with the Linear Datamodeling Score (mean +- std over queries, bootstrap CI). Each method's wall
time covers everything from the trained model to the [Q, n] scores (the task's own training and
the ground truth excluded). Every method runs ``--repeat`` times (default 2) with the on-disk
XLA cache on; the reported time is the fastest run after the first (compilation amortised, as
in any repeated or resumed job), the first run's time is kept as ``seconds_first_run``. Each
baseline's time is also given as a ratio to STRIDE's. Optionally, counterfactual removal: retrain without each query's top-k
examples (by STRIDE and by the best baseline) and without k random ones.

The damped baselines (influence, trak, logra) are run at several relative dampings and keep the
best on the ground truth itself, which favours them; STRIDE, EK-FAC and K-FAC run their configured
defaults (EK-FAC/K-FAC: 0.1 x the mean eigenvalue, as the kronfluence peer). Every method goes
through the one registry of ``stride-jax attribute --method`` (``stride_jax.methods``). ``stride``
is STRIDE at its defaults (closed-form operators); ``stride_trained`` is STRIDE with
``configs/attribute_trained.yaml`` (the paper's operators trained on random subsets and decoded
by regression, the default before closed form).

``mix`` is the default mixture (``stride_jax/mixture_default.json``: per-query z-scores of its
components, weights fixed in advance on the digits and pretrain tasks by benchmarks/mixture.py);
its row reuses the components' scores of this run (at their default settings) and its time is the
sum of theirs. ``--merge`` keeps the rows of methods not run this time from the existing results
file, so a few methods can be (re)measured without rerunning the rest; a mixture whose components
are such kept rows takes their stored scores (``--scores-dir``) and recorded times.

Targets (issue 4): STRIDE's LDS above every baseline on every task, and STRIDE at least 13x
faster than the best gradient baseline whose LDS is within 10 % of STRIDE's. The script reports
whether each is met; it never tunes anything to meet them.

Usage:
  python benchmarks/lds.py [--tasks digits,pretrain,finetune] [--methods stride,trak,...,mix]
                           [--groundtruth-dir runs/gt] [--counterfactual digits] [--set k=v ...]
                           [--merge]
Writes benchmarks/results/lds.json (after every row) and benchmarks/results/lds.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS_DIR, ForeignLoad, print_table, task_groundtruth,  # noqa: E402
                     write_results)

from stride_jax.attributor import AttributeConfig  # noqa: E402
from stride_jax.config import load_config  # noqa: E402
from stride_jax.eval.metrics import counterfactual_summary, lds  # noqa: E402
from stride_jax.eval.suite import (GRADIENT_METHODS, METHODS, TaskConfig, build_task,  # noqa: E402
                                   counterfactual, run_method)

ROOT = Path(__file__).resolve().parents[1]
DAMPED = ("influence", "trak", "logra")
# Rows that run a registry method with another STRIDE config: name -> (method, config file).
VARIANTS = {"stride_trained": ("stride", ROOT / "configs" / "attribute_trained.yaml")}


def _method_and_config(method: str, cfg: TaskConfig) -> tuple[str, TaskConfig]:
    """The registry method behind a row and the task config it runs with (``VARIANTS``)."""
    if method not in VARIANTS:
        return method, cfg
    name, path = VARIANTS[method]
    return name, dataclasses.replace(cfg, stride=load_config(AttributeConfig, path))


def _with_damping(cfg: TaskConfig, method: str, fraction: float) -> TaskConfig:
    """``cfg`` with ``baselines.<method>.damping_fraction = fraction``."""
    b = cfg.baselines
    sub = dataclasses.replace(getattr(b, method), damping_fraction=fraction)
    return dataclasses.replace(cfg, baselines=dataclasses.replace(b, **{method: sub}))


def _targets(rows: list[dict]) -> dict:
    """Whether the issue's two targets are met on one task's rows."""
    by = {r["method"]: r for r in rows}
    if "stride" not in by:
        return {}
    s = by["stride"]
    others = [r for r in rows if r["method"] != "stride"]
    best = max(others, key=lambda r: r["lds"]["mean"]) if others else None
    close = [r for r in others if r["method"] in GRADIENT_METHODS and
             r["lds"]["mean"] >= 0.9 * s["lds"]["mean"]]
    fastest_close = min(close, key=lambda r: r["seconds"]) if close else None
    return {
        "stride_lds": s["lds"]["mean"],
        "best_baseline": best and best["method"],
        "best_baseline_lds": best and best["lds"]["mean"],
        "lds_above_every_baseline": bool(best is None or s["lds"]["mean"] > best["lds"]["mean"]),
        "gradient_baselines_within_10pct": [r["method"] for r in close],
        "speedup_vs_fastest_within_10pct": (fastest_close["seconds"] / s["seconds"]
                                            if fastest_close else None),
        "speedup_target_13x_met": (fastest_close["seconds"] / s["seconds"] >= 13
                                   if fastest_close else None),
    }


def _stored_components(rows: list[dict], scores_dir: Path, task) -> dict:
    """``{method: MethodResult}`` of kept rows whose scores this script stored (same ids), for a
    mixture measured with ``--merge`` without rerunning its components. Damped baselines are left
    out: their stored scores are at the damping that was best on the ground truth, not the
    default a mixture must use."""
    from stride_jax.methods import MethodResult
    out = {}
    for r in rows:
        m, d = r["method"], scores_dir / r["method"]
        if "lds" not in r or m in DAMPED or m.startswith("mix") or not (d / "scores.npy").is_file():
            continue
        ids = json.loads((d / "ids.json").read_text()) if (d / "ids.json").is_file() else {}
        if ids.get("queries") != list(task.queries.ids) or ids.get("train") != list(task.train.ids):
            continue
        out[m] = MethodResult(np.load(d / "scores.npy", allow_pickle=False), r["seconds"],
                              {"from": str(d / "scores.npy")})
    return out


def plot(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401
    except ModuleNotFoundError:
        print("matplotlib is not installed (pip install -e .[eval]); no plot written")
        return None
    tasks = [t for t in results["tasks"] if results["tasks"][t]["rows"]]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for r in results["tasks"][t]["rows"]:
            m = r["method"]
            ax.errorbar(r["seconds"], r["lds"]["mean"],
                        yerr=[[r["lds"]["mean"] - r["lds"]["ci_low"]],
                              [r["lds"]["ci_high"] - r["lds"]["mean"]]],
                        fmt="*" if m == "stride" else "o", ms=12 if m == "stride" else 6,
                        color="crimson" if m == "stride" else "steelblue", capsize=3)
            ax.annotate(m, (r["seconds"], r["lds"]["mean"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("wall time (s, log scale)")
        ax.set_ylabel("LDS (mean over queries, 95% CI)")
        ax.set_title(f"{t} (n={results['tasks'][t]['n']}, "
                     f"{results['tasks'][t]['groundtruth_subsets']} retrains)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"LDS vs cost ({results['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="digits,pretrain,finetune")
    ap.add_argument("--methods", default=",".join(METHODS + tuple(VARIANTS) + ("mix",)),
                    help="methods (stride_jax.methods names; mix: the default mixture; "
                         "stride_trained: STRIDE with configs/attribute_trained.yaml, the "
                         "trained operators that were the default before closed form)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the existing results file's rows of methods not run now")
    ap.add_argument("--groundtruth-dir", type=Path, default=ROOT / "runs" / "gt",
                    help="ground truths are made (or resumed) in DIR/<task>")
    ap.add_argument("--scores-dir", type=Path, default=ROOT / "runs" / "lds_scores")
    ap.add_argument("--counterfactual", default="digits",
                    help="tasks on which to run counterfactual removal (comma list, or 'none')")
    ap.add_argument("--cf-queries", type=int, default=20)
    ap.add_argument("--cf-k", type=float, default=0.05, help="examples removed, as a fraction of n")
    ap.add_argument("--set", action="append", default=[], metavar="TASK:key=value",
                    help="config override for one task, e.g. digits:groundtruth.num_subsets=128")
    ap.add_argument("--name", default="lds", help="results file stem")
    ap.add_argument("--repeat", type=int, default=2,
                    help="runs per method; the time reported is the fastest after the first")
    ap.add_argument("--damping-fractions", default="0.1,1e-3,1e-2,1,10,100,1000",
                    help="relative dampings tried for influence/trak/logra (the first, the "
                         "default, is timed); the best LDS is reported")
    ap.add_argument("--plot-only", action="store_true",
                    help="redraw the plot from an existing results JSON and exit")
    args = ap.parse_args()
    if args.plot_only:
        print(plot(json.loads((RESULTS_DIR / f"{args.name}.json").read_text()),
                   RESULTS_DIR / f"{args.name}.png"))
        return
    fracs = [float(f) for f in args.damping_fractions.split(",")]
    from stride_jax.cli import enable_compilation_cache
    enable_compilation_cache(ROOT / "runs" / "xla_cache")
    import jax
    from _common import machine_info
    m = machine_info()
    device = f"{jax.default_backend()}: {m['cpu_model']} x {m['cpu_count']}"
    results: dict = {"device": device, "tasks": {}, "argv": sys.argv[1:]}
    old_path = RESULTS_DIR / f"{args.name}.json"
    previous = json.loads(old_path.read_text()) if args.merge and old_path.is_file() else {}
    if previous:
        results["tasks"] = previous.get("tasks", {})
        results["argv_merged"] = previous.get("argv_merged", []) + [previous.get("argv")]
    table = []
    cf_tasks = set() if args.counterfactual == "none" else set(args.counterfactual.split(","))
    for tname in args.tasks.split(","):
        overrides = [s.split(":", 1)[1] for s in args.set if s.startswith(tname + ":")]
        cfg = load_config(TaskConfig, ROOT / "configs" / f"task_{tname}.yaml", overrides)
        t0 = time.perf_counter()
        task = build_task(cfg)
        build_s = time.perf_counter() - t0
        print(f"[{tname}] built in {build_s:.0f} s: n={task.n}, Q={task.num_queries}")
        t0 = time.perf_counter()
        gt = task_groundtruth(task, cfg, args.groundtruth_dir / tname)
        entry = {"n": task.n, "queries": task.num_queries, "build_seconds": build_s,
                 "groundtruth_subsets": int(gt.masks_sn.shape[0]),
                 "groundtruth_seconds_this_run": time.perf_counter() - t0,
                 "groundtruth_info": {k: v for k, v in gt.info.items()
                                      if k != "seconds_per_chunk"},
                 "overrides": overrides, "rows": []}
        methods = args.methods.split(",")
        before = results["tasks"].get(tname, {})
        kept = [r for r in before.get("rows", []) if r["method"] not in methods]
        if "counterfactual" in before and "stride" not in methods:
            # Not recomputed this time (it needs STRIDE's scores): keep the earlier one.
            entry["counterfactual"] = before["counterfactual"]
        results["tasks"][tname] = entry
        entry["rows"] = kept
        scores = {}
        # method -> its result at the default settings, which mixtures reuse; with --merge, also
        # the kept rows' methods, from their stored scores and recorded times.
        defaults: dict = _stored_components(kept, args.scores_dir / tname, task)
        for method in methods:
            if method == "bm25" and task.train_docs is None:
                continue
            fractions = fracs if method in DAMPED else [None]
            by_fraction = {}
            try:
                for f in fractions:
                    name, mcfg = _method_and_config(method, cfg)
                    mcfg = mcfg if f is None else _with_damping(mcfg, method, f)
                    times = []
                    for _ in range(max(1, args.repeat) if f == fractions[0] else 1):
                        with ForeignLoad() as fl:
                            res = run_method(name, task, mcfg, cache=dict(defaults))
                        times.append(res.seconds)
                    if f == fractions[0]:
                        first_times = times
                        defaults[method] = res._replace(
                            seconds=min(times[1:]) if len(times) > 1 else times[0])
                    r = lds(res.scores_qn, gt.masks_sn, gt.losses_sq)
                    by_fraction[f] = (r, res, times)
            except MemoryError as e:
                print(f"[{tname}] {method}: skipped ({e})")
                entry["rows"].append({"method": method, "skipped": str(e)})
                continue
            # Damped baselines keep their best damping on this ground truth (favouring them).
            best_f = max(by_fraction, key=lambda f: by_fraction[f][0].mean)
            r, res, _ = by_fraction[best_f]
            times = first_times
            # The first run compiles (or loads from the on-disk XLA cache); later runs show
            # the cost that scales with the data.
            res = res._replace(seconds=min(times[1:]) if len(times) > 1 else times[0])
            if best_f is not None:
                res.info["damping_fraction"] = best_f
                res.info["lds_by_damping_fraction"] = {str(f): v[0].mean
                                                       for f, v in by_fraction.items()}
            scores[method] = res.scores_qn
            out = args.scores_dir / tname / method
            out.mkdir(parents=True, exist_ok=True)
            np.save(out / "scores.npy", res.scores_qn)
            (out / "ids.json").write_text(json.dumps({"queries": task.queries.ids,
                                                      "train": task.train.ids}))
            row = {"method": method, "lds": r.to_dict(), "seconds": res.seconds,
                   "seconds_first_run": times[0], "foreign_load": fl.fraction, "info": res.info}
            row["lds"].pop("per_query", None)
            row["per_query"] = [None if not np.isfinite(v) else float(v) for v in r.per_query]
            entry["rows"].append(row)
            print(f"[{tname}] {method:9s} {r.format()}  {res.seconds:.1f} s")
            write_results(args.name, results)
        ok_rows = [r for r in entry["rows"] if "lds" in r]
        stride_s = next((r["seconds"] for r in ok_rows if r["method"] == "stride"), None)
        for r in ok_rows:
            r["time_vs_stride"] = r["seconds"] / stride_s if stride_s else None
            table.append({
                "task": tname, "method": r["method"],
                "LDS mean ± std": f"{r['lds']['mean']:.3f} ± {r['lds']['std']:.3f}",
                "95% CI": f"[{r['lds']['ci_low']:.3f}, {r['lds']['ci_high']:.3f}]",
                "seconds": f"{r['seconds']:.1f}",
                "time / STRIDE": ("-" if r["time_vs_stride"] is None
                                  else f"{r['time_vs_stride']:.2f}x")})
        entry["targets"] = _targets(ok_rows)
        mixes = [r for r in ok_rows if r["method"].startswith("mix")]
        singles = [r for r in ok_rows if not r["method"].startswith("mix")]
        if mixes and singles:
            best = max(singles, key=lambda r: r["lds"]["mean"])
            entry["mixture_vs_best_single"] = {
                r["method"]: {"lds": r["lds"]["mean"], "best_single": best["method"],
                              "best_single_lds": best["lds"]["mean"],
                              "ratio": r["lds"]["mean"] / best["lds"]["mean"]} for r in mixes}
        if tname in cf_tasks and "stride" in scores:
            k = max(1, int(round(args.cf_k * task.n)))
            qs = np.arange(min(args.cf_queries, task.num_queries))
            best = max((r for r in ok_rows if r["method"] != "stride"),
                       key=lambda r: r["lds"]["mean"], default=None)
            cf = {"k": k, "queries": len(qs)}
            for m in ["stride"] + ([best["method"]] if best else []):
                t0 = time.perf_counter()
                got = counterfactual(task, scores[m], k=k, queries=qs, num_random=4)
                cf[m] = counterfactual_summary(got["base"], got["top"], got["random"])
                cf[m]["seconds"] = time.perf_counter() - t0
                print(f"[{tname}] counterfactual {m}: removing top-{k} raises the loss by "
                      f"{cf[m]['mean_increase_top']:.4f} vs {cf[m]['mean_increase_random']:.4f} "
                      f"for {k} random")
            entry["counterfactual"] = cf
        write_results(args.name, results)
    print_table(table, ["task", "method", "LDS mean ± std", "95% CI", "seconds", "time / STRIDE"])
    for tname, e in results["tasks"].items():
        print(f"{tname}: targets {json.dumps(e.get('targets', {}))}")
    png = plot(results, RESULTS_DIR / f"{args.name}.png")
    if png:
        print(f"plot: {png}")
    write_results(args.name, results)


if __name__ == "__main__":
    main()
