"""Task (c), beyond language models: an MLP on scikit-learn's bundled digits, attributed in place.

The classifier ``x -> relu(W_1 x) -> ... -> relu(W_L h) -> W_out h`` (8x8 images scaled to
[0, 1], 10 classes) is trained by the shared recipe (:class:`stride_jax.tasks._retrain.Trainer`:
AdamW, warmup + cosine, fixed data order). STRIDE sees it through :class:`LMFunctions` as a
"language model" whose rows have one position: the input id of a row is the example's index into
the table of all images (training examples, then queries), the target is its label, the reader is
hidden layer ``l`` and the final hidden state is the last hidden layer. Retraining is cheap, so
this task affords many ground-truth subsets.
"""

from __future__ import annotations

import dataclasses


import jax
import jax.numpy as jnp
import numpy as np

from stride_jax.baselines.ekfac import TokenModel
from stride_jax.config import SEED_RANGE, check_ranges, option, to_dict
from stride_jax.data import TokenizedSet
from stride_jax.errors import ConfigError, MissingDependencyError
from stride_jax.model.taps import dense
from stride_jax.recipes.pretrain import OptimConfig
from stride_jax.steering import LMFunctions
from stride_jax.steering._adapter import params_fingerprint
from stride_jax.tasks._base import Task
from stride_jax.tasks._retrain import Trainer

_DIGITS_OPTIM = OptimConfig(learning_rate=3e-3, min_lr_ratio=0.1, warmup_steps=10,
                            weight_decay=1e-3, grad_clip=0.0, batch_size=32, epochs=20.0)


@dataclasses.dataclass(frozen=True)
class DigitsConfig:
    """The digits MLP and its data split."""

    num_train: int = option(1000, "training examples attributed (n)")
    num_queries: int = option(100, "test examples used as queries")
    hidden: tuple[int, ...] = option((128, 128), "hidden-layer widths")
    optim: OptimConfig = option(_DIGITS_OPTIM, "training recipe (shared by the retrains)")
    seed: int = option(0, "initialisation and data-order seed")
    split_seed: int = option(0, "seed of the train/query split")

    def __post_init__(self) -> None:
        extra = [("hidden", list(self.hidden), "must list widths >= 1")] \
            if any(h < 1 for h in self.hidden) else []
        check_ranges(self, {"num_train": ">= 2", "num_queries": ">= 1", "seed": SEED_RANGE,
                            "split_seed": SEED_RANGE}, extra=extra)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1797 images): ``X [N, 64]`` in [0, 1], ``y [N]``."""
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as e:
        raise MissingDependencyError(
            "the digits task needs scikit-learn (its bundled digits data): "
            "pip install -c constraints.txt -e .[eval]") from e
    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)


def init_mlp(sizes: tuple[int, ...], seed: int) -> dict[str, jax.Array]:
    """He-normal weights, zero biases; ``w{i}: [sizes[i], sizes[i+1]]``."""
    key = jax.random.key(seed)
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"w{i}"] = jax.random.normal(jax.random.fold_in(key, i), (a, b)) * np.sqrt(2.0 / a)
        params[f"b{i}"] = jnp.zeros((b,))
    return params


def _num_linear(params) -> int:
    return sum(1 for k in params if k.startswith("w"))


def _layer(params, i: int, h: jax.Array) -> jax.Array:
    # A named tap point (stride_jax.model.taps): K-FAC/EK-FAC read its input and output
    # gradient; otherwise exactly h @ w + b.
    return dense(f"w{i}", h, params[f"w{i}"], params[f"b{i}"])


def hidden_states(params, x: jax.Array) -> list[jax.Array]:
    """Post-activation hidden layers ``[h_1, ..., h_L]``."""
    hs, h = [], x
    for i in range(_num_linear(params) - 1):
        h = jax.nn.relu(_layer(params, i, h))
        hs.append(h)
    return hs


def head(params, h: jax.Array) -> jax.Array:
    return _layer(params, _num_linear(params) - 1, h)


def token_model(params) -> TokenModel:
    """The MLP as an EK-FAC :class:`TokenModel` over ``{"x": [n, 64], "y": [n]}`` examples: one
    position per example, its label the target, every dense layer tapped."""

    def logits(p, batch):
        return logits_fn(p, batch["x"])[:, None, :]

    def prepare(ex):
        x = np.asarray(ex["x"], np.float32)
        ones = np.ones((x.shape[0], 1), np.float32)
        return {"x": x, "targets": np.asarray(ex["y"], np.int32)[:, None], "loss_mask": ones,
                "token_mask": ones}

    return TokenModel(params, logits, prepare)


def logits_fn(params, x: jax.Array) -> jax.Array:
    return head(params, hidden_states(params, x)[-1])


def example_loss(params, example) -> jax.Array:
    """Cross-entropy of one example ``{"x": [64], "y": []}``."""
    logp = jax.nn.log_softmax(logits_fn(params, example["x"]))
    return -logp[example["y"]]


def batch_loss(params, batch) -> jax.Array:
    return jnp.mean(jax.vmap(example_loss, in_axes=(None, 0))(params, batch))


def mlp_functions(params, table_x: np.ndarray, layer: int) -> LMFunctions:
    """The MLP as :class:`LMFunctions`: rows ``[[index into table_x]]``, reader = hidden ``layer``."""
    table = jnp.asarray(table_x)
    depth = _num_linear(params) - 1
    if not 0 <= layer < depth:
        raise ConfigError(f"steering layer {layer} is out of range for an MLP with {depth} hidden "
                          f"layers (use 0 .. {depth - 1})")

    def features(p, ids, mask):
        hs = hidden_states(p, table[ids])
        return hs[layer], hs[-1]

    def upper(p, h_reader, ids, mask):
        h = h_reader
        for i in range(layer + 1, depth):
            h = jax.nn.relu(_layer(p, i, h))
        return h

    sizes = [params["w0"].shape[0]] + [params[f"w{i}"].shape[1] for i in range(depth + 1)]
    return LMFunctions(params=params, features=features, head=head, upper=upper,
                       d_reader=sizes[layer + 1], d_final=sizes[depth], vocab_size=sizes[-1],
                       max_len=1, layer=layer, num_layers=depth,
                       fingerprint=params_fingerprint(params), input_vocab_size=len(table_x))


def _rows(index: np.ndarray, labels: np.ndarray, names: list[str]) -> TokenizedSet:
    n = len(index)
    ones = np.ones((n, 1), np.int32)
    return TokenizedSet(ids=names, input_ids=index.reshape(n, 1).astype(np.int32),
                        attention_mask=ones, loss_mask=ones, source_ids=list(names),
                        targets=labels.reshape(n, 1).astype(np.int32))


def build_digits_task(cfg: DigitsConfig = DigitsConfig(), *, progress: bool = False) -> Task:
    """Split the digits, train the MLP on all ``num_train`` examples, and wire up retraining."""
    X, y = load_digits_arrays()
    if cfg.num_train < 2 or cfg.num_queries < 1 or cfg.num_train + cfg.num_queries > len(X):
        raise ConfigError(f"digits.num_train={cfg.num_train} + num_queries={cfg.num_queries} must "
                          f"fit in the {len(X)} images, with num_train >= 2 and num_queries >= 1")
    if not cfg.hidden or min(cfg.hidden) < 1:
        raise ConfigError(f"digits.hidden={cfg.hidden} needs at least one layer of width >= 1")
    perm = np.asarray(jax.random.permutation(jax.random.key(cfg.split_seed), len(X)))
    tr, qu = perm[: cfg.num_train], perm[cfg.num_train: cfg.num_train + cfg.num_queries]
    table = np.concatenate([X[tr], X[qu]])
    train_ex = {"x": X[tr], "y": y[tr]}
    query_ex = {"x": jnp.asarray(X[qu]), "y": jnp.asarray(y[qu])}

    def eval_fn(params):
        return jax.vmap(example_loss, in_axes=(None, 0))(params, query_ex)

    init = init_mlp((X.shape[1], *cfg.hidden, 10), cfg.seed)
    trainer = Trainer(batch_loss, init, train_ex, cfg.optim,
                      key=jax.random.fold_in(jax.random.key(cfg.seed), 1), eval_fn=eval_fn)
    params, _, ckpts, lrs = trainer.train(checkpoints=4)
    train_rows = _rows(np.arange(cfg.num_train), y[tr], [f"digit:{i}" for i in tr])
    query_rows = _rows(cfg.num_train + np.arange(cfg.num_queries), y[qu],
                       [f"digit:{i}" for i in qu])
    return Task(
        name="digits", train=train_rows, queries=query_rows,
        model=lambda layer: mlp_functions(params, table, layer), params=params,
        example_loss=example_loss, train_examples=train_ex,
        query_examples={k: np.asarray(v) for k, v in query_ex.items()},
        checkpoints=ckpts, checkpoint_lrs=lrs, retrain=trainer.retrain_losses,
        stamp={"task": "digits", "config": to_dict(cfg), "params": params_fingerprint(params)},
        num_layers=len(cfg.hidden), base_query_losses=np.asarray(eval_fn(params), np.float64),
        train_texts=[f"digit {int(v)} (image {i})" for i, v in zip(tr, y[tr])],
        query_texts=[f"digit {int(v)} (image {i})" for i, v in zip(qu, y[qu])],
        token_model=token_model(params))


def accuracy(params, x: np.ndarray, y: np.ndarray) -> float:
    return float(jnp.mean(jnp.argmax(logits_fn(params, jnp.asarray(x)), -1) == jnp.asarray(y)))


__all__ = ["DigitsConfig", "build_digits_task", "mlp_functions", "example_loss", "accuracy",
           "load_digits_arrays", "init_mlp"]

