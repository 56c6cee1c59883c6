"""Contamination audit at full size: leak half of task (a)'s 80 queries into its training rows (1,
2 or 4 copies each), train from scratch, attribute with STRIDE and every baseline, and report
(i) recall of the planted replicas, (ii) detection of leaked queries (ROC-AUC, PR-AUC) and
(iii) hit@10 for retrieving a replica, for each method and for STRIDE combined with each
baseline (stride_jax.tasks.contamination.run_audit; definitions in
stride_jax.apps.contamination).

Scenarios:
  exact     exact copies (configs/contamination.yaml as is);
  near_dup  near-duplicates: in each copy half of the scored tokens replaced by random tokens
            (task.noise=0.5), so that neither the copy nor its gradient equals the query's.

With ``--attempts SCENARIO,...`` it also tries, on those scenarios, other ways to get at the
replicas from STRIDE's own artifacts (same operators and responses): re-solving the responses
(ridge, Lasso, the marginal mean-difference estimator), per-token responses
(stride_jax.apps.tokens' measurement, aggregated over the query's tokens), self-influence
(stride_jax.apps.selfinf) as a prior, reciprocal-rank fusion and three-way combinations.

Usage:
  python benchmarks/contamination.py [--scenarios exact,near_dup] [--attempts near_dup]
                                     [--methods ...] [--workdir runs/contamination]
Writes benchmarks/results/contamination.json (with the machine described) after each scenario.
Each scenario's STRIDE stages and scores go to a fresh WORKDIR/<scenario>-<time> directory, so
STRIDE's time is always that of a full run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ForeignLoad, write_results  # noqa: E402

from stride_jax.apps.contamination import audit_scores, combine, format_table  # noqa: E402
from stride_jax.config import load_config, to_dict  # noqa: E402
from stride_jax.tasks.contamination import (ContaminationConfig,  # noqa: E402
                                            build_contamination_task, run_audit)

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = {"exact": [], "near_dup": ["task.noise=0.5"]}


def attempts(cfg: ContaminationConfig, ct, scores: dict[str, np.ndarray], stride_dir: Path) -> dict:
    """Other signals from STRIDE's own artifacts, alone and combined (module docstring)."""
    import jax

    from stride_jax.attributor import Attributor
    from stride_jax.eval.suite import task_lm
    from stride_jax.solve import SolveConfig, solve

    task = ct.task
    att = Attributor(task_lm(task, cfg.stride.steering.layer), task.train, cfg.stride,
                     workdir=stride_dir, progress=False)
    design = att.design()
    y = np.asarray(att.measure(task.queries).y_qk, np.float64)          # reused stage
    d = design.example_counts.astype(np.float64)
    sec: dict[str, float] = {}
    S: dict[str, np.ndarray] = {}
    t = time.perf_counter()
    # Marginal: mean (centred) response over the subsets holding i -- no regression at all.
    S["marginal"] = design.rmatvec(y - y.mean(1, keepdims=True)) / d
    sec["marginal"] = time.perf_counter() - t
    for est in ("ridge", "lasso"):
        t = time.perf_counter()
        S[est] = np.asarray(solve(design, y, SolveConfig(estimator=est),
                                  key=jax.random.fold_in(jax.random.key(cfg.stride.seed), 2)).w_qn)
        sec[est] = time.perf_counter() - t
    # Per-token: a replica is the query, so it should help every token, not just a few. The
    # per-token marginal effects E[t, i] of each query are aggregated over its scored tokens.
    t = time.perf_counter()
    y_qtk = np.asarray(att.token_responses(task.queries).y_qtk, np.float64)
    mask = task.queries.loss_mask.astype(bool)
    agg: dict[str, list] = {"tokens_mean_z": [], "tokens_median": [], "tokens_frac_pos": [],
                            "tokens_q25_z": []}
    for q in range(y_qtk.shape[0]):
        yt = y_qtk[q][mask[q][: y_qtk.shape[1]]]
        E = design.rmatvec(yt - yt.mean(1, keepdims=True)) / d                  # [m, n]
        sd = E.std(1, keepdims=True)
        Z = (E - E.mean(1, keepdims=True)) / np.where(sd > 0, sd, 1.0)
        agg["tokens_mean_z"].append(Z.mean(0))
        agg["tokens_median"].append(np.median(E, 0))
        agg["tokens_frac_pos"].append((E > 0).mean(0) + 1e-6 * E.mean(0))       # ties: by mean
        agg["tokens_q25_z"].append(np.quantile(Z, 0.25, axis=0))
    S.update({k: np.stack(v) for k, v in agg.items()})
    sec["tokens"] = time.perf_counter() - t
    # Self-influence (memorisation) of each training row, the same for every query: a prior.
    t = time.perf_counter()
    si = np.asarray(att.self_influence(), np.float64)
    sec["selfinf"] = time.perf_counter() - t
    S["selfinf"] = np.broadcast_to(si, y.shape[:1] + si.shape).copy()

    def one(name, s):
        r = audit_scores(s, ct.replica_map, ct.leaked_mask, k=cfg.k, stat=cfg.detection_stat)
        r.pop("per_query")
        return {"method": name, **r}

    rows = [one(k, v) for k, v in S.items()]
    st = scores["stride"]
    for other in [*S, *(m for m in scores if m != "stride")]:
        sig = S.get(other, scores.get(other))
        hows = ("rank", "zscore", "rrf") if other not in scores else ("rrf",)
        for how in hows:
            rows.append(one(f"stride+{other} ({how})", combine([st, sig], how)))
    rows.append(one("stride-selfinf (zscore)", combine([st, -S["selfinf"]], "zscore")))
    for trio in (("graddot", "repsim"), ("trak", "repsim"), ("logra", "repsim")):
        if all(m in scores for m in trio):
            for how in ("rank", "zscore"):
                rows.append(one(f"stride+{'+'.join(trio)} ({how})",
                                combine([st, *(scores[m] for m in trio)], how)))
    return {"rows": rows, "seconds": sec}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "contamination.yaml")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--attempts", default="near_dup",
                    help="scenarios on which to try the other signals ('' for none)")
    ap.add_argument("--methods", default=None, help="comma-separated (default: the config's)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "contamination")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="applied to every scenario")
    args = ap.parse_args()
    methods = args.methods.split(",") if args.methods else None
    tried = [a for a in args.attempts.split(",") if a]
    results: dict = {"argv": sys.argv[1:], "scenarios": {}}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in args.scenarios.split(","):
        cfg = load_config(ContaminationConfig, args.config, [*SCENARIOS[name], *args.overrides])
        work = args.workdir / f"{name}-{stamp}"
        print(f"== {name} ({work})", flush=True)
        t0 = time.perf_counter()
        with ForeignLoad() as fl:
            ct = build_contamination_task(cfg.task)
            build_s = time.perf_counter() - t0
            out = run_audit(cfg, methods, workdir=work, built=ct,
                            log=lambda s: print(s, flush=True))
        out["task"]["build_seconds"] = build_s
        print(out["table"])
        ref = out["reference"]["query_loss"]
        print(f"reference (no attribution): detection by the query's own loss: ROC-AUC "
              f"{ref['roc_auc']:.3f}, PR-AUC {ref['pr_auc']:.3f}", flush=True)
        entry = {"overrides": [*SCENARIOS[name], *args.overrides], "config": to_dict(cfg),
                 "foreign_load": fl.fraction, **out}
        if name in tried:
            scores = {m: np.load(work / "scores" / f"{m}.npy") for m in
                      (methods or cfg.methods)}
            with ForeignLoad() as fl2:
                att = attempts(cfg, ct, scores, work / "stride")
            att["foreign_load"] = fl2.fraction
            rates = sorted({int(c) for c in ct.copies if c > 0})
            att["table"] = format_table(att["rows"], k=cfg.k, copies=rates)
            print(f"-- attempts on {name}:\n{att['table']}", flush=True)
            entry["attempts"] = att
        entry["total_seconds"] = time.perf_counter() - t0
        results["scenarios"][name] = entry
        path = write_results("contamination", results)
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
