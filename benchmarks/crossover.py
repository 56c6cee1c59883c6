"""Where STRIDE's cost advantage over gradient TDA begins: wall time against n (issue 8, item 3).

Every method attributes the same Q = 50 queries over the first n rows of one synthetic training
set, on the faithfulness benchmark's ``pretrain`` model architecture (2 layers, d = 64, 4 heads,
SwiGLU 256, vocabulary 1024, rows of 64 tokens; randomly initialised: cost does not depend on
the weights), each method at the settings the LDS benchmark ran it with:

* ``stride``: :class:`~stride_jax.attributor.AttributeConfig` defaults (K = min(1000, 40 n / 32),
  d = 40, rank 32, ``logits`` site, 20 epochs, ``solve.estimator=auto``) with a run directory
  (so past 4 GiB the activation cache goes to disk, as in the CLI); its stages (activation cache
  + operator training, measurement, recovery) are timed separately;
* ``trak`` (k = 2048), ``logra`` (rank 16 per side) and ``influence`` (exact empirical Fisher;
  it keeps the n x P gradient matrix and refuses beyond its 4 GiB budget) from
  :mod:`stride_jax.baselines.gradient`, gradient chunks of 32;
* ``forward``: one jitted forward pass of the base model (logits) over the n + Q rows, batches
  of 256, compilation excluded (the unit of cost of issue 3's pipeline target).

Times are wall clock from the model to the ``[Q, n]`` scores, compilation included, as a user
sees them, on this machine (printed in the JSON). STRIDE's operator training takes
``ceil(K / 64) * 20`` steps whatever n is once K reaches 1000 (n >= 800), so its time is a fixed
cost plus a small per-row cost (the activation cache and the recovery), while every gradient
method pays a per-example gradient (and projection) for each row. The script fits
``t = a + b n`` per method over the measured points and reports the crossover
``n* = (a_stride - a_m) / (b_m - b_stride)`` against each gradient method, plus whether the
measured points already show it. The plot (``results/crossover.png``) is in the README.

Usage:
  python benchmarks/crossover.py [--n 2000,8000,32000,128000] [--methods stride,trak,logra,influence]
                                 [--queries 50] [--out benchmarks/results/crossover.json]

A run merges its points into an existing results file (the same method and n: replaced), so
sizes can be added one at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, ForeignLoad, machine_info, print_table, write_results  # noqa: E402

RUNS = Path(__file__).resolve().parents[1] / "runs" / "crossover"
ARCH = dict(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, intermediate_size=256)
T = 64
GRADIENT = ("trak", "logra", "influence")


def _rows(n: int, seed: int, prefix: str):
    from scaling import synthetic_rows
    return synthetic_rows(n, T, ARCH["vocab_size"], seed, prefix)


def run_point(method: str, n: int, model, train_all, queries) -> dict:
    import jax
    import numpy as np

    from stride_jax.attributor import AttributeConfig, Attributor
    from stride_jax.baselines import gradient as G
    train = train_all.subset(np.arange(n)) if n < len(train_all) else train_all
    out: dict = {"method": method, "n": n, "queries": len(queries)}
    load = ForeignLoad().__enter__()
    t0 = time.perf_counter()
    if method.startswith("stride"):
        # "stride" is the default (logits) site; "stride_final_hidden" steers the final hidden
        # state instead (C = d_model: cheaper training and measurement).
        import dataclasses
        cfg = AttributeConfig()
        if method != "stride":
            cfg = dataclasses.replace(cfg, steering=dataclasses.replace(
                cfg.steering, site=method[len("stride_"):]))
        # A run directory, as the CLI always has: past cache.memory_limit (4 GiB, n > ~130k
        # here) the activation cache goes to disk.
        import shutil
        workdir = RUNS / f"{method}-n{n}"
        shutil.rmtree(workdir, ignore_errors=True)
        att = Attributor(model, train, cfg, workdir=workdir, progress=False)
        att.fit_operators()
        t1 = time.perf_counter()
        res = att.measure(queries)
        t2 = time.perf_counter()
        att.solve(res, queries.ids)
        t3 = time.perf_counter()
        out.update(num_subsets=att.num_subsets, operators_s=t1 - t0, measure_s=t2 - t1,
                   solve_s=t3 - t2, cache_on_disk=att._cache_on_disk())
        shutil.rmtree(workdir, ignore_errors=True)
    elif method == "forward":
        from stride_jax.steering import from_causal_lm
        lm = from_causal_lm(model, 1)
        fwd = jax.jit(lambda p, i, m: lm.head(p, lm.features(p, i, m)[1]).sum())
        ids = np.concatenate([train.input_ids, queries.input_ids])
        mask = np.concatenate([train.attention_mask, queries.attention_mask])
        fwd(lm.params, np.resize(ids, (256, T)), np.resize(mask, (256, T))).block_until_ready()
        t0 = time.perf_counter()   # compilation excluded: the unit of cost is the pass itself
        for s in range(0, len(ids), 256):
            blk = slice(s, s + 256)
            i, m = ids[blk], mask[blk]
            if len(i) < 256:   # one compiled shape
                i, m = np.resize(i, (256, T)), np.resize(m, (256, T))
            fwd(lm.params, i, m).block_until_ready()
    else:
        params, loss_fn = G.causal_lm_loss(model)
        common = dict(train=G.rows_as_examples(train), queries=G.rows_as_examples(queries),
                      chunk=32)
        key = jax.random.key(0)
        try:
            if method == "trak":
                G.trak(loss_fn, params, proj_dim=2048, key=key, **common)
            elif method == "logra":
                G.logra(loss_fn, params, rank=16, key=key, **common)
            elif method == "influence":
                G.influence(loss_fn, params, **common)
            else:
                raise ValueError(f"unknown method {method!r}")
        except MemoryError as e:
            out.update(refused=str(e), seconds=None)
            return out
    out["seconds"] = time.perf_counter() - t0
    load.__exit__(None, None, None)
    out["other_cpu"] = load.fraction
    return out


def fit_line(points: list[dict]) -> dict | None:
    """Least squares ``t = a + b n`` over the measured points."""
    import numpy as np
    pts = [(p["n"], p["seconds"]) for p in points if p.get("seconds") is not None]
    if len(pts) < 2:
        return None
    n, t = np.array(pts, float).T
    b, a = np.polyfit(n, t, 1)
    return {"a_s": float(a), "b_s_per_row": float(b), "points": len(pts)}


def crossovers(results: list[dict]) -> dict:
    by = {}
    for r in results:
        by.setdefault(r["method"], []).append(r)
    fits = {m: fit_line(sorted(v, key=lambda r: r["n"])) for m, v in by.items()}
    fwd = {r["n"]: r["seconds"] for r in by.get("forward", []) if r.get("seconds")}
    # Issue 3's pipeline target: the whole STRIDE run within 2x one forward pass.
    out = {"fits": fits, "vs": {}, "stride_over_forward": {
        r["n"]: r["seconds"] / fwd[r["n"]] for r in by.get("stride", [])
        if r.get("seconds") and r["n"] in fwd}, "stride_final_hidden_over_forward": {
        r["n"]: r["seconds"] / fwd[r["n"]] for r in by.get("stride_final_hidden", [])
        if r.get("seconds") and r["n"] in fwd}}
    s = fits.get("stride")
    for m in GRADIENT:
        f = fits.get(m)
        if s is None or f is None:
            continue
        entry: dict = {}
        if f["b_s_per_row"] > s["b_s_per_row"]:
            entry["fitted_n"] = (s["a_s"] - f["a_s"]) / (f["b_s_per_row"] - s["b_s_per_row"])
        else:
            entry["fitted_n"] = None   # the method's per-row cost is not above STRIDE's
        st = {r["n"]: r["seconds"] for r in by["stride"] if r.get("seconds") is not None}
        ms = {r["n"]: r["seconds"] for r in by[m] if r.get("seconds") is not None}
        cheaper = sorted(n for n in st if n in ms and st[n] < ms[n])
        entry["measured_first_n_stride_cheaper"] = cheaper[0] if cheaper else None
        entry["ratio_at_largest_n"] = (
            ms[max(set(st) & set(ms))] / st[max(set(st) & set(ms))] if set(st) & set(ms) else None)
        out["vs"][m] = entry
    return out


def plot(doc: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    style = {"stride": ("crimson", "*"), "trak": ("steelblue", "o"), "logra": ("seagreen", "s"),
             "influence": ("darkorange", "^"), "forward": ("gray", "."),
             "stride_final_hidden": ("purple", "*")}
    by = {}
    for r in doc["results"]:
        if r.get("seconds") is not None:
            by.setdefault(r["method"], []).append((r["n"], r["seconds"]))
    grid = np.geomspace(min(n for v in by.values() for n, _ in v),
                        max(n for v in by.values() for n, _ in v) * 4, 50)
    for m, pts in by.items():
        pts.sort()
        c, mk = style.get(m, ("black", "x"))
        ax.plot(*zip(*pts), mk, color=c, ms=9 if m == "stride" else 6,
                label=f"{m} (measured)")
        f = doc["crossover"]["fits"].get(m)
        if f and m != "forward":
            ax.plot(grid, f["a_s"] + f["b_s_per_row"] * grid, "-", color=c, alpha=0.4, lw=1)
    for i, (m, e) in enumerate(doc["crossover"]["vs"].items()):
        if e.get("fitted_n"):
            ax.axvline(e["fitted_n"], color=style[m][0], ls=":", lw=1)
            ax.annotate(f" n*={e['fitted_n']:,.0f} vs {m}", (e["fitted_n"], 0.03 + 0.07 * i),
                        xycoords=("data", "axes fraction"), color=style[m][0], fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training rows n (64 tokens each)")
    ax.set_ylabel("wall time to [50, n] scores (s)")
    ax.set_title("STRIDE (defaults) vs gradient TDA: cost as n grows\n"
                 f"{doc['machine'].get('cpu_model', 'CPU')}, lines: t = a + b n fits",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", default="2000,8000,32000,128000")
    p.add_argument("--methods", default="forward,stride,trak,logra,influence")
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "crossover.json")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from --out")
    args = p.parse_args(argv)
    if args.plot_only:
        print(f"plot: {plot(json.loads(args.out.read_text()), args.out.with_suffix('.png'))}")
        return 0
    ns = [int(x) for x in args.n.split(",")]
    methods = args.methods.split(",")

    from stride_jax.model.config import tiny_llama
    from stride_jax.model.transformer import init_model
    model = init_model(tiny_llama(**ARCH), seed=0)
    train_all = _rows(max(ns), 0, "t")
    queries = _rows(args.queries, 1, "q")
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results = [r for r in old.get("results", [])
               if not (r["method"] in methods and r["n"] in ns)]
    for n in ns:
        for m in methods:
            r = run_point(m, n, model, train_all, queries)
            results.append(r)
            shown = "refused" if r.get("seconds") is None else f"{r['seconds']:.1f} s"
            print(f"n={n:>8} {m:<10} {shown}", flush=True)
            results.sort(key=lambda r: (r["n"], r["method"]))
            doc = {"arch": ARCH, "seq_len": T, "results": results,
                   "crossover": crossovers(results), "argv": sys.argv[1:]}
            if args.out.parent == RESULTS_DIR:
                write_results(args.out.stem, doc)
            else:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"benchmark": "crossover",
                                                "machine": machine_info(), **doc}, indent=2))
    doc = json.loads(args.out.read_text())
    rows = []
    for n in sorted({r["n"] for r in results}):
        row = {"n": n}
        for r in results:
            if r["n"] == n:
                row[r["method"]] = "refused" if r.get("seconds") is None else r["seconds"]
        rows.append(row)
    print_table(rows, ["n"] + [m for m in ("forward", "stride", "stride_final_hidden", "trak",
                                           "logra", "influence")
                               if any(m in r for r in rows)])
    for m, e in doc["crossover"]["vs"].items():
        fn = e.get("fitted_n")
        print(f"stride vs {m}: fitted crossover n* = "
              f"{'none' if fn is None else f'{fn:,.0f}'}; first measured n where STRIDE is "
              f"cheaper: {e['measured_first_n_stride_cheaper']}; {m}/stride time at the largest "
              f"n: {e['ratio_at_largest_n']:.2f}x")
    for key, site in (("stride_over_forward", "logits"),
                      ("stride_final_hidden_over_forward", "final_hidden")):
        for n, x in sorted(doc["crossover"].get(key, {}).items(), key=lambda kv: int(kv[0])):
            print(f"n={int(n):>8}: STRIDE ({site}) = {x:.1f} x one forward pass over the same "
                  f"tokens")
    png = plot(doc, args.out.with_suffix(".png"))
    if png:
        print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
