"""The ``Attributor``: STRIDE as named stages, each a stored, argument-stamped artifact.

::

    att = Attributor(model, train_rows, AttributeConfig(), workdir="runs/x")
    att.fit_operators()             # design + activation cache + operator training
    responses = att.measure(query_rows)
    result = att.solve(responses)   # scores [Q, n]: positive = the example lowers the query's loss
    att.write(result, query_rows, tokenizer=tok)   # everything `stride-jax attribute` writes

Stages and their directories under ``workdir``:

==============  ===========================  ==============================================
stage           directory                    stamp covers
==============  ===========================  ==============================================
design          ``design/``                  n, design config, seed
operators       ``operators/``               model + training data fingerprints, design,
                                             steering and train config, seed
measure         ``responses/<queries>/``     operators stamp + queries + measure config
                                             (+ a custom measurement's fingerprint)
solve           ``solve/<responses>/``       responses + design stamp + solve config
selfinf         ``selfinf/``                 operators stamp + measure config
==============  ===========================  ==============================================

The model's fingerprint is :attr:`LMFunctions.fingerprint`: the user's, or else a hash of every
parameter value, so another model (another seed, a fine-tune) never reuses these artifacts.
A stage whose stamp matches is loaded instead of recomputed (operator training resumes from its
last orbax checkpoint), and the log says so (``reusing the complete 'operators' stage in ...
(stamp 1a2b3c4d)``); a stamp that does not match is refused with the changed keys named,
unless ``overwrite=True``. Without a ``workdir`` everything stays in memory.

Before any stage runs, the settings, the model's functions (one ``jax.eval_shape`` each, see
:func:`stride_jax.steering.check_shapes`) and the training rows are checked against each other.

Keys: one seed, ``root = key(seed)``; the design uses ``fold_in(root, 0)``, training
``fold_in(root, 1)``, lambda selection ``fold_in(root, 2)``, self-influence ``fold_in(root, 3)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax.attribution import CLOSED_FORM, Attribution, TopScores
from stride_jax.config import (SEED_RANGE, ConfigValueError, check_ranges, dump_config, option,
                               to_dict)
from stride_jax.data import TokenizedSet
from stride_jax.errors import ConfigError, DataError, NonFiniteError
from stride_jax.io.atomic import save_npy, save_npz, write_json
from stride_jax.io.stamps import array_fingerprint, complete_stage, open_stage
from stride_jax.measure import (MeasureConfig, MeasureInputs, Measurement, Responses,
                                as_measurement, implausible_base_loss, measure_responses)
from stride_jax.methods.config import MethodsConfig
from stride_jax.model.transformer import CausalLM
from stride_jax.parallel import (ParallelConfig, indivisible, initialize, is_writer, make_mesh,
                                 make_query_mesh, process_dir, process_slice, query_sharding,
                                 subset_devices, to_host)
from stride_jax.solve import SolveConfig, solve
from stride_jax.steering import (LMFunctions, SteeringConfig, check_shapes, from_causal_lm,
                                 resolve_layer)
from stride_jax.subsets import Design, bernoulli_design, default_num_subsets, expander_design
from stride_jax.train import (ClosedFormConfig, OperatorFactors, OperatorTrainConfig, build_cache,
                              check_rows_fit, closed_form_scores, fit_factors, operator_gradients,
                              query_terms, reader_lm, self_scores, token_scores,
                              train_operators)

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class DesignConfig:
    """The random subsets the operators are trained on."""

    kind: Literal["expander", "bernoulli"] = option(
        "expander", "expander: each example in exactly `per_example` of K subsets (paper); "
                    "bernoulli: each subset holds each example with probability `alpha`")
    num_subsets: int | None = option(None, "K; null: min(1000, n * per_example // 32), which keeps "
                                           "subsets at >= ~32 examples, rounded up to a "
                                           "multiple of the devices (parallel.devices)")
    per_example: int = option(40, "d: subsets per example (expander; paper: 10; 40 measured "
                                  "better, see configs/attribute_default.yaml)")
    alpha: float = option(0.3, "membership probability (bernoulli)")

    def __post_init__(self) -> None:
        extra = []
        if (self.kind == "expander" and self.num_subsets is not None and self.num_subsets >= 1
                and self.per_example > self.num_subsets):
            extra.append(("per_example", self.per_example,
                          f"cannot exceed the K={self.num_subsets} subsets of design.num_subsets "
                          f"(each example goes into d of the K subsets); lower "
                          f"design.per_example or raise design.num_subsets"))
        check_ranges(self, {"num_subsets": ">= 1", "per_example": ">= 1", "alpha": "in (0, 1)"},
                     fixes={"num_subsets": "or null: chosen from n and per_example"},
                     extra=extra)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How text files become rows (CLI only; the Python API takes tokenized rows)."""

    seq_len: int | None = option(
        None, "tokens per row; null: as long as the longest document (training and queries) "
              "rounded up to a multiple of 16, at most the model's context; text cut into "
              "chunks (train_mode=chunk) then uses rows of min(context, 256) tokens")
    format: Literal["auto", "jsonl", "text"] = option(
        "auto", "how --train and --queries files are read: auto (JSON Lines when the first "
                "non-blank line is a JSON object or the name ends in .jsonl, else plain text), "
                "jsonl, or text (a file is one document; a directory, one per .txt file)")
    train_mode: Literal["auto", "chunk", "document"] = option(
        "auto", "chunk: cut documents into seq_len pieces; document: one row per document "
                "(error if longer); auto: document for JSON Lines, chunk for text")
    stream: Literal["auto", "on", "off"] = option(
        "auto", "on: read and tokenize the training data in chunks of documents into "
                "memory-mapped files under <out>/tokens/train (reused while the data, tokenizer, "
                "seq_len and mode are unchanged), for training sets larger than memory; off: in "
                "memory; auto: on when the training file or directory exceeds stream_threshold")
    stream_threshold: str = option("1GiB", "training data size above which stream=auto streams")

    def __post_init__(self) -> None:
        check_ranges(self, {"seq_len": ">= 2"},
                     fixes={"seq_len": "a row needs a token and its successor; null fits "
                                       "the rows to the longest document"},
                     extra=_size_problems(self, "stream_threshold"))


def _size_problems(cfg, *names: str) -> list[tuple[str, Any, str]]:
    """Memory-size settings (``'4GiB'``) that do not parse."""
    from stride_jax.parallel.memory import parse_bytes
    out = []
    for name in names:
        try:
            parse_bytes(getattr(cfg, name))
        except ValueError:
            out.append((name, getattr(cfg, name), "is not a size; write e.g. 24GiB, 8GB or "
                                                  "512MiB"))
    return out


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

    def __post_init__(self) -> None:
        check_ranges(self, {}, extra=_size_problems(self, "memory_limit"))


@dataclasses.dataclass(frozen=True)
class AttributeConfig:
    """A whole STRIDE run."""

    operators: Literal["closed_form", "trained"] = option(
        "closed_form", "closed_form: every operator fitted by one Newton step with a "
                       "Kronecker-factored Fisher, decoded exactly (the K -> infinity limit of "
                       "the regression over subsets; deterministic, no training noise; the "
                       "closed_form section); trained: the paper's operators trained jointly by "
                       "Adam on random subsets and decoded by regression (design, train, "
                       "measure and solve sections)")
    closed_form: ClosedFormConfig = option(ClosedFormConfig(), "closed-form operators")
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

    def __post_init__(self) -> None:
        K = self.design.num_subsets
        check_ranges(self, {"seed": SEED_RANGE, "topk": ">= 1", "token_queries": ">= 0"},
                     fixes={"token_queries": "0 writes no tokens.json"},
                     extra=_size_problems(self, "scores_memory_limit") + _solve_problems(self.solve)
                     + ([] if K is None else _subset_problems(self, K, None))
                     + _method_problems(self.method))


def _method_problems(method: str) -> list[tuple[str, Any, str]]:
    """An unknown method or a malformed mixture, named when the config is loaded."""
    from stride_jax.methods.config import parse_method
    try:
        parse_method(method)
    except ConfigError as e:
        return [("method", method, f"is not a method: {e}")]
    return []


def _solve_problems(solve: SolveConfig) -> list[tuple[str, Any, str]]:
    """Float settings of the solve that its own checks let through when infinite."""
    return [(f"solve.{name}", getattr(solve, name), "must be a finite number")
            for name in ("tol", "min_ratio", "ridge_ratio_min", "ridge_ratio_max", "lam")
            if getattr(solve, name) is not None and not math.isfinite(getattr(solve, name))]


def _uses_cv(solve: SolveConfig) -> bool:
    """Whether the solve cross-validates over folds of subsets (a penalty or estimator chosen)."""
    return solve.lam is None and (solve.estimator == "ridge" or solve.lam_rule == "cv")


def _subset_problems(cfg: AttributeConfig, K: int, n: int | None,
                     devices: int | None = None) -> list[tuple[str, Any, str]]:
    """Settings that must agree with the number of subsets K (``n``: None when K was set, else
    the number of training rows it was chosen for) and with the ``devices`` of the subset axis
    (None: ``parallel.devices`` when it names a count, as a config file is checked before JAX
    starts)."""
    how = ("design.num_subsets" if n is None else
           f"chosen for n={n} training rows and design.per_example={cfg.design.per_example}; "
           f"design.num_subsets sets it")
    out = []
    if _uses_cv(cfg.solve) and cfg.solve.cv_folds > K:
        out.append(("solve.cv_folds", cfg.solve.cv_folds,
                    f"exceeds the K={K} subsets ({how}): cross-validation splits the subsets "
                    f"into folds; set solve.cv_folds to at most {K}, use more subsets, or fix "
                    f"the penalty with solve.lam"))
    devices = cfg.parallel.devices if devices is None else devices
    if devices > 1:
        # measure.subset_chunk is result-neutral: it is rounded up to a multiple instead.
        for key, value in (("design.num_subsets", K),
                           ("train.subsets_per_step", min(cfg.train.subsets_per_step, K))):
            if value % devices:
                out.append((key, value, f"{indivisible(devices, value)} (K={K}: {how})"))
    return out


def unused_settings(cfg: AttributeConfig) -> list[str]:
    """Settings changed from their defaults that ``cfg.operators`` does not read: a user who
    sets them expects an effect, so the run says they have none."""
    from stride_jax.io.stamps import _flatten
    default = AttributeConfig()
    if cfg.operators == "closed_form":
        sections = ("design", "train", "measure", "solve", "cache")
        extra = ("steering.rank", "steering.basis", "steering.mlp_hidden")
    else:
        sections, extra = ("closed_form",), ()
    now, was = _flatten(to_dict(cfg)), _flatten(to_dict(default))
    return sorted(k for k in now if now[k] != was.get(k) and (
        k.split(".")[0] in sections or k in extra))


def check_run(cfg: AttributeConfig, n: int) -> int:
    """Check the settings that depend on the number of training rows ``n`` before any stage
    runs, so a bad combination costs no training; returns K.

    Raises :class:`ConfigError` naming the keys to set: fewer than 2 rows (a subset design needs
    examples both in and out of each subset), a fixed K the memberships cannot fill, cross-
    validation folds beyond K, a support target beyond n, and device counts that do not divide K.
    """
    if cfg.operators == "closed_form":
        # No subsets: every training row gets its own closed-form score, even a single row.
        if n < 1:
            raise DataError("the training set is empty: nothing to attribute to")
        return 0
    if n < 2:
        raise ConfigError(
            f"{n} training row(s): attribution compares subsets with and without each example, so "
            f"it needs at least 2 training rows; add training documents (or, for text cut into "
            f"rows, lower data.seq_len)")
    d = cfg.design
    devices = subset_devices(cfg.parallel)
    try:
        K = num_subsets_for(cfg, n, devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    problems = _subset_problems(cfg, K, n if d.num_subsets is None else None, devices)
    if d.kind == "expander" and d.num_subsets is not None and n * d.per_example < K:
        problems.append(("design.num_subsets", K, f"leaves subsets empty: n={n} rows in "
                                                  f"design.per_example={d.per_example} subsets "
                                                  f"each fill at most {n * d.per_example}; lower "
                                                  f"design.num_subsets to at most "
                                                  f"{n * d.per_example} (or null), or raise "
                                                  f"design.per_example"))
    s = cfg.solve
    if s.lam is None and s.estimator != "ridge" and s.lam_rule == "support" and \
            s.target_support > n:
        problems.append(("solve.target_support", s.target_support,
                         f"exceeds the n={n} training rows; lower it to at most {n}"))
    if problems:
        raise ConfigError(ConfigValueError("AttributeConfig", problems).format(""))
    return K


def num_subsets_for(cfg: AttributeConfig, n: int, devices: int = 1) -> int:
    """K: ``design.num_subsets``, or when null chosen from ``n`` and ``design.per_example`` and
    rounded to a multiple of the ``devices`` the subset axis is split over
    (:func:`~stride_jax.subsets.default_num_subsets`)."""
    d = cfg.design
    if d.num_subsets is not None:
        return d.num_subsets
    return default_num_subsets(n, d.per_example, multiple=devices)


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
        arrays = {f"basis.{k}": np.asarray(v) for k, v in self.basis.items()}
        save_npz(path, coef=np.asarray(self.coef), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "Operators":
        with np.load(path, allow_pickle=False) as z:
            basis = {k[len("basis."):]: jnp.asarray(z[k]) for k in z.files if k.startswith("basis.")}
            return cls(basis, jnp.asarray(z["coef"]))


class Attributor:
    """STRIDE attribution of one frozen model on one training set.

    Args:
      model: a stride-jax :class:`CausalLM`, or any JAX model as :class:`LMFunctions`.
      train: tokenized training rows (one row = one attributed example).
      config: the run configuration.
      workdir: where stage artifacts go (None: in memory only).
      overwrite: replace stage artifacts made with other arguments instead of refusing.
      progress: show progress bars.
      measurement: the queries' response to an operator (default: the change of the mean
        per-token log-probability); a :class:`~stride_jax.measure.Measurement` or a function
        of :class:`~stride_jax.measure.MeasureInputs` returning one scalar, for the ``logits``
        and ``final_hidden`` sites. It is stamped in the measure stage; per-token attribution
        (``tokens.json``) is skipped with it.
    """

    def __init__(self, model: CausalLM | LMFunctions, train: TokenizedSet,
                 config: AttributeConfig = AttributeConfig(), *, workdir: str | Path | None = None,
                 overwrite: bool = False, progress: bool = True,
                 measurement: Measurement | Callable[[MeasureInputs], Any] | None = None):
        # Joins the multi-host runtime if asked (it must come before JAX does any work, and
        # before the device count is read; the CLI calls it first thing, library users call
        # stride_jax.parallel.initialize themselves).
        initialize(config.parallel)
        # Settings are checked before any stage runs, so a typo costs no cached work.
        check_run(config, len(train))
        if isinstance(model, CausalLM):
            layer = resolve_layer(config.steering, model.config.num_layers)
            self.lm = from_causal_lm(model, layer)
        elif isinstance(model, LMFunctions):
            if config.steering.layer is not None and config.steering.layer != model.layer:
                raise ConfigError(f"steering.layer={config.steering.layer} but the LMFunctions read "
                                  f"layer {model.layer}")
            self.lm = model
        else:
            raise TypeError(f"model must be a CausalLM or LMFunctions, got {type(model).__name__}")
        self.train = train
        self.config = config
        unused = unused_settings(config)
        if unused and is_writer():
            log.warning("operators=%s does not use %s; set operators=%s to use them",
                        config.operators, ", ".join(unused),
                        "trained" if config.operators == "closed_form" else "closed_form")
        self.workdir = Path(workdir) if workdir is not None else None
        self.overwrite = overwrite
        self.measurement = as_measurement(measurement)
        if self.measurement is not None and config.steering.site == "residual":
            raise ConfigError("a custom measurement needs steering.site=logits or final_hidden "
                              "(the residual site measures the mean log-probability change)")
        if self.measurement is not None and self.closed_form:
            raise ConfigError("a custom measurement needs operators=trained: closed-form "
                              "operators score the change of each query's mean per-token loss")
        # The model's functions and the rows are checked against each other before any work:
        # one jax.eval_shape per function, a one-line error naming the field.
        check_shapes(self.lm, config.steering.site, train.seq_len)
        check_rows_fit(self.lm, train, "training")
        if workdir is not None:
            # Stamps name the model by its fingerprint (the user's, or a hash of every parameter
            # value), computed before any sharding: another model never reuses these artifacts.
            self.lm = self.lm.with_fingerprint()
            log.info("model fingerprint %s", self.lm.fingerprint)
        self.progress = progress and is_writer()
        self.root = jax.random.key(config.seed)
        # Not part of any stamp: the device count changes float rounding only, so a run may be
        # resumed or reused on another number of devices.
        self.mesh = make_mesh(config.parallel)
        if self.mesh is not None:
            K = self.num_subsets
            self.mesh.check_divides(**{
                "design.num_subsets": K,
                "train.subsets_per_step": min(config.train.subsets_per_step, K)})
        self.query_mesh = make_query_mesh(config.parallel)
        if self.mesh is not None and (config.parallel.model == "fsdp" or (
                config.parallel.model == "auto" and not self.mesh.weights_fit(self.lm.params))):
            self.lm = dataclasses.replace(self.lm, params=self.mesh.shard_weights(
                self.lm.params, config.parallel.fsdp_min_size))
        if config.scores not in ("auto", "dense", "topk"):
            raise ConfigError(f"scores must be 'auto', 'dense' or 'topk', got {config.scores!r}")
        self._design: Design | None = None
        self._ops: Operators | None = None
        self._selfinf: dict[int | None, np.ndarray] = {}
        self.history: list[dict] = []
        # Wall seconds of each stage of the last attribute() / write() (a reused stage: the
        # time to load it), for run_info.json and the report.
        self.stage_seconds: dict[str, float] = {}
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            dump_config(config, self.workdir / "attribute.yaml")

    # -- stamps --------------------------------------------------------------------------------
    @property
    def closed_form(self) -> bool:
        return self.config.operators == "closed_form"

    def _stamp(self, stage: str) -> dict:
        c = self.config
        if self.closed_form:
            # batch_size and checkpoint_rows only change float rounding and resumption.
            cf = {k: v for k, v in to_dict(c.closed_form).items()
                  if k not in ("batch_size", "checkpoint_rows")}
            return {"operators": "closed_form", "n": len(self.train), "model": self.lm.fingerprint,
                    "layer": self.lm.layer, "train_rows": self._train_fingerprint,
                    "site": c.steering.site, "closed_form": cf, "seed": c.seed}
        # K itself: an automatic K depends on the device count as well as on n.
        base = {"n": len(self.train), "design": to_dict(c.design), "K": self.num_subsets,
                "seed": c.seed}
        if stage == "design":
            return base
        base.update(model=self.lm.fingerprint, layer=self.lm.layer,
                    train_rows=self._train_fingerprint, steering=to_dict(c.steering),
                    train=to_dict(c.train), cache_dtype=c.cache.dtype)
        return base

    @functools.cached_property
    def _reads_final(self) -> bool:
        """Whether the closed form reads the final hidden state (``closed_form.reader``)."""
        c = self.config
        final = reader_lm(self.lm, c.closed_form, c.steering.site) is not self.lm
        if final and self.config.steering.layer is not None:
            log.warning("steering.layer=%s has no effect: closed_form.reader=%s reads the final "
                        "hidden state; set closed_form.reader=layer to read layer %s",
                        self.config.steering.layer, self.config.closed_form.reader,
                        self.config.steering.layer)
        return final

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
        return num_subsets_for(self.config, len(self.train),
                               1 if self.mesh is None else self.mesh.size)

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
        # An automatic K adapts to a small n: subsets the random draw leaves empty are filled
        # (a set K is used as given, and an empty subset is an error that names K and d).
        fill = d.num_subsets is None
        try:
            if d.kind == "expander":
                design = expander_design(n, self.num_subsets, d.per_example, key=key,
                                         fill_empty=fill)
            else:
                design = bernoulli_design(n, self.num_subsets, d.alpha, key=key, fill_empty=fill)
        except ConfigError as e:
            raise ConfigError(f"design (kind={d.kind}, num_subsets={self.num_subsets}, "
                              f"per_example={d.per_example}, alpha={d.alpha}, n={n}): {e}") from e
        if directory is not None:
            design.save(directory / "design.npz")
            complete_stage(directory, "design", payload)
        self._design = design
        return design

    def fit_operators(self) -> Operators | OperatorFactors:
        """Cache activations and train all operators (stage ``operators``; resumable); with
        ``operators=closed_form`` the Kronecker factors of the closed-form operators instead."""
        if self._ops is not None:
            return self._ops
        if self.closed_form:
            return self._fit_factors()
        design = self.design()
        directory = self._stage_dir("operators")
        payload = self._stamp("operators")
        if directory is not None and open_stage(directory, "operators", payload,
                                                overwrite=self.overwrite):
            self._ops = Operators.load(directory / "operators.npz")
            if (directory / "history.json").is_file():
                with contextlib.suppress(ValueError, OSError):
                    self.history = json.loads((directory / "history.json").read_text())
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
            write_json(directory / "history.json", out.history, indent=1)
            complete_stage(directory, "operators", payload)
            if on_disk:   # only training reads the cache; it can be as large as the data
                import shutil
                shutil.rmtree(cache_dir, ignore_errors=True)
                if cache_dir != directory / "cache":   # the last process out removes the parent
                    with contextlib.suppress(OSError):
                        (directory / "cache").rmdir()
        return self._ops

    def _fit_factors(self) -> OperatorFactors:
        _ = self._reads_final  # says now, not at write time, when steering.layer has no effect
        directory = self._stage_dir("operators")
        payload = self._stamp("operators")
        if directory is not None and open_stage(directory, "operators", payload,
                                                overwrite=self.overwrite):
            log.info("reusing operators (closed form) in %s", directory)
            self._ops = OperatorFactors.load(directory / "factors.npz")
            return self._ops
        self._ops = fit_factors(self.lm, self.train, self.config.steering.site,
                                self.config.closed_form, key=jax.random.fold_in(self.root, 1),
                                mesh=self.mesh, progress=self.progress,
                                resume_path=None if directory is None
                                else directory / "partial.npz")
        if directory is not None:
            self._ops.save(directory / "factors.npz")
            complete_stage(directory, "operators", payload)
            (directory / "partial.npz").unlink(missing_ok=True)
        return self._ops

    def query_gradients(self, queries: TokenizedSet) -> Responses:
        """Closed form: each query's whitened operator gradient ``g~_q`` (``y_qk``, ``[Q, D k]``)
        and base loss (stage ``responses``)."""
        factors = self.fit_operators()
        qfp = rows_fingerprint(queries)
        directory = None if self.workdir is None else self.workdir / "responses" / qfp
        payload = {"operators": self._stamp("operators"), "queries": qfp}
        if directory is not None and open_stage(directory, "responses", payload,
                                                overwrite=self.overwrite):
            log.info("reusing query gradients in %s", directory)
            res = Responses(np.load(directory / "g.npy", allow_pickle=False),
                            np.load(directory / "base_loss.npy", allow_pickle=False))
            _warn_implausible(res, self.lm.vocab_size)
            return res
        check_rows_fit(self.lm, queries, "query")
        counts = queries.loss_mask.sum(1)
        if (counts == 0).any():
            bad = queries.ids[int(np.flatnonzero(counts == 0)[0])]
            raise DataError(f"query {bad!r} has no scored token (empty completion?); give it a "
                            f"non-empty text/completion")
        cf = self.config.closed_form
        g, base = query_terms(self.lm, queries, factors, cf, mesh=self.mesh)
        bad = ~np.isfinite(g)
        if bad.any():
            q = int(np.nonzero(bad)[0][0])
            raise NonFiniteError(f"the operator gradient of query {queries.ids[q]!r} is "
                                 f"NaN/inf: check the model's weights and that the query's "
                                 f"tokens are in its vocabulary")
        if directory is not None:
            save_npy(directory / "g.npy", g)
            save_npy(directory / "base_loss.npy", base)
            complete_stage(directory, "responses", payload)
        res = Responses(g, base)
        _warn_implausible(res, self.lm.vocab_size)
        return res

    def _solve_closed_form(self, responses: Responses, query_ids: Sequence[str]) -> Attribution:
        factors = self.fit_operators()
        g = np.asarray(responses.y_qk, np.float32)
        Q = g.shape[0]
        dense = self.dense_scores(Q)
        rfp = array_fingerprint(g)
        directory = None if self.workdir is None else self.workdir / "solve" / rfp
        k = self.config.topk
        payload = {"responses": rfp, "operators": self._stamp("operators"),
                   "scores": "dense" if dense else f"top{k}"}
        w = top = None
        if directory is not None and open_stage(directory, "solve", payload,
                                                overwrite=self.overwrite):
            log.info("reusing scores in %s", directory)
            if dense:
                w = np.load(directory / "scores.npy", allow_pickle=False)
            else:
                top = TopScores.load(directory / "scores_topk.npz")
        else:
            resume = None if directory is None else directory / "partial.npz"
            cf = self.config.closed_form
            if dense:
                w = closed_form_scores(self.lm, self.train, factors, g, cf, mesh=self.mesh,
                                       progress=self.progress, resume_path=resume)["s"]
            else:
                acc = closed_form_scores(self.lm, self.train, factors, g, cf, mesh=self.mesh,
                                         progress=self.progress, resume_path=resume, topk=k)
                top = TopScores(**acc)
            bad = ~np.isfinite(w if dense else np.concatenate([top.pro_score, top.opp_score]))
            if bad.any():
                raise NonFiniteError("closed-form scores are NaN/inf: check the model's "
                                     "weights for NaN/inf")
            if directory is not None:
                if dense:
                    save_npy(directory / "scores.npy", w)
                else:
                    top.save(directory / "scores_topk.npz")
                complete_stage(directory, "solve", payload)
                if resume is not None:
                    resume.unlink(missing_ok=True)
        # No regression: no responses over subsets ([Q, 0]), no penalty, no intercept.
        return Attribution(w, list(query_ids), list(self.train.ids), g[:, :0],
                           np.asarray(responses.base_loss_q), top_scores=top,
                           estimator_q=np.full(Q, CLOSED_FORM))

    def measure(self, queries: TokenizedSet) -> Responses:
        """Responses ``y[q, k]`` of the queries to every operator (stage ``responses``); with
        closed-form operators, the queries' whitened operator gradients (:meth:`query_gradients`)."""
        if self.closed_form:
            return self.query_gradients(queries)
        ops = self.fit_operators()
        qfp = rows_fingerprint(queries)
        # One directory per query set (and measurement), so new queries or another measurement
        # reuse the operators without a clash.
        name = qfp
        payload = {"operators": self._stamp("operators"), "queries": qfp,
                   "measure": to_dict(self.config.measure)}
        if self.measurement is not None:   # the default adds no key: older stamps stay valid
            payload["measurement"] = self.measurement.stamp()
            name = f"{qfp}-{array_fingerprint(extra=payload['measurement'])[:8]}"
        directory = None if self.workdir is None else self.workdir / "responses" / name
        if directory is not None and open_stage(directory, "responses", payload,
                                                overwrite=self.overwrite):
            res = Responses(np.load(directory / "y.npy", allow_pickle=False),
                            np.load(directory / "base_loss.npy", allow_pickle=False))
            _warn_implausible(res, self.lm.vocab_size)
            return res
        res = measure_responses(self.lm, self.config.steering.site, ops.basis, ops.coef,
                                queries, self.config.measure, progress=self.progress,
                                mesh=self.mesh, measurement=self.measurement)
        bad = ~np.isfinite(res.y_qk)
        if bad.any():
            q, k = (int(v[0]) for v in np.nonzero(bad))
            where = "" if directory is None else f" in {self.workdir / 'operators'}"
            raise NonFiniteError(
                f"{int(bad.sum())} responses are NaN/inf (first: query {queries.ids[q]!r}, "
                f"subset {k}): the trained operators{where} diverged; lower train.learning_rate "
                f"and rerun with --overwrite")
        if directory is not None:
            save_npy(directory / "y.npy", res.y_qk)
            save_npy(directory / "base_loss.npy", res.base_loss_q)
            complete_stage(directory, "responses", payload)
        _warn_implausible(res, self.lm.vocab_size)
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
        if self.closed_form:
            Q = np.asarray(responses.y_qk).shape[0]
            return self._solve_closed_form(responses, query_ids if query_ids is not None
                                           else [str(i) for i in range(Q)])
        design = self.design()
        y = np.asarray(responses.y_qk, np.float64)
        if y.ndim != 2 or y.shape[1] != design.num_subsets:
            raise DataError(f"responses have shape {y.shape}; expected [queries, "
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
            # A stage finished before the estimators were stored has none to report.
            est = (np.load(directory / "estimator.npy", allow_pickle=False)
                   if (directory / "estimator.npy").is_file() else None)
            r2 = (np.load(directory / "cv_r2.npy", allow_pickle=False)
                  if (directory / "cv_r2.npy").is_file() else None)
        else:
            w, top, lam, b, est, r2 = self._solve_queries(design, y, dense)
            # No cross-validation ran (a fixed or support-chosen penalty): no R^2 to report.
            r2 = r2 if np.isfinite(r2).all() else None
            if directory is not None:
                if dense:
                    save_npy(directory / "scores.npy", w)
                else:
                    top.save(directory / "scores_topk.npz")
                save_npy(directory / "lambda.npy", lam)
                save_npy(directory / "intercept.npy", b)
                save_npy(directory / "estimator.npy", est)
                if r2 is not None:
                    save_npy(directory / "cv_r2.npy", r2)
                complete_stage(directory, "solve", payload)
        qids = list(query_ids) if query_ids is not None else [str(i) for i in range(Q)]
        return Attribution(w, qids, list(self.train.ids), np.asarray(responses.y_qk),
                           np.asarray(responses.base_loss_q), lam, b, top, est, r2)

    def _solve_queries(self, design: Design, y: np.ndarray, dense: bool):
        """This process's share of the queries, solved in blocks, gathered from all processes."""
        cfg = self.config.solve
        key = jax.random.fold_in(self.root, 2)
        Q = y.shape[0]
        start, stop, per = process_slice(Q)
        # Dense scores are solved in one call; top-k scores block by block, so only one block's
        # [query_chunk, n] matrix exists at a time.
        block = max(stop - start, 1) if dense else cfg.query_chunk
        ws, tops, lams, bs, ridge, r2s = [], [], [], [], [], []
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
                ridge.append((out.info["estimator_q"] == "ridge").astype(np.float64))
                r2s.append(_cv_r2(out.info, y[lo:hi]))
        n, k = design.num_examples, self.config.topk
        # The process with fewer queries pads its share, so every gather has one shape.
        lam = _pad_rows(np.concatenate(lams or [np.zeros(0)]), per)
        b = _pad_rows(np.concatenate(bs or [np.zeros(0)]), per)
        # Gathered as numbers (process_allgather takes no strings), named after.
        r = _pad_rows(np.concatenate(ridge or [np.zeros(0)]), per)
        r2 = _pad_rows(np.concatenate(r2s or [np.zeros(0)]), per)

        def names(r_q):
            return np.where(np.asarray(r_q) > 0.5, "ridge", "lasso")

        if dense:
            w = _pad_rows(np.concatenate(ws) if ws else np.zeros((0, n), np.float32), per)
            w, lam, b, r, r2 = _gather_queries((w, lam, b, r, r2), Q)
            return w, None, lam, b, names(r), r2
        empty = TopScores(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32),
                          np.zeros((0, k), np.int64), np.zeros((0, k), np.float32))
        top = TopScores.concat(tops) if tops else empty
        top = TopScores(*(_pad_rows(a, per, -1 if a.dtype == np.int64 else 0) for a in top))
        *parts, lam, b, r, r2 = _gather_queries((*top, lam, b, r, r2), Q)
        return None, TopScores(*parts), lam, b, names(r), r2

    def self_influence(self, num_outside: int | None = None) -> np.ndarray:
        """Memorisation score of every training example, ``[n]`` (stage ``selfinf``; see
        :mod:`stride_jax.apps.selfinf`): its gain under the operators of the subsets holding it
        over that under a sample of ``num_outside`` (default d) subsets without it."""
        from stride_jax.apps.selfinf import self_influence
        if num_outside in self._selfinf:
            return self._selfinf[num_outside]
        ops = self.fit_operators()
        directory = self._stage_dir("selfinf")
        payload = {"operators": self._stamp("operators"), "num_outside": num_outside,
                   "measure": to_dict(self.config.measure)}
        if self.closed_form:
            # The closed form's self-influence is s_ii = |g~_i|^2: the loss decrease on i itself
            # of a Newton step of the operator on i (no subsets to compare).
            payload = {"operators": self._stamp("operators")}
            if directory is not None and open_stage(directory, "selfinf", payload,
                                                    overwrite=self.overwrite):
                self._selfinf[num_outside] = np.load(directory / "score.npy", allow_pickle=False)
                return self._selfinf[num_outside]
            score = self_scores(self.lm, self.train, ops, self.config.closed_form,
                                mesh=self.mesh, progress=self.progress)
            if directory is not None:
                save_npy(directory / "score.npy", score)
                complete_stage(directory, "selfinf", payload)
            self._selfinf[num_outside] = score
            return score
        if directory is not None and open_stage(directory, "selfinf", payload,
                                                overwrite=self.overwrite):
            self._selfinf[num_outside] = np.load(directory / "score.npy", allow_pickle=False)
            return self._selfinf[num_outside]
        out = self_influence(self.lm, self.config.steering.site, ops.basis, ops.coef,
                             self.design(), self.train, key=jax.random.fold_in(self.root, 3),
                             num_outside=num_outside, batch=self.config.measure.query_batch,
                             progress=self.progress)
        if directory is not None:
            save_npy(directory / "score.npy", out.score_n)
            complete_stage(directory, "selfinf", payload)
        self._selfinf[num_outside] = out.score_n
        return out.score_n

    def token_responses(self, queries: TokenizedSet) -> Responses:
        """Per-token responses ``y_qtk`` of a few queries (not stored: one measurement pass)."""
        if self.closed_form:
            # Closed-form operators have no responses over subsets; token_attribution gives each
            # token's exact term of the score instead.
            raise ConfigError("token_responses needs operators=trained (closed-form operators "
                              "measure no responses); use token_attribution for per-token effects")
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
        pos = {qid: q for q, qid in enumerate(result.query_ids)}
        listed = []
        for qid in queries.ids:
            pro, opp = result.top(pos[qid], k)
            listed.append([(i, "proponent") for i, _ in pro] + [(i, "opponent") for i, _ in opp])
        if self.closed_form:
            return self._token_attribution_closed_form(queries, listed, decode)
        res = self.token_responses(queries)
        return token_report(self.design(), res.y_qtk, res.base_logprob_qt, queries.loss_mask,
                            queries.target_ids(), queries.ids, listed, self.train.ids, decode)

    def _token_attribution_closed_form(self, queries: TokenizedSet, listed, decode) -> dict:
        """Closed form: a score is a sum over the query's scored tokens, ``s_qi = sum_t
        <phi~_qt (x) e~_qt, g~_i>``; each token's term is its effect (they add up exactly)."""
        factors = self.fit_operators()
        cf = self.config.closed_form
        out = []
        targets = queries.target_ids()
        for q, qid in enumerate(queries.ids):
            one = queries.subset([q])
            idx = [i for i, _ in listed[q]]
            g_i = (operator_gradients(self.lm, self.train.subset(idx), factors, cf)
                   if idx else np.zeros((0, factors.dim), np.float32))
            eff = token_scores(self.lm, one, factors, g_i, cf)[0]   # [T, m]
            tpos = np.flatnonzero(one.loss_mask[0] > 0)
            out.append({
                "query_id": str(qid),
                "tokens": [decode([int(targets[q, t])]) for t in tpos],
                "examples": [{"id": str(self.train.ids[i]), "index": int(i), "kind": kind,
                              "effect": [float(v) for v in eff[tpos, j]]}
                             for j, (i, kind) in enumerate(listed[q])],
            })
        return {"queries": out, "method": "closed-form operators: each scored query token's "
                                          "term of the score (they sum to the score)"}

    def attribute(self, queries: TokenizedSet) -> Attribution:
        """All stages: operators, measurement, recovery (their wall times in
        :attr:`stage_seconds`)."""
        with self._timed("operators"):
            self.fit_operators()
        with self._timed("responses"):
            responses = self.measure(queries)
        with self._timed("solve"):
            return self.solve(responses, queries.ids)

    @contextlib.contextmanager
    def _timed(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[stage] = time.perf_counter() - t0

    def run_info(self, model_path: str | Path | None = None) -> dict:
        """What made this run, for ``run_info.json`` and the report: the model's identity (its
        path when given, parameter count, fingerprint, reader layer and sizes), the method and
        operators, each stage's wall seconds and the operator-training loss curve (trained
        operators; empty for closed form, which trains nothing)."""
        params = int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.lm.params)))
        final = self.closed_form and self._reads_final
        model = {"path": None if model_path is None else str(model_path),
                 "parameters": params, "fingerprint": self.lm.fingerprint,
                 "num_layers": self.lm.num_layers, "vocab_size": self.lm.vocab_size,
                 "reader": "final hidden state" if final else f"layer {self.lm.layer}"}
        return {"method": "stride", "operators": self.config.operators,
                "site": self.config.steering.site, "model": model,
                "training_rows": len(self.train),
                "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
                "history": list(self.history)}

    def write(self, result: Attribution, queries: TokenizedSet, out_dir: str | Path | None = None,
              *, tokenizer=None, self_influence: bool = False, report: bool = False,
              title: str | None = None, model_path: str | Path | None = None) -> Path:
        """Write everything ``stride-jax attribute`` writes for ``result`` into ``out_dir``
        (default: the workdir), in one call (files: :mod:`stride_jax.attribution`):

        * ``scores.npy`` (or ``scores_topk.npz``), ``ids.json``, ``per_query.npz`` and
          ``topk.jsonl``, with the rows' texts when a ``tokenizer`` decodes them;
        * ``tokens.json``: the per-token attribution of the first ``config.token_queries``
          queries (tokens shown as ids without a tokenizer);
        * ``selfinf.json`` with ``self_influence=True`` (the ``selfinf`` stage);
        * ``run_info.json``: :meth:`run_info` (``model_path``: the model's path, when it has one);
        * ``report.html`` with ``report=True`` (:mod:`stride_jax.apps.report`, ``title``).

        ``queries`` are the rows ``result`` was computed for. Returns the directory.
        """
        from stride_jax.attribution import write_run_info, write_selfinf, write_tokens
        if out_dir is None and self.workdir is None:
            raise ConfigError("Attributor.write needs out_dir (this Attributor has no workdir)")
        out = Path(out_dir) if out_dir is not None else self.workdir
        if list(queries.ids) != list(result.query_ids):
            raise DataError("Attributor.write: the queries are not the rows the result was "
                            "computed for (their ids differ); pass the same queries")
        train_texts = query_texts = None
        decode = _token_ids_text
        if tokenizer is not None:
            from stride_jax.tokenizer import as_backend, row_texts
            train_texts, query_texts = row_texts(self.train, tokenizer), row_texts(queries,
                                                                                   tokenizer)
            decode = as_backend(tokenizer).decode
        result.write(out, train_texts=train_texts, query_texts=query_texts, k=self.config.topk)
        if self.config.token_queries > 0 and self.measurement is not None:
            log.info("no tokens.json: per-token attribution describes the default measurement, "
                     "not %s", self.measurement.stamp())
        elif self.config.token_queries > 0:
            few = queries.subset(range(min(self.config.token_queries, len(queries))))
            with self._timed("tokens"):
                payload = self.token_attribution(few, result, decode)
            write_tokens(out, payload)
        if self_influence:
            with self._timed("selfinf"):
                score = self.self_influence()
            write_selfinf(out, self.train.ids, score)
        write_run_info(out, self.run_info(model_path))
        if report:
            from stride_jax.apps.report import write_report
            write_report(out, title=title)
        return out


def _cv_r2(info: dict, y: np.ndarray) -> np.ndarray:
    """``[q]`` held-out R^2 of each query's chosen fit: ``1 - cv_error / var(y_q)`` with the
    chosen estimator's cross-validation error (mean squared held-out error per subset); NaN
    where no cross-validation ran (``solve.lam_rule`` other than ``cv``)."""
    err = np.full(y.shape[0], np.nan)
    est = np.asarray(info.get("estimator_q", []))
    for name in ("lasso", "ridge"):
        e = info.get(f"cv_error_{name}_q")
        if e is not None and est.size:
            err = np.where(est == name, np.asarray(e, np.float64), err)
    var = np.var(np.asarray(y, np.float64), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(var > 0, 1.0 - err / var, np.nan)


def _token_ids_text(ids: Sequence[int]) -> str:
    return " ".join(str(int(i)) for i in ids)


def _warn_implausible(res: Responses, vocab_size: int) -> None:
    warning = implausible_base_loss(res.base_loss_q, vocab_size)
    if warning is not None and is_writer():
        log.warning("%s", warning)


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
