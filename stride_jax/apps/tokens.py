"""Per-token attribution: which of a query's tokens each of its top training examples moved.

The operators' responses exist per token: ``y[q, t, k]`` is the change of the log-probability of
query ``q``'s target token ``t`` under subset ``k``'s operator, and the query-level response is
their mean over the scored tokens, ``y[q, k] = mean_t y[q, t, k]``. For the examples ``L`` listed
for a query (its top proponents and opponents), the per-token effect is the least-squares refit
of the per-token responses on those examples' membership columns, with a per-token intercept:

.. math::
    E_{\\cdot t} = \\arg\\min_{e, b} \\| y_{q t \\cdot} - M_{\\cdot L}\\, e - b \\mathbf 1 \\|^2
                 + \\gamma \\|e\\|^2 ,\\qquad \\gamma = 10^{-6} \\operatorname{tr}(X^T X) / |L|

with ``X`` the centred ``M[:, L]``. The map is linear in ``y``, so the mean of ``E[i, t]`` over
scored tokens equals the same refit of the query-level responses: the per-token effects of an
example add up to its (refitted) query-level effect, and ``E[i, t] > 0`` means training on ``i``
raised token ``t``'s log-probability.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from stride_jax.errors import DataError
from stride_jax.subsets import Design

__all__ = ["token_effects", "token_report"]


def token_effects(design: Design, y_tk: np.ndarray, examples: Sequence[int], *,
                  ridge: float = 1e-6) -> np.ndarray:
    """``[len(examples), T]`` per-token effects of ``examples`` on one query (module docstring).

    Args:
      design: the membership design (K subsets).
      y_tk: ``[T, K]`` per-token responses of one query (zeros at unscored positions stay zero).
      examples: training-example indices to attribute the tokens to.
    """
    y_tk = np.asarray(y_tk, np.float64)
    if y_tk.ndim != 2 or y_tk.shape[1] != design.num_subsets:
        raise DataError(f"per-token responses have shape {y_tk.shape}; expected [tokens, "
                        f"{design.num_subsets}] for this design")
    ex = np.asarray(list(examples), np.int64)
    if ex.size == 0:
        return np.zeros((0, y_tk.shape[0]))
    if ex.min() < 0 or ex.max() >= design.num_examples:
        raise DataError(f"example indices must lie in [0, {design.num_examples})")
    X = np.zeros((design.num_subsets, ex.size))
    for j, i in enumerate(ex):
        X[design.subsets_of(int(i)), j] = 1.0
    Xc = X - X.mean(0)
    Yc = y_tk.T - y_tk.T.mean(0)                         # [K, T]
    gram = Xc.T @ Xc
    gamma = ridge * max(np.trace(gram) / ex.size, 1e-30)
    return np.linalg.solve(gram + gamma * np.eye(ex.size), Xc.T @ Yc)


def token_report(design: Design, y_qtk: np.ndarray, base_logprob_qt: np.ndarray,
                 loss_mask_qt: np.ndarray, target_ids_qt: np.ndarray, query_ids: Sequence[str],
                 listed: Sequence[Sequence[tuple[int, str]]], train_ids: Sequence[str],
                 decode: Any) -> dict:
    """The ``tokens.json`` payload: per query, its scored tokens and each listed example's effect.

    Args:
      listed: per query, ``(example_index, kind)`` pairs, kind ``'proponent'`` or ``'opponent'``.
      decode: ``list[int] -> str`` (the tokenizer's decode), applied to one target id at a time.
    """
    out = []
    for q, qid in enumerate(query_ids):
        pos = np.flatnonzero(np.asarray(loss_mask_qt[q]) > 0)
        pairs = list(listed[q])
        eff = token_effects(design, np.asarray(y_qtk[q])[pos], [i for i, _ in pairs])
        out.append({
            "query_id": str(qid),
            "tokens": [decode([int(target_ids_qt[q, t])]) for t in pos],
            "base_logprob": [float(v) for v in np.asarray(base_logprob_qt[q])[pos]],
            "examples": [{"id": str(train_ids[i]), "index": int(i), "kind": kind,
                          "effect": [float(v) for v in eff[j]]}
                         for j, (i, kind) in enumerate(pairs)],
        })
    return {"queries": out, "method": "per-token least-squares refit of the operators' "
                                      "per-token responses on the listed examples"}
