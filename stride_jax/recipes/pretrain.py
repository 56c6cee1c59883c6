"""The pretraining recipe: a pure function of (config, data, seed).

Ground-truth retraining (the LDS evaluation) re-runs exactly this recipe on subsets of the
training rows, so everything that decides the trained weights lives here and is deterministic:

* the corpus: documents -> byte-level BPE -> fixed-length rows -> deterministic train/heldout
  split by row-id hash (:func:`build_corpus`);
* the model: :class:`ModelConfig` from :class:`ArchConfig` + the tokenizer's vocabulary, weights
  from ``init_model(config, seed)``;
* the data order: epoch ``e`` visits the rows in the order
  ``permutation(fold_in(key_data, e), n)`` (:func:`batch_schedule`);
* the optimiser: AdamW with linear warmup and cosine decay, global-norm clipping, no weight decay on
  norms and biases (:func:`make_optimizer`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stride_jax.config import SEED_RANGE, check_ranges, dump_config, option, to_dict
from stride_jax.data import (Document, TokenizedSet, read_documents, shakespeare_plays, split_ids,
                             tokenize_documents)
from stride_jax.errors import DataError, NonFiniteLossError
from stride_jax.model import CausalLM, ModelConfig, init_model
from stride_jax.model.loss import mean_token_loss, sequence_nll

log = logging.getLogger(__name__)

DEFAULT_PLAYS = ("hamlet", "macbeth", "othello", "lear", "romeo_and_juliet",
                 "midsummer_nights_dream")


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """Architecture of a model trained from scratch (vocabulary and context come from the data)."""

    family: Literal["llama", "qwen2", "gpt2"] = option("llama", "model family")
    hidden_size: int = option(128, "model width d")
    num_layers: int = option(2, "number of transformer blocks")
    num_heads: int = option(4, "query heads")
    num_kv_heads: int = option(2, "key/value heads (grouped-query attention when < num_heads)")
    head_dim: int = option(32, "width of one attention head")
    intermediate_size: int = option(512, "MLP width")
    tie_word_embeddings: bool = option(True, "share the embedding with the output head")
    rope_theta: float = option(10000.0, "rotary base (llama/qwen2)")
    norm_eps: float = option(1e-5, "RMSNorm/LayerNorm epsilon")
    dtype: Literal["float32", "bfloat16"] = option("float32", "compute dtype (params stay float32)")

    def __post_init__(self) -> None:
        extra = []
        if (self.family != "gpt2" and self.num_kv_heads >= 1
                and self.num_heads % self.num_kv_heads):
            extra.append(("num_heads", self.num_heads,
                          f"is not a multiple of num_kv_heads={self.num_kv_heads} (each key/value "
                          f"head serves a whole group of query heads)"))
        check_ranges(self, {"hidden_size": ">= 1", "num_layers": ">= 1", "num_heads": ">= 1",
                            "num_kv_heads": ">= 1", "head_dim": ">= 1",
                            "intermediate_size": ">= 1", "rope_theta": "> 0", "norm_eps": "> 0"},
                     extra=extra)


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """Where the training text comes from and how it becomes fixed-length rows."""

    source: str = option("shakespeare", "'shakespeare' (embedded plays) or a path: .jsonl, .txt or "
                                        "a directory of .txt files")
    plays: tuple[str, ...] = option(DEFAULT_PLAYS, "plays to use when source is 'shakespeare' "
                                                   "(empty: all 37)")
    seq_len: int = option(64, "tokens per training row (also the model's context)")
    heldout_fraction: float = option(0.05, "fraction of rows held out (queries come from here)")
    split_seed: int = option(0, "seed of the id-hash split into train/heldout")
    tokenizer: str | None = option(None, "tokenizer.json (or its directory) to use; null trains a "
                                         "byte-level BPE on the train split")
    vocab_size: int = option(2048, "BPE vocabulary size when training a tokenizer")

    def __post_init__(self) -> None:
        # Byte-level BPE needs its 256 byte symbols and 2 special tokens before any merge.
        check_ranges(self, {"seq_len": ">= 2", "heldout_fraction": "in [0, 1)",
                            "split_seed": SEED_RANGE,
                            "vocab_size": ">= 1" if self.tokenizer else ">= 259"},
                     fixes={"seq_len": "a row needs a token and its successor",
                            "vocab_size": "byte-level BPE needs 256 byte symbols and 2 special "
                                          "tokens before its first merge"})


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup + cosine decay."""

    learning_rate: float = option(3e-3, "peak learning rate")
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = option(30, "linear warmup steps")
    weight_decay: float = option(0.1, "decoupled weight decay (matrices only)")
    b1: float = option(0.9, "Adam beta1")
    b2: float = option(0.95, "Adam beta2")
    grad_clip: float = option(1.0, "global gradient-norm clip (0 disables)")
    batch_size: int = option(32, "rows per step")
    epochs: float = option(2.0, "passes over the training rows; steps = ceil(epochs * n / batch)")

    def __post_init__(self) -> None:
        check_ranges(self, {"learning_rate": "> 0", "min_lr_ratio": "in [0, 1]",
                            "warmup_steps": ">= 0", "weight_decay": ">= 0", "b1": "in [0, 1)",
                            "b2": "in [0, 1)", "grad_clip": ">= 0", "batch_size": ">= 1",
                            "epochs": "> 0"},
                     fixes={"epochs": "a model trained for no step is the random "
                                      "initialisation",
                            "grad_clip": "0 disables clipping"})


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Everything that decides a pretrained model."""

    arch: ArchConfig = option(ArchConfig(), "model architecture")
    corpus: CorpusConfig = option(CorpusConfig(), "training text")
    optim: OptimConfig = option(OptimConfig(), "optimiser and schedule")
    seed: int = option(0, "seed for initialisation and data order")
    log_every: int = option(20, "steps between loss-curve points")
    sample_prompt: str = option("ROMEO.\n", "prompt for the sample printed after training")
    sample_tokens: int = option(40, "tokens to sample after training")

    def __post_init__(self) -> None:
        check_ranges(self, {"seed": SEED_RANGE, "log_every": ">= 1", "sample_tokens": ">= 0"})


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

class Corpus(NamedTuple):
    tokenizer: Any
    train: TokenizedSet
    heldout: TokenizedSet


def load_source_documents(cfg: CorpusConfig) -> list[Document]:
    if cfg.source == "shakespeare":
        return shakespeare_plays(list(cfg.plays) or None)
    return read_documents(cfg.source)


def build_corpus(cfg: CorpusConfig, docs: Sequence[Document] | None = None) -> Corpus:
    """Tokenizer + train/heldout rows. Deterministic in ``cfg``.

    The split is over *rows* (chunks), by a hash of the row id, so held-out queries come from the
    same plays as the training rows but never overlap them. A trained tokenizer sees all the
    documents' text, because rows only exist after tokenizing; a vocabulary carries no weights, so
    this does not leak held-out text into the model.
    """
    from stride_jax.tokenizer import load_tokenizer, train_bpe

    docs = list(docs) if docs is not None else load_source_documents(cfg)
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    else:
        tok = train_bpe((d.text for d in docs), vocab_size=cfg.vocab_size)
    rows = tokenize_documents(docs, tok, cfg.seq_len, mode="chunk")
    if cfg.heldout_fraction > 0:
        parts = split_ids(rows.ids, {"train": 1.0 - cfg.heldout_fraction,
                                     "heldout": cfg.heldout_fraction}, seed=cfg.split_seed)
    else:
        parts = {"train": list(range(len(rows))), "heldout": []}
    return Corpus(tok, rows.subset(sorted(parts["train"])), rows.subset(sorted(parts["heldout"])))


def model_config_for(arch: ArchConfig, vocab_size: int, seq_len: int, *,
                     bos_id: int | None = None, eos_id: int | None = None,
                     pad_id: int | None = None) -> ModelConfig:
    gpt2 = arch.family == "gpt2"
    return ModelConfig(
        family=arch.family, vocab_size=vocab_size, hidden_size=arch.hidden_size,
        num_layers=arch.num_layers, num_heads=arch.num_heads,
        num_kv_heads=arch.num_heads if gpt2 else arch.num_kv_heads, head_dim=arch.head_dim,
        intermediate_size=arch.intermediate_size, max_position_embeddings=seq_len,
        norm_eps=arch.norm_eps, rope_theta=arch.rope_theta,
        tie_word_embeddings=arch.tie_word_embeddings, qkv_bias=arch.family != "llama",
        out_bias=gpt2, mlp_bias=gpt2, activation="gelu_new" if gpt2 else "silu", dtype=arch.dtype,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)


# ----------------------------------------------------------------------------------------------
# Optimisation
# ----------------------------------------------------------------------------------------------

def num_steps(n_rows: int, optim: OptimConfig) -> int:
    if n_rows < 1:
        raise DataError("no training rows: the training set is empty")
    return max(1, math.ceil(optim.epochs * n_rows / optim.batch_size))


def lr_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``learning_rate``, then cosine decay to ``min_lr_ratio * learning_rate``."""
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=optim.learning_rate * optim.min_lr_ratio)


def make_optimizer(optim: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW on :func:`lr_schedule`; decay only on >= 2-D parameters."""
    schedule = lr_schedule(optim, total_steps)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    parts = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)


def batch_schedule(n_rows: int, optim: OptimConfig, *, key: jax.Array) -> np.ndarray:
    """Row indices of every step, ``[steps, batch_size]``.

    Epoch ``e`` is ``permutation(fold_in(key, e), n_rows)``; epochs are concatenated and cut into
    batches, so the schedule depends only on (n_rows, optim, key).
    """
    steps = num_steps(n_rows, optim)
    need = steps * optim.batch_size
    order = []
    epoch = 0
    while sum(len(o) for o in order) < need:
        order.append(np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n_rows)))
        epoch += 1
    return np.concatenate(order)[:need].reshape(steps, optim.batch_size).astype(np.int32)


class TrainResult(NamedTuple):
    model: CausalLM
    history: list[dict[str, float]]


def _batch(data: TokenizedSet, idx: np.ndarray) -> dict[str, jax.Array]:
    return {"input_ids": jnp.asarray(data.input_ids[idx]),
            "attention_mask": jnp.asarray(data.attention_mask[idx]),
            "loss_mask": jnp.asarray(data.loss_mask[idx])}


def train_lm(model_config: ModelConfig, train: TokenizedSet, optim: OptimConfig, *, seed: int,
             init: CausalLM | None = None, log_every: int = 20, progress: bool = True,
             callback: Callable[[dict[str, float]], None] | None = None) -> TrainResult:
    """Train all weights of an LM on ``train`` rows (next-token cross-entropy on ``loss_mask``).

    Pretraining starts from ``init_model(model_config, seed)``; fine-tuning passes ``init``.
    Deterministic for a given (config, data, seed) on a given backend.
    """
    key = jax.random.key(seed)
    model = init if init is not None else init_model(model_config, seed=seed)
    graphdef, params = nnx.split(model, nnx.Param)
    schedule = batch_schedule(len(train), optim, key=jax.random.fold_in(key, 1))
    tx = make_optimizer(optim, len(schedule))
    opt_state = tx.init(params)

    def loss_fn(p, batch):
        logits = nnx.merge(graphdef, p)(batch["input_ids"], batch["attention_mask"])
        return mean_token_loss(logits, batch["input_ids"], batch["loss_mask"])

    @jax.jit
    def step(p, s, batch):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss, optax.tree.norm(grads)

    history: list[dict[str, float]] = []
    tokens_per_step = float(train.attention_mask[schedule[0]].sum()) if len(schedule) else 0.0
    bar = _progress(len(schedule), progress, "pretrain")
    t0 = time.perf_counter()
    compile_s = None
    for i, idx in enumerate(schedule):
        params, opt_state, loss, gnorm = step(params, opt_state, _batch(train, idx))
        if compile_s is None:
            loss.block_until_ready()
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
        last = i == len(schedule) - 1
        if i % log_every == 0 or last:
            loss_f = float(loss)
            if not math.isfinite(loss_f):
                raise NonFiniteLossError(
                    f"training loss is {loss_f} at step {i}; lower optim.learning_rate or check the "
                    f"data for empty rows (the last finite parameters are lost with this run)")
            elapsed = max(time.perf_counter() - t0, 1e-9)
            point = {"step": i, "loss": loss_f, "grad_norm": float(gnorm),
                     "tokens_per_s": (i * tokens_per_step / elapsed) if i else 0.0,
                     "compile_s": compile_s}
            history.append(point)
            if callback:
                callback(point)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_f:.3f}", tok_s=f"{point['tokens_per_s']:.0f}")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return TrainResult(nnx.merge(graphdef, params), history)


def evaluate_loss(model: CausalLM, data: TokenizedSet, *, batch_size: int = 64) -> float:
    """Token-weighted mean next-token loss of ``model`` on ``data``."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def nll(state, batch):
        logits = nnx.merge(graphdef, state)(batch["input_ids"], batch["attention_mask"])
        return sequence_nll(logits, batch["input_ids"], batch["loss_mask"])

    total, count = 0.0, 0.0
    for start in range(0, len(data), batch_size):
        idx = np.arange(start, min(start + batch_size, len(data)))
        # Pad the last batch to a fixed shape (rows with an all-zero loss mask add nothing).
        pad = batch_size - len(idx)
        batch = _batch(data, np.concatenate([idx, np.zeros(pad, np.int64)]))
        if pad:
            batch["loss_mask"] = batch["loss_mask"].at[-pad:].set(0)
        s, c = nll(state, batch)
        total += float(s.sum())
        count += float(c.sum())
    return total / max(count, 1.0)


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------
# The whole recipe
# ----------------------------------------------------------------------------------------------

class PretrainResult(NamedTuple):
    model: CausalLM
    tokenizer: Any
    corpus: Corpus
    history: list[dict[str, float]]
    heldout_loss: float
    sample: str
    out_dir: Path | None


# What pretrain writes (besides the HF model files); recipe.fingerprint is the demo's stamp of
# earlier versions, removed as stale.
PRETRAIN_FILES = ("recipe.yaml", "history.json", "split.json", "recipe.fingerprint")


def pretrain(cfg: PretrainConfig, out_dir: str | Path | None = None, *,
             progress: bool = True, overwrite: bool = False) -> PretrainResult:
    """Build the corpus, train a model from scratch, save it as an HF directory.

    ``out_dir`` receives ``config.json``, ``model.safetensors``, the tokenizer files,
    ``recipe.yaml`` (this config), ``history.json`` (loss curve), ``split.json`` (row ids of
    each split) and ``run.json`` (the stamp of :mod:`stride_jax.io.outdir`). A directory that
    already holds a model (other than one made by this same recipe) is refused before any work
    unless ``overwrite``, which first removes every model file of the old one.
    """
    from stride_jax.io.outdir import complete_output_dir, open_output_dir
    from stride_jax.model.generate import generate
    from stride_jax.model.hf import HF_MODEL_FILES, to_hf
    from stride_jax.tokenizer import as_backend, special_ids, vocab_size_of

    if out_dir is not None:
        open_output_dir(out_dir, "pretrain", {"recipe": to_dict(cfg)}, overwrite=overwrite,
                        artifacts=HF_MODEL_FILES + PRETRAIN_FILES)

    corpus = build_corpus(cfg.corpus)
    sp = special_ids(corpus.tokenizer)
    vocab = vocab_size_of(corpus.tokenizer)
    mcfg = model_config_for(cfg.arch, vocab, cfg.corpus.seq_len, bos_id=sp.bos_id,
                            eos_id=sp.eos_id, pad_id=sp.pad_id)
    log.info("pretraining %s params on %d rows x %d tokens", f"{mcfg.num_params():,}",
             len(corpus.train), cfg.corpus.seq_len)
    result = train_lm(mcfg, corpus.train, cfg.optim, seed=cfg.seed, log_every=cfg.log_every,
                      progress=progress)
    heldout_loss = (evaluate_loss(result.model, corpus.heldout) if len(corpus.heldout) else
                    float("nan"))
    backend = as_backend(corpus.tokenizer)
    prompt = backend.encode(cfg.sample_prompt, add_special_tokens=False).ids or [sp.filler_id]
    n_new = max(0, min(cfg.sample_tokens, mcfg.max_position_embeddings - len(prompt)))
    sample = backend.decode(generate(result.model, prompt, n_new))
    out = None
    if out_dir is not None:
        out = Path(out_dir)
        to_hf(result.model, out, tokenizer=corpus.tokenizer)
        dump_config(cfg, out / "recipe.yaml")
        from stride_jax.io.atomic import write_json
        # No held-out rows (heldout_fraction=0): null, never NaN, in the file.
        write_json(out / "history.json", {
            "history": result.history,
            "heldout_loss": heldout_loss if math.isfinite(heldout_loss) else None,
            "recipe": to_dict(cfg)}, indent=2)
        write_json(out / "split.json", {"train": corpus.train.ids, "heldout": corpus.heldout.ids})
        complete_output_dir(out)
    return PretrainResult(result.model, corpus.tokenizer, corpus, result.history, heldout_loss,
                          sample, out)


def finished_pretrain(out_dir: str | Path, cfg: PretrainConfig) -> bool:
    """Whether ``out_dir`` holds the finished model of recipe ``cfg`` (its ``run.json`` says so
    and the model's files are all there), so it can be loaded instead of retrained."""
    from stride_jax.io.outdir import read_run_stamp
    from stride_jax.io.stamps import canonical_payload
    out = Path(out_dir)
    stamp = read_run_stamp(out) or {}
    return (stamp.get("stage") == "pretrain" and bool(stamp.get("complete"))
            and stamp.get("payload") == canonical_payload({"recipe": to_dict(cfg)})
            and all((out / f).is_file() for f in ("config.json", "model.safetensors",
                                                  "tokenizer.json", "history.json")))


def format_loss_curve(history: list[dict[str, float]], width: int = 40) -> str:
    """A plain-text loss curve: one line per logged step with a bar proportional to the loss."""
    if not history:
        return "(no steps)"
    hi = max(p["loss"] for p in history)
    lo = min(p["loss"] for p in history)
    span = max(hi - lo, 1e-9)
    lines = []
    for p in history:
        n = 1 + int((p["loss"] - lo) / span * (width - 1))
        lines.append(f"step {p['step']:>6}  loss {p['loss']:7.4f}  " + "#" * n)
    return "\n".join(lines)
