"""LDS sweep: STRIDE (or a baseline) under config overrides, on one task and one ground truth.

The task is built once (its model trained once) and the ground truth loaded once; each variant
applies dotted overrides to the task config, runs one method through
:func:`stride_jax.eval.suite.run_method` (timed the same way as ``stride-jax score``: wall clock
from the trained model to the scores, compile time included) and is scored by
:func:`stride_jax.eval.metrics.lds`. Every finished row is written to ``--out`` at once
(atomically), so a killed sweep keeps its rows; a rerun skips the variants already recorded with
the same method, overrides and resolved config (``--rerun`` repeats them). Each row stores the
config it resolved to and the git commit: if the library's defaults changed since a row was
recorded, the same overrides run again and the old row is kept (as ``name@old`` when the new row
takes its name, flagged ``superseded``).

Variants are strings of whitespace-separated ``key=value`` tokens:

    "name=r64 stride.steering.rank=64 stride.train.weight_stability=3"
    "name=if-1e-4 method=influence baselines.influence.damping=1e-4"

``name=`` labels the row (default: the overrides themselves, or ``default``), ``method=`` picks the
method (default ``stride``; see ``stride_jax.eval.suite.METHODS``) and every other token is a dotted
override of :class:`stride_jax.eval.suite.TaskConfig`. Overrides of the task itself (``kind``,
``digits.*``, ``pretrain.*``, ``finetune.*``, ``groundtruth.*``) are refused: the ground truth
belongs to one task. ``--variants-file`` is YAML: a list whose items are such strings or mappings
``{name: ..., method: ..., overrides: [..] or {key: value}}``. ``--baseline M`` adds a row
``name=M method=M``.

Usage:
  python benchmarks/sweep.py --config configs/task_digits.yaml --groundtruth runs/gt/digits \\
      --out benchmarks/results/sweep_digits.json --variant "name=default" \\
      --variant "name=r64 stride.steering.rank=64" --baseline trak
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ForeignLoad, machine_info, print_table  # noqa: E402

from stride_jax.config import load_config, parse_yaml, to_dict  # noqa: E402
from stride_jax.eval.groundtruth import load_groundtruth  # noqa: E402
from stride_jax.eval.metrics import lds  # noqa: E402
from stride_jax.eval.suite import METHODS, TaskConfig, build_task, run_method  # noqa: E402
from stride_jax.io.atomic import atomic_write_text, save_npy  # noqa: E402

TASK_KEYS = ("kind", "digits", "pretrain", "finetune", "groundtruth")


# ----------------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------------

def _override_key(tok: str) -> str:
    return tok.split("=", 1)[0].strip()


def make_variant(name: str | None, method: str | None, overrides: list[str]) -> dict[str, Any]:
    method = method or "stride"
    if method not in METHODS:
        raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    for tok in overrides:
        if "=" not in tok:
            raise SystemExit(f"override {tok!r} is not key=value")
        key = _override_key(tok)
        if key.split(".", 1)[0] in TASK_KEYS:
            raise SystemExit(f"override {tok!r} changes the task or its ground truth; a sweep "
                             f"runs on one task (build another ground truth for another task)")
    if not name:
        name = " ".join(overrides) if overrides else ("default" if method == "stride" else method)
    return {"name": name, "method": method, "overrides": list(overrides)}


def parse_variant(text: str) -> dict[str, Any]:
    name = method = None
    overrides = []
    for tok in shlex.split(text):
        key = _override_key(tok)
        if key == "name":
            name = tok.split("=", 1)[1]
        elif key == "method":
            method = tok.split("=", 1)[1]
        else:
            overrides.append(tok)
    return make_variant(name, method, overrides)


def load_variants_file(path: Path) -> list[dict[str, Any]]:
    data = parse_yaml(path.read_text(encoding="utf-8"), source=str(path))
    if isinstance(data, dict) and "variants" in data:
        data = data["variants"]
    if not isinstance(data, list):
        raise SystemExit(f"{path}: expected a list of variants (strings or mappings)")
    out = []
    for item in data:
        if isinstance(item, str):
            out.append(parse_variant(item))
        elif isinstance(item, dict):
            unknown = set(item) - {"name", "method", "overrides"}
            if unknown:
                raise SystemExit(f"{path}: variant keys {sorted(unknown)} unknown; use name, "
                                 f"method, overrides")
            ov = item.get("overrides") or []
            if isinstance(ov, dict):
                ov = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                      for k, v in ov.items()]
            elif isinstance(ov, str):
                ov = shlex.split(ov)
            out.append(make_variant(item.get("name"), item.get("method"), list(ov)))
        else:
            raise SystemExit(f"{path}: variant {item!r} is neither a string nor a mapping")
    return out


def variant_key(v: dict[str, Any]) -> tuple:
    """Rows with the same method and (order-free) overrides are the same variant."""
    return (v.get("method", "stride"), tuple(sorted(v.get("overrides", []))))


def resolved_config(cfg: TaskConfig, method: str) -> dict[str, Any]:
    """What the method actually ran with: the overrides on top of the *current* defaults."""
    if method == "stride":
        return to_dict(cfg.stride)
    return {**to_dict(cfg.baselines), "seed": cfg.seed}


def config_key(method: str, config: dict[str, Any] | None) -> tuple:
    return (method, json.dumps(config, sort_keys=True, default=str))


def code_version() -> dict[str, Any]:
    """Git commit of the library and whether stride_jax/ has uncommitted changes."""
    import subprocess
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "stride_jax"], cwd=root, capture_output=True, text=True,
                               check=True).stdout.strip() != ""
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


# ----------------------------------------------------------------------------------------------
# Results file
# ----------------------------------------------------------------------------------------------

def write_doc(path: Path, doc: dict[str, Any]) -> None:
    doc["machine"] = machine_info()
    atomic_write_text(path, json.dumps(doc, indent=1, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def paired_delta(a: list, b: list, *, bootstrap: int = 1000, seed: int = 0) -> tuple:
    """Mean of per-query differences a - b with a percentile-bootstrap 95% CI (paired)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    d = a[ok] - b[ok]
    if d.size == 0:
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, (bootstrap, d.size))].mean(1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return (float(d.mean()), float(lo), float(hi))


def print_summary(rows: list[dict[str, Any]], reference: str | None) -> None:
    ref = next((r for r in rows if r["name"] == reference), None) if reference else None
    table = []
    for r in sorted(rows, key=lambda r: -(r["lds"]["mean"] if r["lds"]["mean"] is not None
                                          else -math.inf)):
        row = {"name": r["name"], "method": r["method"], "lds": _r(r["lds"]["mean"], 3),
               "ci_low": _r(r["lds"]["ci_low"], 3), "ci_high": _r(r["lds"]["ci_high"], 3),
               "seconds": _r(r["seconds"], 1), "nnz/query": _r(r["nonzeros_per_query"], 1),
               "K": r.get("num_subsets")}
        if ref is not None:
            d, lo, hi = paired_delta(r["lds"]["per_query"], ref["lds"]["per_query"])
            row["d_vs_ref"] = _r(d, 3)
            row["d_ci"] = f"[{lo:+.3f},{hi:+.3f}]" if math.isfinite(d) else "-"
        table.append(row)
    cols = ["name", "method", "lds", "ci_low", "ci_high"]
    if ref is not None:
        cols += ["d_vs_ref", "d_ci"]
    cols += ["seconds", "nnz/query", "K"]
    if ref is not None:
        print(f"\nsorted by LDS; d_vs_ref: paired mean difference to {reference!r} over queries, "
              f"with its bootstrap 95% CI")
    print_table(table, cols)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, required=True, help="task config (TaskConfig YAML)")
    ap.add_argument("--groundtruth", type=Path, required=True, help="ground-truth directory")
    ap.add_argument("--out", type=Path, required=True, help="results JSON (appended to)")
    ap.add_argument("--variant", action="append", default=[],
                    help='"name=NAME [method=M] key=value ..." (repeatable)')
    ap.add_argument("--variants-file", type=Path, action="append", default=[],
                    help="YAML list of variants (strings or {name, method, overrides})")
    ap.add_argument("--baseline", action="append", default=[], metavar="METHOD",
                    help="add a row for a baseline method with its default settings")
    ap.add_argument("--rerun", action="store_true",
                    help="run variants even if the results file already holds them (replaced)")
    ap.add_argument("--reference", default="default",
                    help="row name the table compares against (paired over queries)")
    ap.add_argument("--save-scores", type=Path, default=None,
                    help="directory for each variant's scores ({name}.npy)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the CI")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the untimed one-epoch STRIDE run before the first row (it moves "
                         "one-time compilation out of the first row's seconds)")
    ap.add_argument("--print-only", action="store_true",
                    help="print the table of --out and exit (no task is built)")
    args = ap.parse_args(argv)

    doc: dict[str, Any] = {"benchmark": "sweep", "rows": []}
    if args.out.is_file():
        doc = json.loads(args.out.read_text())
        doc.setdefault("rows", [])
    if args.print_only:
        print_summary(doc["rows"], args.reference)
        return 0

    variants = [parse_variant(v) for v in args.variant]
    for f in args.variants_file:
        variants += load_variants_file(f)
    variants += [make_variant(m, m, []) for m in args.baseline]
    seen_names: dict[str, tuple] = {}
    for v in variants:
        k = variant_key(v)
        if v["name"] in seen_names and seen_names[v["name"]] != k:
            raise SystemExit(f"two different variants are both named {v['name']!r}")
        seen_names[v["name"]] = k
    for r in doc["rows"]:
        if r["name"] in seen_names and seen_names[r["name"]] != variant_key(r):
            raise SystemExit(f"{args.out} already has a row named {r['name']!r} with other "
                             f"overrides ({r['overrides']}); pick another name")

    # A variant is skipped when a row has the same method, overrides *and* resolved config: if
    # the library's defaults changed since a row was recorded, the same overrides mean another
    # configuration, so the variant runs again and the old row is kept under "name@old".
    # (Fails fast on bad overrides before the slow task build.)
    todo = []
    for v in variants:
        cfg = load_config(TaskConfig, args.config, v["overrides"])
        v["_config_key"] = config_key(v["method"], resolved_config(cfg, v["method"]))
        same = [r for r in doc["rows"] if variant_key(r) == variant_key(v)]
        match = [r for r in same if config_key(r["method"], r.get("config")) == v["_config_key"]]
        if match and not args.rerun:
            print(f"skip {v['name']!r}: already recorded as {match[0]['name']!r}")
            continue
        if same and not match:
            print(f"rerun {v['name']!r}: recorded as {same[0]['name']!r} with other defaults")
        if all(t["name"] != v["name"] for t in todo):
            todo.append(v)

    base_cfg = load_config(TaskConfig, args.config)
    gt = load_groundtruth(args.groundtruth)
    doc.update(config=str(args.config), groundtruth=str(args.groundtruth),
               groundtruth_shape={"subsets": int(gt.masks_sn.shape[0]),
                                  "n": int(gt.masks_sn.shape[1]),
                                  "queries": int(gt.losses_sq.shape[1])})
    if not todo:
        print_summary(doc["rows"], args.reference)
        return 0

    print(f"building the {base_cfg.kind} task", flush=True)
    t0 = time.perf_counter()
    task = build_task(base_cfg)
    print(f"  {task.n} training examples, {task.num_queries} queries "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    gt_stamp = gt.info.get("task")
    if gt_stamp is not None and json.loads(json.dumps(gt_stamp)) != \
            json.loads(json.dumps(task.stamp, default=str)):
        raise SystemExit(f"the ground truth in {args.groundtruth} was made for another task "
                         f"(stamp {gt_stamp}) than {args.config} builds ({task.stamp})")
    ids_file = args.groundtruth / "ids.json"
    if ids_file.is_file():
        ids = json.loads(ids_file.read_text())
        if ids.get("train") != list(task.train.ids) or ids.get("queries") != list(task.queries.ids):
            raise SystemExit(f"{ids_file} lists other training examples or queries than the task")
    if gt.masks_sn.shape[1] != task.n or gt.losses_sq.shape[1] != task.num_queries:
        raise SystemExit("ground truth and task disagree on n or the number of queries")
    doc["task_stamp"] = task.stamp
    code = code_version()
    if not args.no_warmup:
        t0 = time.perf_counter()
        run_method("stride", task, load_config(TaskConfig, args.config, ["stride.train.epochs=1"]))
        print(f"  warm-up (untimed, one-epoch STRIDE): {time.perf_counter() - t0:.0f} s",
              flush=True)

    for i, v in enumerate(todo):
        cfg = load_config(TaskConfig, args.config, v["overrides"])
        print(f"[{i + 1}/{len(todo)}] {v['name']} ({v['method']}"
              f"{': ' + ' '.join(v['overrides']) if v['overrides'] else ''})", flush=True)
        with ForeignLoad() as load:
            res = run_method(v["method"], task, cfg)
        result = lds(res.scores_qn, gt.masks_sn, gt.losses_sq, bootstrap=args.bootstrap)
        d = result.to_dict()
        nnz = float((res.scores_qn != 0).sum(1).mean())
        row = {"name": v["name"], "method": v["method"], "overrides": v["overrides"],
               "lds": {k: d[k] for k in ("mean", "std", "ci_low", "ci_high", "num_queries",
                                         "per_query")},
               "seconds": res.seconds, "nonzeros_per_query": nnz,
               "num_subsets": res.info.get("num_subsets"),
               "lds_num_subsets": int(result.num_subsets),
               "other_cpu": load.fraction,
               "info": {k: val for k, val in res.info.items()
                        if k not in ("num_subsets", "nonzeros_per_query")},
               "config": resolved_config(cfg, v["method"]),
               "code": code,
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        print(f"    {result.format()}  {res.seconds:.1f} s  nnz/query {nnz:.1f}"
              f"{'' if load.fraction is None else f'  other cpu {load.fraction:.2f}'}",
              flush=True)
        if args.save_scores is not None:
            save_npy(args.save_scores / f"{v['name'].replace('/', '_')}.npy", res.scores_qn)
        kept = []
        for r in doc["rows"]:
            if variant_key(r) != variant_key(v):
                kept.append(r)
            elif config_key(r["method"], r.get("config")) != v["_config_key"]:
                # recorded under older defaults: kept for the history (renamed if the new row
                # takes its name)
                old = dict(r, superseded=True)
                if old["name"] == v["name"]:
                    old["name"] += "@old"
                kept = [x for x in kept if x["name"] != old["name"]] + [old]
            # else: a --rerun of the same configuration replaces the row
        doc["rows"] = kept + [row]
        write_doc(args.out, doc)

    print_summary(doc["rows"], args.reference)
    return 0


if __name__ == "__main__":
    sys.exit(main())
