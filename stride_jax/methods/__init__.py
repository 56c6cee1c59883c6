r"""Every attribution method behind one registry: ``stride-jax attribute --method``, ``stride-jax
score``, the faithfulness suite and ``benchmarks/lds.py`` all call :func:`run_method`.

Methods (``method`` in the config, ``--method`` on the command line):

==============  ===================================================================  ==============
name            what                                                                 settings
==============  ===================================================================  ==============
``stride``      STRIDE (:class:`~stride_jax.attributor.Attributor`)                  the run config
``ekfac``       EK-FAC influence functions (:mod:`stride_jax.baselines.ekfac`)        ``methods.ekfac``
``kfac``        K-FAC influence functions (same factors, no eigenvalue correction)   ``methods.ekfac``
``trak``        TRAK-style projected gradients                                       ``methods.trak``
``logra``       LoGra-style Kronecker-projected gradients                            ``methods.logra``
``tracin``      TracInCP over checkpoints                                            ``methods.tracin``
``graddot``     gradient dot products                                                ``methods.chunk``
``influence``   exact influence functions (alias ``if``)                              ``methods.influence``
``repsim``      cosine of mean-pooled hidden states                                  ``methods.repsim``
``bm25``        BM25 on token ids                                                    ``methods.bm25``
``mix:a=w,..``  ``sum_m w_m z_m``: per-query z-scored scores of methods ``m``          the components'
``mix``         the default mixture (:func:`default_mixture`)                        the components'
==============  ===================================================================  ==============

**Sign**: every method's ``scores[q, i] > 0`` means example ``i`` helps query ``q`` (lowers its
loss; for the similarity methods ``repsim`` and ``bm25``: is similar to it). Units differ by
method: STRIDE and the gradient methods are first-order loss changes (nats per token, up to the
per-method scale each docstring gives), the similarity methods are similarities, and a mixture is
in per-query standard deviations (z-units, dimensionless).

**Mixtures** z-score each component per query, ``z_qi = (s_qi - mean_q) / std_q`` (0 for a
query whose scores are all equal), and sum them with the given weights, so methods on different
scales mix by a rank-like weight. ``mix`` / ``mix:default`` uses the weights recorded in
``stride_jax/mixture_default.json``, chosen in advance on the digits and pretrain tasks only by
``benchmarks/mixture.py`` (which rewrites that file and its evidence,
``benchmarks/results/mixture.json``).

**Stages** (given a ``workdir``, e.g. the CLI's ``--out``): STRIDE's own stages
(``design/ operators/ responses/ solve/``); K-FAC/EK-FAC factors in ``factors/kfac/``
(covariances, eigendecomposition) and ``factors/ekfac/`` (eigenvalue correction), each pass
resumable from its last atomic save; each method's scores in
``methods/<method>/<queries>/``. Every stage
is stamped with what made it (model, training rows, queries, settings, seed) and refused when
reused with other arguments (unless ``overwrite``).

**Randomness**: method ``m`` draws from ``fold_in(key(seed), KEY_INDEX[m])`` (TRAK and LoGra
projections, EK-FAC's sampled labels), so adding a method never changes another's draws.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from stride_jax.apps.select import zscore
from stride_jax.config import to_dict
from stride_jax.errors import ConfigError, ModelError, NonFiniteError
from stride_jax.methods.config import (ALIASES, GRADIENT_METHODS, KEY_INDEX,  # noqa: F401
                                       METHODS, MIXTURE_FILE, Bm25Config, EkfacConfig,
                                       InfluenceConfig, LograConfig, MethodsConfig, MethodSpec,
                                       TracinConfig, TrakConfig, _canonical, default_mixture,
                                       parse_method)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# What a method runs on
# ---------------------------------------------------------------------------------------------
def subject_from_model(model: Any, train: Any, queries: Any, *,
                       checkpoints: tuple[Any, ...] = (),
                       learning_rates: tuple[float, ...] = ()) -> Any:
    """A :class:`~stride_jax.tasks._base.Task` (without retraining) for a stride-jax
    ``CausalLM`` and tokenized training and query rows: what every method needs."""
    from stride_jax.baselines.gradient import causal_lm_loss, rows_as_examples
    from stride_jax.steering._adapter import params_fingerprint
    from stride_jax.tasks._base import Task
    params, loss = causal_lm_loss(model)
    ckpts, lrs = [params], [1.0]
    if checkpoints:
        ckpts = [causal_lm_loss(c)[0] for c in checkpoints]
        lrs = list(learning_rates) or [1.0] * len(ckpts)
        want = jax.tree.map(np.shape, params)
        for j, c in enumerate(ckpts):
            if jax.tree.map(np.shape, c) != want:
                raise ModelError(f"tracin checkpoint {j} has other parameter shapes than the "
                                 f"attributed model; list checkpoints of this model")

    def docs(rows):
        return [np.asarray(r)[np.asarray(a) > 0] for r, a in zip(rows.input_ids,
                                                                  rows.attention_mask)]

    query_ex = rows_as_examples(queries)
    return Task(name="model", train=train, queries=queries, model=model, params=params,
                example_loss=loss, train_examples=rows_as_examples(train),
                query_examples=query_ex, checkpoints=ckpts, checkpoint_lrs=lrs, retrain=None,
                stamp={"model": params_fingerprint(params)},
                num_layers=model.config.num_layers,
                base_query_losses=_row_losses(params, loss, query_ex),
                train_docs=docs(train), query_docs=docs(queries))


def _row_losses(params: Any, loss: Any, examples: dict) -> np.ndarray:
    fn = jax.jit(jax.vmap(loss, in_axes=(None, 0)))
    n = len(next(iter(examples.values())))
    out = [np.asarray(fn(params, {k: v[s:s + 64] for k, v in examples.items()}))
           for s in range(0, n, 64)]
    return np.concatenate(out).astype(np.float64)


def token_model(subject: Any):
    """The subject's model as an EK-FAC :class:`~stride_jax.baselines.ekfac.TokenModel`."""
    from stride_jax.baselines.ekfac import causal_lm_token_model
    from stride_jax.model.transformer import CausalLM
    if getattr(subject, "token_model", None) is not None:
        return subject.token_model
    if isinstance(subject.model, CausalLM):
        return causal_lm_token_model(subject.model)
    raise ModelError(f"K-FAC/EK-FAC need a model with tapped dense layers; the {subject.name} "
                     f"task provides none (set Task.token_model)")


# ---------------------------------------------------------------------------------------------
# Running one method
# ---------------------------------------------------------------------------------------------
class MethodResult(NamedTuple):
    """One method's scores: dense ``scores_qn [Q, n]`` (float32), or only each query's top
    ``k`` (``top``) when the dense matrix would not fit; wall ``seconds``; ``info``."""

    scores_qn: np.ndarray | None
    seconds: float
    info: dict
    top: Any = None


def _fingerprints(subject: Any) -> dict:
    from stride_jax.attributor import rows_fingerprint
    return {"subject": subject.stamp, "train_rows": rows_fingerprint(subject.train),
            "n": subject.n}


def _stage(workdir: Path | None, rel: str, stage: str, payload: dict, overwrite: bool,
           load, compute, save):
    """Reuse a complete stamped stage, or compute it, save it and stamp it complete."""
    from stride_jax.io.stamps import complete_stage, open_stage
    if workdir is None:
        return compute()
    directory = workdir / rel
    if open_stage(directory, stage, payload, overwrite=overwrite):
        log.info("reusing %s (%s)", directory, stage)
        return load(directory)
    out = compute(directory)
    save(directory, out)
    complete_stage(directory, stage, payload)
    return out


def run_method(method: str, subject: Any, cfg: Any, *, methods: MethodsConfig | None = None,
               seed: int | None = None, workdir: str | Path | None = None,
               overwrite: bool = False, progress: bool = False, dense: bool = True,
               cache: dict | None = None) -> MethodResult:
    """Scores of one method (or mixture) on ``subject`` (a :class:`~stride_jax.tasks._base.Task`
    or :func:`subject_from_model`), timed from the trained model to the scores.

    Args:
      method: a name of :data:`METHODS`, an alias, or a mixture (:func:`parse_method`).
      cfg: the run's :class:`~stride_jax.attributor.AttributeConfig` (STRIDE's settings; also
        ``cfg.methods`` and ``cfg.seed`` unless ``methods`` / ``seed`` are given).
      workdir: stage directory (None: in memory).
      dense: keep the dense ``[Q, n]`` scores; False keeps each query's top ``cfg.topk`` (EK-FAC
        and K-FAC stream query blocks; the other methods reduce their dense block).
      cache: ``{method: MethodResult}`` of components already computed (mixtures reuse them and
        count their time).
    """
    spec = parse_method(method)
    methods = methods if methods is not None else cfg.methods
    seed = cfg.seed if seed is None else seed
    workdir = Path(workdir) if workdir is not None else None
    kw = dict(methods=methods, seed=seed, workdir=workdir, overwrite=overwrite,
              progress=progress)
    if spec.name == "mix":
        if not dense:
            raise ConfigError(f"{spec.text}: a mixture z-scores each component's full row of "
                             f"scores, so it needs dense scores; set scores=dense (or raise "
                             f"scores_memory_limit)")
        return _mixture(spec, subject, cfg, cache=cache or {}, **kw)
    t0 = time.perf_counter()
    res = _single(spec.name, subject, cfg, dense=dense, **kw)
    scores, info, top = res
    seconds = time.perf_counter() - t0
    if scores is not None:
        scores = np.asarray(scores, np.float32)
        if scores.shape != (subject.num_queries, subject.n):
            raise AssertionError(f"{spec.name} returned scores of shape {scores.shape}")
        bad = ~np.isfinite(scores)
        if bad.any():   # NaN must never reach an output file
            q, i = (int(v[0]) for v in np.nonzero(bad))
            raise NonFiniteError(
                f"{spec.name}: {int(bad.sum())} scores are NaN/inf (first: query {q}, training "
                f"example {i}); check the model and the data for NaN/inf, or raise the damping")
    return MethodResult(scores, seconds, info, top)


def mix_scores(parts: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """``sum_m weights[m] * zscore(parts[m])``, float32 ``[Q, n]``."""
    out = sum(w * zscore(parts[m]) for m, w in weights.items() if w != 0)
    return np.asarray(out, np.float32)


def _mixture(spec: MethodSpec, subject: Any, cfg: Any, *, cache: dict, **kw) -> MethodResult:
    parts, seconds, info = {}, 0.0, {"method": spec.text, "components": {}}
    for m, w in spec.components:
        if m not in cache:
            cache[m] = run_method(m, subject, cfg, **kw)
        res = cache[m]
        parts[m] = res.scores_qn
        seconds += res.seconds
        info["components"][m] = {"weight": w, "seconds": res.seconds}
    return MethodResult(mix_scores(parts, dict(spec.components)), seconds, info)


def _single(name: str, subject: Any, cfg: Any, *, methods: MethodsConfig, seed: int,
            workdir: Path | None, overwrite: bool, progress: bool, dense: bool):
    """``(scores or None, info, top or None)`` of one method, through its stamped stages."""
    from stride_jax.attributor import Attributor, TopScores, rows_fingerprint
    from stride_jax.io.atomic import save_npy
    if name == "stride":
        lm = task_lm(subject, cfg.steering.layer)
        att = Attributor(lm, subject.train, cfg, workdir=workdir, overwrite=overwrite,
                         progress=progress)
        result = att.attribute(subject.queries)
        scores = result.scores_qn
        info = {"operators": cfg.operators, "layer": lm.layer}
        if cfg.operators == "trained":
            info["num_subsets"] = att.num_subsets
        if scores is not None:
            info["nonzeros_per_query"] = float((scores != 0).sum(1).mean())
        return scores, info, result.top_scores
    key = jax.random.fold_in(jax.random.key(seed), KEY_INDEX[name])
    if name in ("ekfac", "kfac"):
        return _ekfac(name, subject, methods.ekfac, key=key, seed=seed, workdir=workdir,
                      overwrite=overwrite, progress=progress, dense=dense, topk=cfg.topk)
    settings = {"trak": to_dict(methods.trak), "logra": to_dict(methods.logra),
                "influence": to_dict(methods.influence), "tracin": to_dict(methods.tracin),
                "bm25": to_dict(methods.bm25), "repsim": methods.repsim_layer,
                "graddot": None}[name]
    payload = {**_fingerprints(subject), "queries": rows_fingerprint(subject.queries),
               "method": name, "settings": settings, "chunk": methods.chunk, "seed": seed}
    scores = _stage(
        workdir, f"methods/{name}/{payload['queries']}", name, payload, overwrite,
        load=lambda d: np.load(d / "scores.npy", allow_pickle=False),
        compute=lambda d=None: _baseline(name, subject, methods, key),
        save=lambda d, s: save_npy(d / "scores.npy", np.asarray(s, np.float32)))
    if dense:
        return scores, {}, None
    return None, {}, TopScores.from_dense(np.asarray(scores, np.float32), cfg.topk)


def task_lm(subject: Any, layer: int | None):
    """The subject's model as :class:`~stride_jax.steering.LMFunctions` reading ``layer``
    (None: ~2/3 depth)."""
    from stride_jax.steering import SteeringConfig, from_causal_lm, resolve_layer
    layer = resolve_layer(SteeringConfig(layer=layer), subject.num_layers)
    if callable(subject.model) and not hasattr(subject.model, "config"):
        return subject.model(layer)
    return from_causal_lm(subject.model, layer)


def _baseline(name: str, task: Any, m: MethodsConfig, key: jax.Array) -> np.ndarray:
    from stride_jax.baselines import gradient as G
    from stride_jax.parallel.memory import parse_bytes
    common = dict(train=task.train_examples, queries=task.query_examples)
    if name == "influence":
        return G.influence(task.example_loss, task.params, damping=m.influence.damping,
                           damping_fraction=m.influence.damping_fraction, chunk=m.chunk,
                           memory_budget=parse_bytes(m.influence.memory_budget), **common)
    if name == "trak":
        return G.trak(task.example_loss, task.params, proj_dim=m.trak.proj_dim,
                      damping=m.trak.damping, damping_fraction=m.trak.damping_fraction, key=key,
                      chunk=m.chunk, projection=m.trak.projection, **common)
    if name == "logra":
        return G.logra(task.example_loss, task.params, rank=m.logra.rank,
                       damping=m.logra.damping, damping_fraction=m.logra.damping_fraction,
                       key=key, chunk=m.chunk, **common)
    if name == "tracin":
        if len(task.checkpoints) == 1:
            log.warning("tracin: no training checkpoints (methods.tracin.checkpoints), so TracIn "
                        "over the one model is the gradient dot product (graddot) times its "
                        "learning rate %g", task.checkpoint_lrs[0])
        return G.tracin(task.example_loss, task.checkpoints, weights=task.checkpoint_lrs,
                        chunk=m.chunk, **common)
    if name == "graddot":
        return G.graddot(task.example_loss, task.params, chunk=m.chunk, **common)
    if name == "repsim":
        from stride_jax.baselines.similarity import cosine_scores, pooled_features
        lm = task_lm(task, None)

        def feats(rows):
            return pooled_features(lm.features, lm.params, rows.input_ids, rows.attention_mask,
                                   rows.attention_mask, which=m.repsim_layer)

        return cosine_scores(feats(task.queries), feats(task.train))
    if name == "bm25":
        if task.train_docs is None:
            raise ConfigError(f"bm25 needs token sequences; the {task.name} task has none")
        from stride_jax.baselines.text import bm25_scores
        return bm25_scores(task.train_docs, task.query_docs, k1=m.bm25.k1, b=m.bm25.b)
    raise ConfigError(f"unknown method {name!r}")


# ---------------------------------------------------------------------------------------------
# K-FAC / EK-FAC stages
# ---------------------------------------------------------------------------------------------
def _query_chunk(e: EkfacConfig, num_queries: int, covered: int) -> int:
    from stride_jax.parallel.memory import parse_bytes
    if e.query_chunk is not None:
        return min(e.query_chunk, num_queries)
    return max(1, min(num_queries, parse_bytes(e.query_memory) // max(1, 4 * covered)))


def _ekfac(name: str, subject: Any, e: EkfacConfig, *, key: jax.Array, seed: int,
           workdir: Path | None, overwrite: bool, progress: bool, dense: bool, topk: int):
    from stride_jax.attributor import TopScores, rows_fingerprint
    from stride_jax.baselines import ekfac as E
    from stride_jax.io.atomic import save_npy
    tm = token_model(subject)
    base = {**_fingerprints(subject), "layers": e.layers, "fisher": e.fisher,
            "batch_size": e.batch_size, "seed": seed}
    fit = dict(layers=e.layers, fisher=e.fisher, batch_size=e.batch_size, key=key,
               checkpoint_every=e.checkpoint_every, progress=progress)
    t0 = time.perf_counter()
    factors = _stage(
        workdir, "factors/kfac", "kfac factors", base, overwrite,
        load=lambda d: E.Factors.load(d / "eigen.safetensors"),
        compute=lambda d=None: E.fit_factors(tm, subject.train_examples, strategy="kfac",
                                             directory=d, **fit),
        save=lambda d, f: None)       # fit_factors wrote eigen.safetensors
    if name == "ekfac":
        factors = _stage(
            workdir, "factors/ekfac", "ekfac factors", {"kfac": base}, overwrite,
            load=lambda d: E.Factors.load(d / "factors.safetensors"),
            compute=lambda d=None: E.fit_factors(tm, subject.train_examples, strategy="ekfac",
                                                 directory=d, covariance=factors, **fit),
            save=lambda d, f: None)   # fit_factors wrote factors.safetensors
    fit_s = time.perf_counter() - t0
    covered = int(sum(factors.q_a[n].shape[0] * factors.q_s[n].shape[0] for n in factors.layers))
    qc = _query_chunk(e, subject.num_queries, covered)
    payload = {"factors": base, "strategy": name, "queries": rows_fingerprint(subject.queries),
               "damping": e.damping, "damping_fraction": e.damping_fraction,
               "scores": "dense" if dense else f"top{topk}"}

    def compute(d=None):
        blocks = E.scores(tm, factors, subject.train_examples, subject.query_examples,
                          strategy=name, damping=e.damping, damping_fraction=e.damping_fraction,
                          batch_size=e.batch_size, query_chunk=qc, progress=progress)
        if dense:
            return np.concatenate([b for _, b in blocks])
        return TopScores.concat([TopScores.from_dense(b, topk) for _, b in blocks])

    def save(d, out):
        if dense:
            save_npy(d / "scores.npy", out)
        else:
            out.save(d / "scores_topk.npz")

    def load(d):
        if dense:
            return np.load(d / "scores.npy", allow_pickle=False)
        return TopScores.load(d / "scores_topk.npz")

    out = _stage(workdir, f"methods/{name}/{payload['queries']}", f"{name} scores", payload,
                 overwrite,
                 load=load, compute=compute, save=save)
    info = {"layers": len(factors.layers), "covered_params": covered, "fit_seconds": fit_s,
            "query_chunk": qc}
    return (out, info, None) if dense else (None, info, out)


# ---------------------------------------------------------------------------------------------
# The attribute command
# ---------------------------------------------------------------------------------------------
def attribute(model: Any, train: Any, queries: Any, cfg: Any, *, workdir: str | Path | None = None,
              overwrite: bool = False, progress: bool = False):
    """``cfg.method`` on a stride-jax ``CausalLM`` and tokenized rows, as an
    :class:`~stride_jax.attributor.Attribution` (dense scores, or each query's top ``cfg.topk``
    when ``cfg.scores`` says so; mixtures need dense scores). With a ``workdir`` every stage is
    stamped there and reused by a rerun, and the config is written to ``attribute.yaml``."""
    from stride_jax.attributor import Attribution
    from stride_jax.config import dump_config
    from stride_jax.parallel.memory import scores_dense
    spec = parse_method(cfg.method)
    # Recorded resolved (a default mixture's weights too), so attribute.yaml says what ran.
    cfg = dataclasses.replace(cfg, method=spec.text)
    ckpts, lrs = (), ()
    if "tracin" in spec.methods and cfg.methods.tracin.checkpoints:
        ckpts, lrs = _tracin_checkpoints(cfg.methods.tracin)
    subject = subject_from_model(model, train, queries, checkpoints=ckpts, learning_rates=lrs)
    dense = scores_dense(cfg, num_queries=len(queries), n=len(train))
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        dump_config(cfg, Path(workdir) / "attribute.yaml")
    res = run_method(cfg.method, subject, cfg, workdir=workdir, overwrite=overwrite,
                     progress=progress, dense=dense)
    log.info("%s: %.1f s", spec.text, res.seconds)
    # estimator_q: what produced each query's scores (the report and select show it).
    return Attribution(res.scores_qn, list(queries.ids), list(train.ids), None,
                       subject.base_query_losses, None, None, res.top,
                       np.array([spec.text] * len(queries)))


def _tracin_checkpoints(t: TracinConfig) -> tuple[tuple[Any, ...], tuple[float, ...]]:
    from stride_jax.model.hf import from_hf
    lrs = tuple(t.learning_rates) or (1.0,) * len(t.checkpoints)   # lengths: TracinConfig
    return tuple(from_hf(p) for p in t.checkpoints), lrs


# ---------------------------------------------------------------------------------------------
# Memory (--memory-budget)
# ---------------------------------------------------------------------------------------------
# Calibration of the forward/backward activations per token: a few copies of each block's
# widths (attention, MLP) plus the logits; the gradient methods add a [chunk, P] gradient.
_ACT_COPIES = 6


def plan_memory(cfg: Any, model: Any, *, n: int, num_queries: int, seq_len: int,
                budget: int | str | None = None):
    """Estimated peak memory of each non-STRIDE component of ``cfg.method`` (host and device are
    one memory on a CPU; on an accelerator read them as per device), as a
    :class:`~stride_jax.parallel.memory.MemoryPlan`. With a ``budget`` the result-neutral chunk
    sizes (``methods.ekfac.query_chunk``, then ``methods.ekfac.batch_size``, and
    ``methods.chunk``) are halved until every stage fits, or a
    :class:`~stride_jax.parallel.memory.MemoryBudgetError` names the stage and what to change.
    STRIDE's own stages are planned by :func:`stride_jax.parallel.memory.plan_memory`."""
    from stride_jax.parallel.memory import (MemoryBudgetError, MemoryPlan, StageMemory,
                                            format_bytes, parse_bytes, scores_dense)
    spec = parse_method(cfg.method)
    c = model.config
    p_all = int(c.num_params())
    d, f, L, V, T = c.hidden_size, c.intermediate_size, c.num_layers, c.vocab_size, seq_len
    width = L * (4 * d + 3 * f) + V
    if budget is not None and str(budget).lower() == "auto":
        # The memory available now: on a GPU/TPU the device's own limit, on a CPU the host's.
        from stride_jax.parallel.memory import available_memory
        host, device, _ = available_memory()
        budget = device if device is not None else host
    elif budget is not None and str(budget).lower() == "none":
        budget = None
    b_limit = parse_bytes(budget) if budget is not None else None
    dense = scores_dense(cfg, num_queries=num_queries, n=n)
    scores_b = 4 * num_queries * n if dense else 4 * num_queries * 2 * cfg.topk * 3
    covered = _covered_params(model, cfg.methods.ekfac.layers)

    def stages(cfg):
        m, e = cfg.methods, cfg.methods.ekfac
        out = []
        for name in spec.methods:
            if name == "stride":
                continue
            act = 4 * _ACT_COPIES * T * width
            if name in ("ekfac", "kfac"):
                qc = _query_chunk(e, num_queries, covered["params"])
                b = min(e.batch_size, n)
                need = (12 * covered["factors"] + e.batch_size * act + 8 * b * covered["params"]
                        + 4 * qc * covered["params"] + scores_b)
                detail = (f"{covered['layers']} layers, {covered['params']:,} covered params, "
                          f"ekfac.batch_size={b}, ekfac.query_chunk={qc}")
            elif name == "influence":
                need = 4 * (n + num_queries) * p_all + m.chunk * (act + 8 * p_all) + scores_b
                detail = f"(n + Q) x P = {n + num_queries} x {p_all:,} gradients"
            elif name in ("graddot", "tracin", "trak", "logra"):
                k = m.trak.proj_dim if name == "trak" else 0
                proj = min(4 * p_all * k, 512 * 2 ** 20) if name == "trak" else 0
                keep = (4 * num_queries * p_all if name in ("graddot", "tracin")
                        else 8 * (n + num_queries) * max(k, 1))
                need = m.chunk * (act + 8 * p_all) + proj + keep + scores_b
                detail = f"chunk={m.chunk}, P={p_all:,}"
            else:
                need = 4 * (n + num_queries) * T * d + scores_b
                detail = "pooled features / term counts"
            out.append(StageMemory(name, int(need), int(need), detail))
        return out

    plan_stages = stages(cfg)
    changes: list[str] = []
    original = cfg
    if b_limit is not None:
        for _ in range(64):
            over = [s for s in plan_stages if s.host > b_limit]
            if not over:
                break
            e, m = cfg.methods.ekfac, cfg.methods
            qc = _query_chunk(e, num_queries, covered["params"])
            if any(s.stage in ("ekfac", "kfac") for s in over) and qc > 1:
                cfg = _set(cfg, ekfac=dataclasses.replace(e, query_chunk=max(1, qc // 2)))
            elif any(s.stage in ("ekfac", "kfac") for s in over) and e.batch_size > 1:
                cfg = _set(cfg, ekfac=dataclasses.replace(e, batch_size=max(1, e.batch_size // 2)))
            elif m.chunk > 1 and any(s.stage not in ("ekfac", "kfac") for s in over):
                cfg = _set(cfg, chunk=max(1, m.chunk // 2))
            else:
                break
            plan_stages = stages(cfg)
        for key, was, now in (
                ("methods.ekfac.query_chunk", original.methods.ekfac.query_chunk,
                 cfg.methods.ekfac.query_chunk),
                ("methods.ekfac.batch_size", original.methods.ekfac.batch_size,
                 cfg.methods.ekfac.batch_size),
                ("methods.chunk", original.methods.chunk, cfg.methods.chunk)):
            if was != now:
                changes.append(f"{key}: {was} -> {now}")
    plan = MemoryPlan(tuple(plan_stages), cfg, b_limit, tuple(changes))
    bad = [s for s in plan_stages if b_limit is not None and s.host > b_limit]
    if bad:
        s = bad[0]
        fix = {"ekfac": "cover fewer layers (methods.ekfac.layers=mlp or a regular expression)",
               "kfac": "cover fewer layers (methods.ekfac.layers=mlp or a regular expression)",
               "influence": "use trak, logra or ekfac (no full gradients kept)",
               }.get(s.stage, "set scores=topk, or use fewer queries per run")
        raise MemoryBudgetError(
            f"the {s.stage} stage needs about {format_bytes(s.host)} ({s.detail}) but the budget "
            f"is {format_bytes(b_limit)}, even with the smallest result-neutral chunks; {fix}")
    return plan


def _set(cfg: Any, **methods_fields) -> Any:
    return dataclasses.replace(cfg, methods=dataclasses.replace(cfg.methods, **methods_fields))


def _covered_params(model: Any, layers: str) -> dict:
    """Covered layers, their parameters ``sum O I'`` and factor floats ``sum I'^2 + O^2 + O I'``
    of a ``CausalLM`` (one abstract trace, no computation)."""
    from stride_jax.baselines import ekfac as E
    tm = E.causal_lm_token_model(model)
    one = {"input_ids": np.zeros((1, 2), np.int32), "attention_mask": np.ones((1, 2), np.int32),
           "loss_mask": np.zeros((1, 2), np.int32)}
    shapes, _ = E.layer_names(tm, tm.prepare(one), 1)
    names = E.select_layers(list(shapes), layers)
    dims = [(shapes[k].d_in + shapes[k].bias, shapes[k].d_out) for k in names]
    return {"layers": len(names), "params": int(sum(i * o for i, o in dims)),
            "factors": int(sum(i * i + o * o + i * o for i, o in dims))}
