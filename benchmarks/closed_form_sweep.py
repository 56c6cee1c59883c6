"""Why the default STRIDE run fits its operators in closed form: the faithfulness sweep.

On each task (``configs/task_<task>.yaml``, its retraining ground truth under
``--groundtruth-dir``) this script measures, against the same ground truth, with paired
per-query differences to the default:

1. **The closed-form operators' metric** (:mod:`stride_jax.train._closed_form`): the reader side
   (no whitening, or damped whitening of ``A`` at several dampings, centred features), the
   output side (the site Fisher ``S`` whitened at several dampings, or not at all), the reader
   layer (~2/3 depth, the final hidden state, both), the site (``logits`` vs
   ``final_hidden``), and the training-side norm power (scores divided by ``|g~_i|^p``). Each variant's scores are computed here from the operator gradients
   directly (numpy, float64 metric), independently of the library's code path; the default
   row is also run through ``Attributor`` and both must agree.
2. **Subsets and regression.** The paper's pipeline measures subset operators and decodes them.
   With closed-form (Newton) subset operators the responses are ``y = M_norm s``; the script
   decodes them by the project's ridge at ``K = n/2, n, 2n`` (``K >= n`` is needed to recover
   ``s``), both from the linear responses and from responses measured exactly (nonlinear) after
   a step of size ``eta`` along the Newton direction: the regression never beats its own limit,
   which the default computes directly.
3. **Reproducibility**: the correlation of the default's scores between two seeds (the seed only
   enters through the output-side projection, which these tasks do not need).

Usage::

    python benchmarks/closed_form_sweep.py [--tasks digits,pretrain,finetune]
        [--groundtruth-dir runs/gt] [--subsets 0.5,1,2] [--etas 0.001,1]

Writes ``benchmarks/results/closed_form_sweep.json`` (merged per task) and prints a table.
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
from _common import RESULTS_DIR, machine_info, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = RESULTS_DIR / "closed_form_sweep.json"


def _paired(a: np.ndarray, b: np.ndarray, seed: int = 0, reps: int = 2000) -> dict:
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    d = d[np.isfinite(d)]
    rng = np.random.default_rng(seed)
    boot = rng.choice(d, (reps, d.size)).mean(1)
    return {"mean": float(d.mean()), "ci_low": float(np.quantile(boot, 0.025)),
            "ci_high": float(np.quantile(boot, 0.975))}


class Terms:
    """Per-token reader features, site gradients and probabilities of the task's rows."""

    def __init__(self, lm, rows, batch: int = 64):
        import jax
        import jax.numpy as jnp

        @jax.jit
        def f(ids, mask):
            hr, hf = lm.features(lm.params, ids, mask)
            logits = lm.head(lm.params, hf).astype(jnp.float32)
            return hr.astype(jnp.float32), hf.astype(jnp.float32), jax.nn.softmax(logits, -1)

        outs = [f(jnp.asarray(rows.input_ids[i:i + batch]),
                  jnp.asarray(rows.attention_mask[i:i + batch]))
                for i in range(0, len(rows), batch)]
        self.h_reader, self.h_final, self.p = (np.concatenate([np.asarray(o[j]) for o in outs])
                                               for j in range(3))
        m = rows.loss_mask.astype(np.float32)
        self.mask = m
        w = m / np.maximum(m.sum(1, keepdims=True), 1)
        tgt = rows.target_ids()
        r = self.p.copy()
        np.put_along_axis(r, tgt[..., None], np.take_along_axis(r, tgt[..., None], -1) - 1.0, -1)
        self.r = r * w[..., None]           # dl/dlogits per token (mean-token loss)


def _rms(h):
    return h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-6)


def _whiten(M: np.ndarray, frac: float | None) -> np.ndarray:
    """``M``'s damped inverse square root in its eigenbasis, ``Q diag(1/sqrt(e + frac mean e))``
    (the identity for ``frac=None``)."""
    if frac is None:
        return np.eye(len(M))
    e, v = np.linalg.eigh(M)
    e = np.maximum(e, 0)
    return v / np.sqrt(e + frac * e.mean())[None, :]


def variant_scores(tr: Terms, qr: Terms, *, reader: str, lam_a, lam_s, norm=0.0, centre=False,
                   site="logits", U=None) -> np.ndarray:
    def phi(t: Terms):
        parts = {"layer": [_rms(t.h_reader)], "final": [_rms(t.h_final)],
                 "both": [_rms(t.h_reader), t.h_final]}[reader]
        return np.concatenate(parts, -1)

    ph_t, ph_q = phi(tr), phi(qr)
    sel = tr.mask.reshape(-1) > 0
    flat = ph_t.reshape(-1, ph_t.shape[-1])[sel]
    if centre:
        mu = flat.mean(0)
        ph_t, ph_q, flat = ph_t - mu, ph_q - mu, flat - mu
    A = flat.T @ flat / len(flat)
    pp = tr.p.reshape(-1, tr.p.shape[-1])[sel]
    S = np.diag(pp.mean(0)) - pp.T @ pp / len(pp)
    e_t, e_q = tr.r, qr.r
    if site == "final_hidden":
        S = U @ S @ U.T
        e_t, e_q = e_t @ U.T, e_q @ U.T
    Ta, Ts = _whiten(A, lam_a), _whiten(S, lam_s)
    g_t = np.einsum("ntd,ntc->ndc", ph_t @ Ta, e_t @ Ts, optimize=True).reshape(len(ph_t), -1)
    g_q = np.einsum("ntd,ntc->ndc", ph_q @ Ta, e_q @ Ts, optimize=True).reshape(len(ph_q), -1)
    sq = np.einsum("nd,nd->n", g_t, g_t)
    scale = np.where(sq > 0, np.where(sq > 0, sq, 1.0) ** (-0.5 * norm), 0.0) if norm else 1.0
    return (g_q @ g_t.T) * scale


def concentration(s_qn: np.ndarray) -> dict:
    """How concentrated each query's influence is: the share of its total |score| held by its
    top 1 % and 10 % of examples, and the participation ratio (sum |s|)^2 / sum s^2 as a fraction
    of n (1: spread evenly; 1/n: one example), averaged over queries."""
    a = np.abs(np.asarray(s_qn, np.float64))
    n = a.shape[1]
    srt = -np.sort(-a, axis=1)
    tot = np.maximum(a.sum(1), 1e-300)
    share = {f"top_{int(100 * f)}pct_share": float(np.mean(srt[:, :max(1, int(f * n))].sum(1) / tot))
             for f in (0.01, 0.1)}
    pr = (a.sum(1) ** 2) / np.maximum((a ** 2).sum(1), 1e-300) / n
    return {**share, "participation_fraction": float(pr.mean())}


VARIANTS = [
    # name, kwargs (the default first)
    ("default", {}),
    ("reader: whitened A, damping 0.1", {"lam_a": 0.1}),
    ("reader: whitened A, damping 0.3", {"lam_a": 0.3}),
    ("reader: whitened A, damping 1", {"lam_a": 1.0}),
    ("reader: whitened A, damping 10", {"lam_a": 10.0}),
    ("reader: identity", {"lam_a": None}),
    ("reader: centred features", {"centre": True}),
    ("reader: ~2/3 depth", {"reader": "layer"}),
    ("reader: final hidden state", {"reader": "final"}),
    ("reader: 2/3 depth + final hidden", {"reader": "both"}),
    ("training-side norm power 0 (plain Newton-step scores)", {"norm": 0.0}),
    ("training-side norm power 0.25", {"norm": 0.25}),
    ("training-side norm power 0.75", {"norm": 0.75}),
    ("training-side norm power 1 (cosine)", {"norm": 1.0}),
    ("output: no whitening (S = I)", {"lam_s": None}),
    ("output: S damping 0.01", {"lam_s": 0.01}),
    ("output: S damping 1", {"lam_s": 1.0}),
    ("site: final_hidden (C = d)", {"site": "final_hidden"}),
    ("neither side whitened (gradient dot product)", {"lam_a": None, "lam_s": None, "norm": 0.0}),
]


def subset_rows(task, gt, s_lin, tr: Terms, qr: Terms, lm, lam_a, lam_s, seed: int,
                fractions=(0.5, 1.0, 2.0), etas=(1e-3, 1.0)) -> list[dict]:
    """Closed-form subset operators decoded by the project's ridge (linear and measured)."""
    import jax
    import jax.numpy as jnp

    from stride_jax.eval.metrics import lds
    from stride_jax.solve import SolveConfig, solve
    from stride_jax.subsets import expander_design

    n = task.n
    ph_t, ph_q = _rms(tr.h_reader), _rms(qr.h_reader)
    sel = tr.mask.reshape(-1) > 0
    flat = ph_t.reshape(-1, ph_t.shape[-1])[sel]
    A = flat.T @ flat / len(flat)
    pp = tr.p.reshape(-1, tr.p.shape[-1])[sel]
    S = np.diag(pp.mean(0)) - pp.T @ pp / len(pp)
    Ta, Ts = _whiten(A, lam_a), _whiten(S, lam_s)
    Pa, Ps = Ta @ Ta.T, Ts @ Ts.T
    G = np.einsum("ntd,ntc->ndc", ph_t, tr.r, optimize=True)           # raw operator gradients
    qt = task.queries.target_ids()
    qw = qr.mask / qr.mask.sum(1, keepdims=True)
    qlogp = np.log(np.maximum(qr.p, 1e-30))
    qphi, qlogp_j, qt_j = jnp.asarray(ph_q), jnp.asarray(qlogp), jnp.asarray(qt)

    from stride_jax.steering import delta_logprob

    @jax.jit
    def measured(a_kdc):          # exact mean log-prob change of every query, [Q, k]
        def one(a):
            # The cancellation-free closed form the trained pipeline's measurement uses.
            dlp = delta_logprob(qlogp_j, jnp.einsum("qtd,dc->qtc", qphi, a), qt_j)
            return jnp.sum(dlp * qw, 1)
        return jax.vmap(one, out_axes=1)(a_kdc)

    rows = []
    for frac in fractions:
        K = int(frac * n)
        d = max(10, int(np.ceil(40 * K / n)))
        design = expander_design(n, K, min(d, K), key=jax.random.key(seed + K))
        M = design.to_dense(np.float64)
        size = M.sum(1, keepdims=True)
        # Newton directions of the subset operators (mean-loss fidelity): -P gbar_k.
        gbar = (M / size) @ G.reshape(n, -1)
        a = -np.einsum("ab,kbc,cd->kad", Pa, gbar.reshape(K, *G.shape[1:]), Ps, optimize=True)
        lin = (M / size) @ s_lin.T                                    # [K, Q]
        for eta, y in [("linear", lin.T)] + [
                (e, np.concatenate([np.asarray(measured(jnp.asarray(e * a[i:i + 32], jnp.float32)))
                                    for i in range(0, K, 32)], 1)) for e in etas]:
            t0 = time.perf_counter()
            out = solve(design, np.asarray(y, np.float64), SolveConfig(estimator="ridge"),
                        key=jax.random.key(2))
            r = lds(out.w_qn, gt.masks_sn, gt.losses_sq, bootstrap=0)
            corr = float(np.mean([np.corrcoef(y[q], lin[:, q])[0, 1] for q in range(len(y))]))
            rows.append({"K": K, "K_over_n": frac, "per_example": int(d), "responses": str(eta),
                         "corr_with_linear": corr, "lds": r.mean,
                         "per_query": r.per_query.tolist(),
                         "solve_seconds": time.perf_counter() - t0})
            print(f"  subsets K={K} ({frac:g} n) responses={eta}: LDS {r.mean:.3f} "
                  f"(corr with linear {corr:.3f})", flush=True)
    return rows


def run_task(name: str, gt_dir: Path, subsets: tuple[float, ...], etas: tuple[float, ...]) -> dict:
    import jax.numpy as jnp

    from stride_jax.attributor import Attributor
    from stride_jax.config import load_config
    from stride_jax.eval.groundtruth import run_groundtruth
    from stride_jax.eval.metrics import lds
    from stride_jax.eval.suite import TaskConfig, build_task, task_lm
    from stride_jax.train._closed_form import reader_damping_of, reader_of

    cfg = load_config(TaskConfig, ROOT / "configs" / f"task_{name}.yaml")
    t0 = time.perf_counter()
    task = build_task(cfg)
    gt = run_groundtruth(task.retrain, n=task.n, num_queries=task.num_queries,
                         cfg=cfg.groundtruth, out_dir=gt_dir / name, stamp=task.stamp,
                         progress=False)
    print(f"[{name}] n={task.n}, {task.num_queries} queries, {gt.masks_sn.shape[0]} retrains "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    lm = task_lm(task, cfg.stride.steering.layer)
    tr, qr = Terms(lm, task.train), Terms(lm, task.queries)
    d = lm.d_final
    U = np.asarray(lm.head(lm.params, jnp.eye(d)[None])[0]
                   - lm.head(lm.params, jnp.zeros((1, 1, d)))[0], np.float64)
    cf = cfg.stride.closed_form
    C = lm.vocab_size
    defaults = {"reader": reader_of(cf, C), "lam_a": reader_damping_of(cf, C),
                "lam_s": cf.output_damping,
                "norm": cf.norm_power}
    rows = []
    ref = None
    for vname, kw in VARIANTS:
        args = {**defaults, **kw}
        if vname != "default" and args == defaults and "centre" not in kw and "site" not in kw:
            continue    # the same as the default on this task
        t1 = time.perf_counter()
        s = variant_scores(tr, qr, U=U, **args)
        r = lds(s, gt.masks_sn, gt.losses_sq, bootstrap=1000)
        row = {"variant": vname, "settings": {k: v for k, v in args.items()},
               "lds": r.to_dict(), "seconds": time.perf_counter() - t1}
        if ref is None:
            ref = (r.per_query, s)
        else:
            row["paired_vs_default"] = _paired(r.per_query, ref[0])
        rows.append(row)
        print(f"  {vname:<46} LDS {r.mean:.3f}" + (
            f"  (vs default {row['paired_vs_default']['mean']:+.3f})" if "paired_vs_default" in row
            else ""), flush=True)
    # The library's own code path must give the default row's scores.
    t1 = time.perf_counter()
    lib = Attributor(lm, task.train, cfg.stride, progress=False).attribute(task.queries).scores_qn
    lib_s = time.perf_counter() - t1
    lib2 = Attributor(lm, task.train, dataclasses.replace(cfg.stride, seed=cfg.stride.seed + 1),
                      progress=False).attribute(task.queries).scores_qn
    agree = float(np.max(np.abs(lib - ref[1])) / np.max(np.abs(ref[1])))
    repro = float(np.mean([np.corrcoef(lib[q], lib2[q])[0, 1] for q in range(len(lib))]))
    zero = int(np.sum(np.all(lib == 0, axis=1)))
    print(f"  library path: max rel. difference to the default row {agree:.1e}; "
          f"seed 0 vs 1 correlation {repro:.6f}; all-zero queries {zero}; {lib_s:.1f} s",
          flush=True)
    out = {"n": task.n, "queries": task.num_queries, "retrains": int(gt.masks_sn.shape[0]),
           "concentration": concentration(lib),
           "site_width": C, "variants": rows,
           "library": {"max_rel_diff_to_default_row": agree, "seconds": lib_s,
                       "reproducibility_seed0_vs_seed1": repro, "all_zero_queries": zero}}
    if subsets:
        out["subsets"] = subset_rows(task, gt, ref[1], tr, qr, lm, defaults["lam_a"],
                                     defaults["lam_s"], cfg.stride.seed, subsets, etas)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="digits,pretrain,finetune")
    ap.add_argument("--groundtruth-dir", type=Path, default=ROOT / "runs" / "gt")
    ap.add_argument("--subsets", default="",
                    help="K / n ratios at which closed-form subset operators are also decoded by "
                         "regression, e.g. 0.5,1,2 (slow; default: none)")
    ap.add_argument("--etas", default="0.001,1",
                    help="step sizes of the measured (nonlinear) subset responses")
    args = ap.parse_args(argv)
    doc = json.loads(OUT.read_text()) if OUT.is_file() else {"tasks": {}}
    for name in [t for t in args.tasks.split(",") if t]:
        fr = tuple(float(x) for x in args.subsets.split(",") if x)
        etas = tuple(float(x) for x in args.etas.split(",") if x)
        doc["tasks"][name] = run_task(name, args.groundtruth_dir, fr, etas)
        doc["machine"] = machine_info()
        OUT.write_text(json.dumps(doc, indent=1) + "\n")
    table = []
    for name, t in doc["tasks"].items():
        for r in t["variants"]:
            table.append({"task": name, "variant": r["variant"], "lds": r["lds"]["mean"],
                          "vs_default": r.get("paired_vs_default", {}).get("mean")})
    print_table(table, ["task", "variant", "lds", "vs_default"])
    print(f"results: {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
