"""Tasks (a) and (b): a small language model pretrained from scratch, and one fine-tuned.

(a) ``pretrain``: a decoder pretrained from scratch on two embedded plays; queries are held-out
rows of the same plays; ground truth retrains from the same initialisation and data-order key on
subsets of the training rows.

(b) ``finetune``: the model of (a), trained on all of its rows, is the fixed base; it is fine-tuned
on a distinct corpus (Shakespeare's poems: the sonnets, "A Lover's Complaint" and "The Rape of
Lucrece", which differ from the plays in form and vocabulary), with queries from held-out poem
rows; ground truth fine-tunes the same base on subsets of the poem rows.

Both are sized to retrain in seconds on a CPU (the paper's models are larger; the recipe is
the same). Every model, including the attributed one, is trained by the one code path of
:class:`stride_jax.tasks._retrain.Trainer`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stride_jax.config import SEED_RANGE, check_ranges, option, to_dict
from stride_jax.data import TokenizedSet, shakespeare_plays, split_ids, tokenize_documents
from stride_jax.errors import ConfigError
from stride_jax.model import init_model
from stride_jax.model.loss import mean_token_loss, sequence_nll
from stride_jax.recipes.pretrain import (ArchConfig, CorpusConfig, OptimConfig, build_corpus,
                                         model_config_for)
from stride_jax.steering._adapter import params_fingerprint
from stride_jax.tasks._base import Task
from stride_jax.tasks._retrain import Trainer

_ARCH = ArchConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   intermediate_size=256)
_CORPUS = CorpusConfig(plays=("hamlet", "macbeth"), seq_len=64, heldout_fraction=0.05,
                       vocab_size=1024)
_OPTIM = OptimConfig(learning_rate=3e-3, warmup_steps=10, batch_size=32, epochs=4.0)
_FT_OPTIM = OptimConfig(learning_rate=1e-3, warmup_steps=5, weight_decay=0.0, batch_size=16,
                        epochs=3.0)


@dataclasses.dataclass(frozen=True)
class PretrainTaskConfig:
    """Task (a): pretraining from scratch (small enough to retrain hundreds of times on a CPU)."""

    arch: ArchConfig = option(_ARCH, "model architecture")
    corpus: CorpusConfig = option(_CORPUS, "training text; queries are its held-out rows")
    optim: OptimConfig = option(_OPTIM, "the recipe (shared by every retrain)")
    seed: int = option(0, "initialisation and data-order seed")
    num_queries: int = option(50, "held-out rows used as queries (at most all of them)")

    def __post_init__(self) -> None:
        check_ranges(self, {"seed": SEED_RANGE, "num_queries": ">= 1"})


@dataclasses.dataclass(frozen=True)
class FinetuneTaskConfig:
    """Task (b): the pretraining task's model fine-tuned on a distinct corpus."""

    base: PretrainTaskConfig = option(PretrainTaskConfig(), "the base model's pretraining")
    works: tuple[str, ...] = option(("sonnets", "lovers_complaint", "rape_of_lucrece"),
                                    "embedded works fine-tuned on (poems, unlike the plays)")
    heldout_fraction: float = option(0.1, "fraction of fine-tuning rows held out as queries")
    optim: OptimConfig = option(_FT_OPTIM, "fine-tuning recipe (shared by every retrain)")
    seed: int = option(0, "data-order seed of fine-tuning")
    num_queries: int = option(50, "held-out rows used as queries")

    def __post_init__(self) -> None:
        check_ranges(self, {"heldout_fraction": "in (0, 1)", "seed": SEED_RANGE,
                            "num_queries": ">= 1"})


def _row_data(rows: TokenizedSet) -> dict[str, np.ndarray]:
    return {"input_ids": rows.input_ids, "attention_mask": rows.attention_mask,
            "loss_mask": rows.loss_mask}


def _lm_functions(graphdef):
    def batch_loss(params, batch):
        logits = nnx.merge(graphdef, params)(batch["input_ids"], batch["attention_mask"])
        return mean_token_loss(logits, batch["input_ids"], batch["loss_mask"])

    def example_loss(params, ex):
        return batch_loss(params, jax.tree.map(lambda a: a[None], ex))

    def row_losses(params, rows):
        logits = nnx.merge(graphdef, params)(rows["input_ids"], rows["attention_mask"])
        total, count = sequence_nll(logits, rows["input_ids"], rows["loss_mask"])
        return total / jnp.maximum(count, 1.0)

    return batch_loss, example_loss, row_losses


def _first_queries(rows: TokenizedSet, k: int) -> TokenizedSet:
    keep = [i for i in range(len(rows)) if rows.loss_mask[i].sum() > 0][:k]
    if not keep:
        raise ConfigError("no held-out rows to use as queries; raise heldout_fraction")
    return rows.subset(keep)


def _texts(tok, rows: TokenizedSet) -> list[str]:
    from stride_jax.tokenizer import as_backend
    backend = as_backend(tok)
    return [backend.decode([int(t) for t, m in zip(r, a) if m]) for r, a in
            zip(rows.input_ids, rows.attention_mask)]


def _docs(rows: TokenizedSet) -> list[np.ndarray]:
    return [r[a > 0] for r, a in zip(rows.input_ids, rows.attention_mask)]


def _make_task(name, *, graphdef, init_params, train, queries, optim, seed, stamp, num_layers,
               tok) -> Task:
    batch_loss, example_loss, row_losses = _lm_functions(graphdef)
    query_data = jax.tree.map(jnp.asarray, _row_data(queries))
    eval_fn = lambda p: row_losses(p, query_data)  # noqa: E731
    trainer = Trainer(batch_loss, init_params, _row_data(train), optim,
                      key=jax.random.fold_in(jax.random.key(seed), 1), eval_fn=eval_fn)
    params, _, ckpts, lrs = trainer.train(checkpoints=4)
    model = nnx.merge(graphdef, params)
    stamp = dict(stamp, params=params_fingerprint(params))
    return Task(name=name, train=train, queries=queries, model=model, params=params,
                example_loss=example_loss, train_examples=_row_data(train),
                query_examples=_row_data(queries), checkpoints=ckpts, checkpoint_lrs=lrs,
                retrain=trainer.retrain_losses, stamp=stamp, num_layers=num_layers,
                base_query_losses=np.asarray(eval_fn(params), np.float64),
                train_texts=_texts(tok, train), query_texts=_texts(tok, queries),
                train_docs=_docs(train), query_docs=_docs(queries))


def _pretrain_parts(cfg: PretrainTaskConfig):
    from stride_jax.tokenizer import special_ids, vocab_size_of
    corpus = build_corpus(cfg.corpus)
    sp = special_ids(corpus.tokenizer)
    mcfg = model_config_for(cfg.arch, vocab_size_of(corpus.tokenizer), cfg.corpus.seq_len,
                            bos_id=sp.bos_id, eos_id=sp.eos_id, pad_id=sp.pad_id)
    graphdef, init_params = nnx.split(init_model(mcfg, seed=cfg.seed), nnx.Param)
    return corpus, mcfg, graphdef, init_params


def build_pretrain_task(cfg: PretrainTaskConfig = PretrainTaskConfig()) -> Task:
    """Task (a); see the module docstring."""
    corpus, mcfg, graphdef, init_params = _pretrain_parts(cfg)
    queries = _first_queries(corpus.heldout, cfg.num_queries)
    return _make_task("pretrain", graphdef=graphdef, init_params=init_params, train=corpus.train,
                      queries=queries, optim=cfg.optim, seed=cfg.seed,
                      stamp={"task": "pretrain", "config": to_dict(cfg)},
                      num_layers=mcfg.num_layers, tok=corpus.tokenizer)


def build_finetune_task(cfg: FinetuneTaskConfig = FinetuneTaskConfig()) -> Task:
    """Task (b); see the module docstring."""
    corpus, mcfg, graphdef, init_params = _pretrain_parts(cfg.base)
    base = Trainer(_lm_functions(graphdef)[0], init_params, _row_data(corpus.train),
                   cfg.base.optim, key=jax.random.fold_in(jax.random.key(cfg.base.seed), 1),
                   eval_fn=lambda p: jnp.zeros(()))
    base_params = base.train(checkpoints=1)[0]
    docs = shakespeare_plays(list(cfg.works))
    rows = tokenize_documents(docs, corpus.tokenizer, cfg.base.corpus.seq_len, mode="chunk")
    parts = split_ids(rows.ids, {"train": 1.0 - cfg.heldout_fraction,
                                 "heldout": cfg.heldout_fraction}, seed=cfg.seed)
    train = rows.subset(sorted(parts["train"]))
    queries = _first_queries(rows.subset(sorted(parts["heldout"])), cfg.num_queries)
    return _make_task("finetune", graphdef=graphdef, init_params=base_params, train=train,
                      queries=queries, optim=cfg.optim, seed=cfg.seed,
                      stamp={"task": "finetune", "config": to_dict(cfg),
                             "base": params_fingerprint(base_params)},
                      num_layers=mcfg.num_layers, tok=corpus.tokenizer)
