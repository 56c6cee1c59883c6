"""What an evaluation task hands to STRIDE, to the baselines and to the ground truth."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from stride_jax.data import TokenizedSet


@dataclasses.dataclass
class Task:
    """A trained model, its training examples and queries, and how to retrain it.

    Attributes:
      name: task name (``digits``, ``pretrain``, ``finetune``).
      train, queries: rows in STRIDE's format (one row = one attributed example / one query).
      model: what :class:`stride_jax.attributor.Attributor` takes: a ``CausalLM``, or a function
        ``layer -> LMFunctions`` for models attributed in place (the digits MLP).
      params: the attributed model's parameters (gradient baselines differentiate these).
      example_loss: ``(params, example) -> scalar`` for one example (no batch axis); the query
        loss of the ground truth is the same function on the query examples.
      train_examples, query_examples: pytrees with a leading example axis for ``example_loss``.
      checkpoints, checkpoint_lrs: intermediate parameters and their learning rates (TracIn).
      retrain: ``[p, m]`` subset indices -> ``[p, Q]`` query losses of retrained models.
      stamp: what identifies the task (recipe and data fingerprints) for stage stamps.
      num_layers: depth available to the steering reader.
      train_texts, query_texts: human-readable examples (reports), or None.
      train_docs, query_docs: token-id sequences for lexical baselines (BM25), or None.
      token_model: the model as a :class:`stride_jax.baselines.ekfac.TokenModel` for K-FAC /
        EK-FAC, or None (a ``CausalLM`` model is adapted automatically).
    """

    name: str
    train: TokenizedSet
    queries: TokenizedSet
    model: Any
    params: Any
    example_loss: Callable[[Any, Any], Any]
    train_examples: Any
    query_examples: Any
    checkpoints: list
    checkpoint_lrs: list[float]
    retrain: Callable[[np.ndarray], np.ndarray]
    stamp: dict
    num_layers: int
    base_query_losses: np.ndarray
    train_texts: list[str] | None = None
    query_texts: list[str] | None = None
    train_docs: list[np.ndarray] | None = None
    query_docs: list[np.ndarray] | None = None
    token_model: Any = None

    @property
    def n(self) -> int:
        return len(self.train)

    @property
    def num_queries(self) -> int:
        return len(self.queries)
