"""The ``Attributor``: STRIDE as named stages, each a stored, argument-stamped artifact.

::

    att = Attributor(model, train_rows, AttributeConfig(), workdir="runs/x")
    att.fit_operators()             # design + activation cache + operator training
    responses = att.measure(query_rows)
    result = att.solve(responses)   # scores [Q, n]: positive = the example lowers the query's loss
    result.write("runs/x", train_texts=..., query_texts=...)

Stages and their directories under ``workdir``:

==============  ===========================  ==============================================
stage           directory                    stamp covers
==============  ===========================  ==============================================
design          ``design/``                  n, design config, seed
operators       ``operators/``               model + training data fingerprints, design,
                                             steering and train config, seed
measure         ``responses/<queries>/``     operators stamp + queries + measure config
solve           ``solve/<responses>/``       responses + design stamp + solve config
==============  ===========================  ==============================================

A stage whose stamp matches is loaded instead of recomputed (operator training resumes from its
last orbax checkpoint); a stamp that does not match is refused with the changed keys named,
unless ``overwrite=True``. Without a ``workdir`` everything stays in memory.

Keys: one seed, ``root = key(seed)``; the design uses ``fold_in(root, 0)``, training
``fold_in(root, 1)``, lambda selection ``fold_in(root, 2)``, self-influence ``fold_in(root, 3)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Any, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax.config import dump_config, option, to_dict
from stride_jax.data import TokenizedSet
from stride_jax.io.atomic import atomic_write_text, save_npy
from stride_jax.io.stamps import array_fingerprint, complete_stage, open_stage
from stride_jax.measure import MeasureConfig, Responses, measure_responses
from stride_jax.methods import MethodsConfig
from stride_jax.model.transformer import CausalLM
from stride_jax.parallel import (ParallelConfig, initialize, is_writer, make_mesh,
                                 make_query_mesh, process_dir, process_slice, query_sharding,
                                 to_host)
from stride_jax.solve import SolveConfig, solve
from stride_jax.steering import LMFunctions, SteeringConfig, from_causal_lm, resolve_layer
from stride_jax.subsets import Design, bernoulli_design, default_num_subsets, expander_design
from stride_jax.train import OperatorTrainConfig, build_cache, train_operators

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DesignConfig:
    """The random subsets the operators are trained on."""

    kind: Literal["expander", "bernoulli"] = option(
        "expander", "expander: each example in exactly `per_example` of K subsets (paper); "
                    "bernoulli: each subset holds each example with probability `alpha`")
    num_subsets: int | None = option(None, "K; null: min(1000, n * per_example // 32), which keeps "
                                           "subsets at >= ~32 examples")
    per_example: int = option(40, "d: subsets per example (expander; paper: 10; 40 measured "
                                  "better, see configs/attribute_default.yaml)")
    alpha: float = option(0.3, "membership probability (bernoulli)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How text files become rows (CLI only; the Python API takes tokenized rows)."""

    seq_len: int | None = option(None, "tokens per row; null: the model's context, at most 256")
    train_mode: Literal["auto", "chunk", "document"] = option(
        "auto", "chunk: cut documents into seq_len pieces; document: one row per document "
                "(error if longer); auto: document for .jsonl, chunk otherwise")
    stream: Literal["auto", "on", "off"] = option(
        "auto", "on: read and tokenize the training data in chunks of documents into "
                "memory-mapped files under <out>/tokens/train (reused while the data, tokenizer, "
                "seq_len and mode are unchanged), for training sets larger than memory; off: in "
                "memory; auto: on when the training file or directory exceeds stream_threshold")
    stream_threshold: str = option("1GiB", "training data size above which stream=auto streams")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Where the frozen model's activations on the training set live during operator training."""

    location: Literal["auto", "memory", "disk"] = option(
        "auto", "memory: the whole cache on the device; disk: memory-mapped files under the run "
                "directory, each training step's rows streamed to the device (device memory "
                "flat in n); auto: disk when the cache exceeds memory_limit and there is a run "
                "directory")
    dtype: Literal["float32", "bfloat16"] = option(
        "float32", "bfloat16 halves the cache (changes results slightly; stamped)")
    memory_limit: str = option("4GiB", "largest cache kept in memory with location=auto")


@dataclasses.dataclass(frozen=True)
class AttributeConfig:
    """A whole STRIDE run."""

    design: DesignConfig = option(DesignConfig(), "subset design")
    steering: SteeringConfig = option(SteeringConfig(), "operator family")
    train: OperatorTrainConfig = option(OperatorTrainConfig(), "operator training")
    measure: MeasureConfig = option(MeasureConfig(), "measurement batching")
    solve: SolveConfig = option(SolveConfig(), "sparse recovery")
    data: DataConfig = option(DataConfig(), "tokenization of text inputs (CLI)")
    parallel: ParallelConfig = option(ParallelConfig(), "devices sharing the subset axis")
    cache: CacheConfig = option(CacheConfig(), "the activation cache of operator training")
    seed: int = option(0, "the one seed of the run")
    topk: int = option(10, "proponents and opponents listed per query in topk.jsonl")
    scores: Literal["auto", "dense", "topk"] = option(
        "auto", "dense: keep the whole [Q, n] score matrix (scores.npy); topk: keep only each "
                "query's `topk` largest and most negative scores (scores_topk.npz), solving the "
                "queries in blocks of solve.query_chunk, for when Q x n does not fit in memory; "
                "auto: topk when Q x n float32 exceeds scores_memory_limit")
    scores_memory_limit: str = option("2GiB", "largest dense score matrix kept with scores=auto")
    token_queries: int = option(16, "queries (the first ones) whose per-token attribution of "
                                    "their listed examples is written to tokens.json (CLI; 0: "
                                    "none)")
    method: str = option("stride", "attribution method (CLI: --method): stride, ekfac, kfac, "
                                   "trak, logra, tracin, graddot, if, bm25, repsim, or a mixture "
                                   "mix:stride=0.25,ekfac=0.75 (mix: the default mixture); see "
                                   "stride_jax.methods")
    methods: MethodsConfig = option(MethodsConfig(), "settings of the methods other than STRIDE")


def rows_fingerprint(rows: TokenizedSet) -> str:
    arrays = [rows.input_ids, rows.attention_mask, rows.loss_mask]
    if rows.targets is not None:
        arrays.append(rows.targets)
    return array_fingerprint(*arrays, extra=list(rows.ids))


class Operators(NamedTuple):
    """Trained operators: the shared basis (a dict of arrays) and coefficients ``[K, r, C]``."""

    basis: dict
    coef: jax.Array

    def save(self, path: str | Path) -> None:
        from stride_jax.io.atomic import atomic_path
        arrays = {f"basis.{k}": np.asarray(v) for k, v in self.basis.items()}
        arrays["coef"] = np.asarray(self.coef)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "Operators":
        with np.load(path, allow_pickle=False) as z:
            basis = {k[len("basis."):]: jnp.asarray(z[k]) for k in z.files if k.startswith("basis.")}
            return cls(basis, jnp.asarray(z["coef"]))


class TopScores(NamedTuple):
    """Sparse scores: per query, the ``k`` largest positive scores (proponents) and the ``k``
    most negative (opponents), best first; index -1 (score 0) pads a query with fewer."""

    pro_index: np.ndarray        # [Q, k] int64
    pro_score: np.ndarray        # [Q, k] float32
    opp_index: np.ndarray        # [Q, k] int64
    opp_score: np.ndarray        # [Q, k] float32

    @classmethod
    def from_dense(cls, w_qn: np.ndarray, k: int) -> "TopScores":
        """Keep the top ``k`` of each row of ``w_qn`` (order: score, then index, as
        :meth:`Attribution.top` on the dense matrix)."""
        w = np.asarray(w_qn, np.float32)
        Q, n = w.shape
        k_eff = min(k, n)
        out = []
        for sign in (1.0, -1.0):
            v = sign * w
            cand = (np.argpartition(-v, k_eff - 1, axis=1)[:, :k_eff] if k_eff < n
                    else np.broadcast_to(np.arange(n), (Q, n)))
            idx = np.full((Q, k), -1, np.int64)
            val = np.zeros((Q, k), np.float32)
            for q in range(Q):
                c = cand[q]
                c = c[np.lexsort((c, -v[q, c]))]
                c = c[v[q, c] > 0]
                idx[q, :c.size], val[q, :c.size] = c, w[q, c]
            out += [idx, val]
        return cls(*out)

    @classmethod
    def concat(cls, parts: Sequence["TopScores"]) -> "TopScores":
        return cls(*(np.concatenate(a) for a in zip(*parts)))

    def save(self, path: str | Path) -> None:
        from stride_jax.io.atomic import atomic_path
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **self._asdict())

    @classmethod
    def load(cls, path: str | Path) -> "TopScores":
        with np.load(path, allow_pickle=False) as z:
            return cls(**{f: z[f] for f in cls._fields})


class Attribution(NamedTuple):
    """Scores and what produced them: the dense matrix ``scores_qn``, or with
    ``scores=topk`` only each query's top scores (``top_scores``; ``scores_qn`` is None).
    The STRIDE-specific fields (responses, penalty, intercept) are None for other methods."""

    scores_qn: np.ndarray | None  # [Q, n] float32; positive = the example lowers the query's loss
    query_ids: list[str]
    train_ids: list[str]
    y_qk: np.ndarray | None      # [Q, K] responses (STRIDE)
    base_loss_q: np.ndarray      # [Q]
    lam_q: np.ndarray | None     # [Q] Lasso penalty used per query (STRIDE)
    intercept_q: np.ndarray | None  # [Q] (STRIDE)
    top_scores: TopScores | None = None

    def top(self, q: int, k: int = 10) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        """Top ``k`` proponents (largest positive scores) and opponents (most negative) of query q."""
        if self.scores_qn is None:
            t = self.top_scores
            if k > t.pro_index.shape[1]:
                raise ValueError(f"only the top {t.pro_index.shape[1]} scores per query were kept "
                                 f"(scores=topk); ask for at most that many, or rerun with a "
                                 f"larger topk or scores=dense")
            return ([(int(i), float(s)) for i, s in zip(t.pro_index[q, :k], t.pro_score[q, :k])
                     if i >= 0],
                    [(int(i), float(s)) for i, s in zip(t.opp_index[q, :k], t.opp_score[q, :k])
                     if i >= 0])
        s = self.scores_qn[q]
        order = np.argsort(-s, kind="stable")
        pro = [(int(i), float(s[i])) for i in order[:k] if s[i] > 0]
        opp = [(int(i), float(s[i])) for i in order[::-1][:k] if s[i] < 0]
        return pro, opp

    def write(self, out_dir: str | Path, *, train_texts: Sequence[str] | None = None,
              query_texts: Sequence[str] | None = None, k: int = 10) -> Path:
        """``scores.npy`` (or ``scores_topk.npz`` when only the top scores were kept),
        ``topk.jsonl`` (ids, scores, texts) and ``ids.json`` in ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.scores_qn is not None:
            save_npy(out / "scores.npy", self.scores_qn.astype(np.float32))
        else:
            self.top_scores.save(out / "scores_topk.npz")
        atomic_write_text(out / "ids.json", json.dumps({"queries": self.query_ids,
                                                        "train": self.train_ids}) + "\n")
        lines = []
        for q, qid in enumerate(self.query_ids):
            pro, opp = self.top(q, k)

            def entry(i, s):
                e = {"id": self.train_ids[i], "index": i, "score": s}
                if train_texts is not None:
                    e["text"] = train_texts[i]
                return e

            rec: dict[str, Any] = {"query_id": qid, "base_loss": float(self.base_loss_q[q])}
            if self.lam_q is not None:
                rec["lambda"] = float(self.lam_q[q])
            rec.update(proponents=[entry(i, s) for i, s in pro],
                       opponents=[entry(i, s) for i, s in opp])
            if query_texts is not None:
                rec["query_text"] = query_texts[q]
            lines.append(json.dumps(rec, ensure_ascii=False))
        atomic_write_text(out / "topk.jsonl", "\n".join(lines) + "\n")
        return out


class Attributor:
    """STRIDE attribution of one frozen model on one training set.

    Args:
      model: a stride-jax :class:`CausalLM`, or any JAX model as :class:`LMFunctions`.
      train: tokenized training rows (one row = one attributed example).
      config: the run configuration.
      workdir: where stage artifacts go (None: in memory only).
      overwrite: replace stage artifacts made with other arguments instead of refusing.
    """

    def __init__(self, model: CausalLM | LMFunctions, train: TokenizedSet,
                 config: AttributeConfig = AttributeConfig(), *, workdir: str | Path | None = None,
                 overwrite: bool = False, progress: bool = True):
        if len(train) < 1:
            raise ValueError("the training set is empty: nothing to attribute to")
        # Settings are checked before any stage runs, so a typo costs no cached work.
        from stride_jax.steering._operators import validate as validate_steering
        from stride_jax.train import validate as validate_train
        validate_steering(config.steering)
        validate_train(config.train)
        if isinstance(model, CausalLM):
            layer = resolve_layer(config.steering, model.config.num_layers)
            self.lm = from_causal_lm(model, layer)
        elif isinstance(model, LMFunctions):
            if config.steering.layer is not None and config.steering.layer != model.layer:
                raise ValueError(f"steering.layer={config.steering.layer} but the LMFunctions read "
                                 f"layer {model.layer}")
            self.lm = model
        else:
            raise TypeError(f"model must be a CausalLM or LMFunctions, got {type(model).__name__}")
        self.train = train
        self.config = config
        self.workdir = Path(workdir) if workdir is not None else None
        self.overwrite = overwrite
        # Joins the multi-host runtime if asked (it must come before JAX does any work; the CLI
        # calls it first thing, library users call stride_jax.parallel.initialize themselves).
        initialize(config.parallel)
        self.progress = progress and is_writer()
        self.root = jax.random.key(config.seed)
        # Not part of any stamp: the device count changes float rounding only, so a run may be
        # resumed or reused on another number of devices.
        self.mesh = make_mesh(config.parallel)
        self.query_mesh = make_query_mesh(config.parallel)
        if self.mesh is not None and (config.parallel.model == "fsdp" or (
                config.parallel.model == "auto" and not self.mesh.weights_fit(self.lm.params))):
            self.lm = dataclasses.replace(self.lm, params=self.mesh.shard_weights(
                self.lm.params, config.parallel.fsdp_min_size))
        if config.scores not in ("auto", "dense", "topk"):
            raise ValueError(f"scores must be 'auto', 'dense' or 'topk', got {config.scores!r}")
        if config.topk < 1:
            raise ValueError(f"topk must be >= 1, got {config.topk}")
        from stride_jax.parallel.memory import parse_bytes
        parse_bytes(config.cache.memory_limit)
        parse_bytes(config.scores_memory_limit)
        self._design: Design | None = None
        self._ops: Operators | None = None
        self.history: list[dict] = []
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            dump_config(config, self.workdir / "attribute.yaml")

    # -- stamps --------------------------------------------------------------------------------
    def _stamp(self, stage: str) -> dict:
        c = self.config
        base = {"n": len(self.train), "design": to_dict(c.design), "seed": c.seed}
        if stage == "design":
            return base
        base.update(model=self.lm.fingerprint, layer=self.lm.layer,
                    train_rows=self._train_fingerprint, steering=to_dict(c.steering),
                    train=to_dict(c.train), cache_dtype=c.cache.dtype)
        return base

    @functools.cached_property
    def _train_fingerprint(self) -> str:
        # Hashing every training row is O(n T); every stage's stamp needs it.
        return rows_fingerprint(self.train)

    def _stage_dir(self, name: str) -> Path | None:
        return None if self.workdir is None else self.workdir / name

    def _cache_on_disk(self) -> bool:
        from stride_jax.parallel.memory import cache_on_disk
        return cache_on_disk(self.config.cache, rows=len(self.train), seq_len=self.train.seq_len,
                             width=self.lm.d_reader + self.lm.d_final,
                             has_workdir=self.workdir is not None)

    # -- stages --------------------------------------------------------------------------------
    @property
    def num_subsets(self) -> int:
        d = self.config.design
        n = len(self.train)
        return d.num_subsets if d.num_subsets is not None else default_num_subsets(n, d.per_example)

    def design(self) -> Design:
        """The membership design (stage ``design``)."""
        if self._design is not None:
            return self._design
        d, n = self.config.design, len(self.train)
        key = jax.random.fold_in(self.root, 0)
        directory = self._stage_dir("design")
        payload = self._stamp("design")
        if directory is not None and open_stage(directory, "design", payload,
                                                overwrite=self.overwrite):
            self._design = Design.load(directory / "design.npz")
            return self._design
        try:
            if d.kind == "expander":
                design = expander_design(n, self.num_subsets, d.per_example, key=key)
            else:
                design = bernoulli_design(n, self.num_subsets, d.alpha, key=key)
        except ValueError as e:
            raise ValueError(f"design (kind={d.kind}, num_subsets={self.num_subsets}, "
                             f"per_example={d.per_example}, alpha={d.alpha}, n={n}): {e}") from e
        if directory is not None:
            design.save(directory / "design.npz")
            complete_stage(directory, "design", payload)
        self._design = design
        return design

    def fit_operators(self) -> Operators:
        """Cache activations and train all operators (stage ``operators``; resumable)."""
        if self._ops is not None:
            return self._ops
        design = self.design()
        directory = self._stage_dir("operators")
        payload = self._stamp("operators")
        if directory is not None and open_stage(directory, "operators", payload,
                                                overwrite=self.overwrite):
            self._ops = Operators.load(directory / "operators.npz")
            return self._ops
        on_disk = self._cache_on_disk()
        # Every process caches the rows itself (per-host data loading), in its own directory.
        cache_dir = process_dir(directory / "cache") if on_disk else None
        cache = build_cache(self.lm, self.train, progress=self.progress, dtype=self.config.cache.dtype,
                            directory=cache_dir)
        out = train_operators(
            self.lm, cache, self.train, design, self.config.steering, self.config.train,
            key=jax.random.fold_in(self.root, 1),
            checkpoint_dir=None if directory is None else directory / "checkpoints",
            fingerprint=array_fingerprint(extra=payload), progress=self.progress, mesh=self.mesh,
            stream=on_disk)
        self._ops, self.history = Operators(out.state.basis, out.state.coef), out.history
        if jax.process_count() > 1:
            # Operators sharded over other hosts' devices come home once: measurement slices
            # them by subset chunk and places each chunk on the mesh again.
            self._ops = Operators({k: to_host(v) for k, v in self._ops.basis.items()},
                                  to_host(self._ops.coef))
        if directory is not None:
            self._ops.save(directory / "operators.npz")
            atomic_write_text(directory / "history.json", json.dumps(out.history, indent=1))
            complete_stage(directory, "operators", payload)
            if on_disk:   # only training reads the cache; it can be as large as the data
                import shutil
                shutil.rmtree(cache_dir, ignore_errors=True)
                if cache_dir != directory / "cache":   # the last process out removes the parent
                    with contextlib.suppress(OSError):
                        (directory / "cache").rmdir()
        return self._ops

    def measure(self, queries: TokenizedSet) -> Responses:
        """Responses ``y[q, k]`` of the queries to every operator (stage ``responses``)."""
        ops = self.fit_operators()
        qfp = rows_fingerprint(queries)
        # One directory per query set, so new queries reuse the operators without a clash.
        directory = None if self.workdir is None else self.workdir / "responses" / qfp
        payload = {"operators": self._stamp("operators"), "queries": qfp,
                   "measure": to_dict(self.config.measure)}
        if directory is not None and open_stage(directory, "responses", payload,
                                                overwrite=self.overwrite):
            return Responses(np.load(directory / "y.npy", allow_pickle=False),
                             np.load(directory / "base_loss.npy", allow_pickle=False))
        res = measure_responses(self.lm, self.config.steering.site, ops.basis, ops.coef,
                                queries, self.config.measure, progress=self.progress,
                                mesh=self.mesh)
        bad = ~np.isfinite(res.y_qk)
        if bad.any():
            q, k = (int(v[0]) for v in np.nonzero(bad))
            where = "" if directory is None else f" in {self.workdir / 'operators'}"
            raise FloatingPointError(
                f"{int(bad.sum())} responses are NaN/inf (first: query {queries.ids[q]!r}, "
                f"subset {k}): the trained operators{where} diverged; lower train.learning_rate "
                f"and rerun with --overwrite")
        if directory is not None:
            save_npy(directory / "y.npy", res.y_qk)
            save_npy(directory / "base_loss.npy", res.base_loss_q)
            complete_stage(directory, "responses", payload)
        return res

    def dense_scores(self, num_queries: int) -> bool:
        """Whether the solve stage keeps the dense ``[Q, n]`` matrix (``scores``)."""
        from stride_jax.parallel.memory import scores_dense
        return scores_dense(self.config, num_queries=num_queries, n=len(self.train))

    def solve(self, responses: Responses, query_ids: Sequence[str] | None = None) -> Attribution:
        """Per-query recovery over the design (stage ``solve``): dense scores, or each query's
        top ``topk`` when the dense matrix would not fit (``scores``).

        Queries are split evenly over processes, then each process's chunks of queries over its
        ``parallel.solver_devices`` devices; a query's answer does not depend on the split.
        """
        design = self.design()
        y = np.asarray(responses.y_qk, np.float64)
        if y.ndim != 2 or y.shape[1] != design.num_subsets:
            raise ValueError(f"responses have shape {y.shape}; expected [queries, "
                             f"{design.num_subsets}] for this design")
        Q = y.shape[0]
        dense = self.dense_scores(Q)
        rfp = array_fingerprint(np.asarray(responses.y_qk, np.float32))
        directory = None if self.workdir is None else self.workdir / "solve" / rfp
        payload = {"responses": rfp, "design": self._stamp("design"),
                   "solve": to_dict(self.config.solve),
                   "scores": "dense" if dense else f"top{self.config.topk}"}
        top = None
        if directory is not None and open_stage(directory, "solve", payload,
                                                overwrite=self.overwrite):
            w = np.load(directory / "scores.npy", allow_pickle=False) if dense else None
            top = None if dense else TopScores.load(directory / "scores_topk.npz")
            lam = np.load(directory / "lambda.npy", allow_pickle=False)
            b = np.load(directory / "intercept.npy", allow_pickle=False)
        else:
            w, top, lam, b = self._solve_queries(design, y, dense)
            if directory is not None:
                if dense:
                    save_npy(directory / "scores.npy", w)
                else:
                    top.save(directory / "scores_topk.npz")
                save_npy(directory / "lambda.npy", lam)
                save_npy(directory / "intercept.npy", b)
                complete_stage(directory, "solve", payload)
        qids = list(query_ids) if query_ids is not None else [str(i) for i in range(Q)]
        return Attribution(w, qids, list(self.train.ids), np.asarray(responses.y_qk),
                           np.asarray(responses.base_loss_q), lam, b, top)

    def _solve_queries(self, design: Design, y: np.ndarray, dense: bool):
        """This process's share of the queries, solved in blocks, gathered from all processes."""
        cfg = self.config.solve
        key = jax.random.fold_in(self.root, 2)
        Q = y.shape[0]
        start, stop, per = process_slice(Q)
        # Dense scores are solved in one call; top-k scores block by block, so only one block's
        # [query_chunk, n] matrix exists at a time.
        block = max(stop - start, 1) if dense else cfg.query_chunk
        ws, tops, lams, bs = [], [], [], []
        with query_sharding(self.query_mesh):
            for lo in range(start, stop, block):
                hi = min(lo + block, stop)
                out = solve(design, y[lo:hi], cfg, key=key)
                w = np.asarray(out.w_qn, np.float32)
                if dense:
                    ws.append(w)
                else:
                    tops.append(TopScores.from_dense(w, self.config.topk))
                lams.append(np.asarray(out.lam_q, np.float64))
                bs.append(np.asarray(out.intercept_q, np.float64))
        n, k = design.num_examples, self.config.topk
        # The process with fewer queries pads its share, so every gather has one shape.
        lam = _pad_rows(np.concatenate(lams or [np.zeros(0)]), per)
        b = _pad_rows(np.concatenate(bs or [np.zeros(0)]), per)
        if dense:
            w = _pad_rows(np.concatenate(ws) if ws else np.zeros((0, n), np.float32), per)
            w, lam, b = _gather_queries((w, lam, b), Q)
            return w, None, lam, b
        empty = TopScores(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32),
                          np.zeros((0, k), np.int64), np.zeros((0, k), np.float32))
        top = TopScores.concat(tops) if tops else empty
        top = TopScores(*(_pad_rows(a, per, -1 if a.dtype == np.int64 else 0) for a in top))
        *parts, lam, b = _gather_queries((*top, lam, b), Q)
        return None, TopScores(*parts), lam, b

    def self_influence(self, num_outside: int | None = None) -> np.ndarray:
        """Memorisation score of every training example, ``[n]`` (stage ``selfinf``; see
        :mod:`stride_jax.apps.selfinf`): its gain under the operators of the subsets holding it
        over that under a sample of ``num_outside`` (default d) subsets without it."""
        from stride_jax.apps.selfinf import self_influence
        ops = self.fit_operators()
        directory = self._stage_dir("selfinf")
        payload = {"operators": self._stamp("operators"), "num_outside": num_outside,
                   "measure": to_dict(self.config.measure)}
        if directory is not None and open_stage(directory, "selfinf", payload,
                                                overwrite=self.overwrite):
            return np.load(directory / "score.npy", allow_pickle=False)
        out = self_influence(self.lm, self.config.steering.site, ops.basis, ops.coef,
                             self.design(), self.train, key=jax.random.fold_in(self.root, 3),
                             num_outside=num_outside, batch=self.config.measure.query_batch,
                             progress=self.progress)
        if directory is not None:
            save_npy(directory / "score.npy", out.score_n)
            complete_stage(directory, "selfinf", payload)
        return out.score_n

    def token_responses(self, queries: TokenizedSet) -> Responses:
        """Per-token responses ``y_qtk`` of a few queries (not stored: one measurement pass)."""
        ops = self.fit_operators()
        return measure_responses(self.lm, self.config.steering.site, ops.basis, ops.coef,
                                 queries, self.config.measure, progress=False, mesh=self.mesh,
                                 per_token=True)

    def token_attribution(self, queries: TokenizedSet, result: Attribution, decode,
                          k: int | None = None) -> dict:
        """``tokens.json`` payload: for each query, which of its tokens each listed example moved
        (:mod:`stride_jax.apps.tokens`). ``decode`` maps a list of token ids to text."""
        from stride_jax.apps.tokens import token_report
        k = self.config.topk if k is None else k
        res = self.token_responses(queries)
        pos = {qid: q for q, qid in enumerate(result.query_ids)}
        listed = []
        for qid in queries.ids:
            pro, opp = result.top(pos[qid], k)
            listed.append([(i, "proponent") for i, _ in pro] + [(i, "opponent") for i, _ in opp])
        return token_report(self.design(), res.y_qtk, res.base_logprob_qt, queries.loss_mask,
                            queries.target_ids(), queries.ids, listed, self.train.ids, decode)

    def attribute(self, queries: TokenizedSet) -> Attribution:
        """All stages: operators, measurement, recovery."""
        return self.solve(self.measure(queries), queries.ids)


def _pad_rows(a: np.ndarray, rows: int, value: float = 0) -> np.ndarray:
    pad = rows - a.shape[0]
    return a if pad == 0 else np.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1),
                                      constant_values=value)


def _gather_queries(arrays: tuple, num: int) -> list[np.ndarray]:
    """Concatenate every process's padded share (process order) and drop the padding."""
    if jax.process_count() == 1:
        return [a[:num] for a in arrays]
    from jax.experimental import multihost_utils
    gathered = multihost_utils.process_allgather(arrays, tiled=True)
    return [np.asarray(a)[:num] for a in gathered]
