"""Representation-similarity baseline: cosine between mean-pooled hidden states.

:func:`pooled_features` runs a model's ``features`` function (the signature of
:attr:`stride_jax.steering.LMFunctions.features`) in fixed-shape batches and mean-pools one of its
outputs over the positions selected by a weight mask; :func:`cosine_scores` compares the pooled
query and training vectors. Scores are ``[Q, n]`` float32 in [-1, 1], larger meaning more similar.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax.errors import DataError

__all__ = ["cosine_scores", "pooled_features"]

FeaturesFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    # A zero vector has no direction; dividing by 1 keeps it zero so its cosines are 0, not NaN.
    return x / np.where(norm > 0, norm, 1.0)


def cosine_scores(feats_query: np.ndarray, feats_train: np.ndarray, *,
                  chunk_size: int = 8192) -> np.ndarray:
    """Cosine similarity ``<u_q, v_i> / (||u_q|| ||v_i||)`` of every query and training row.

    ``feats_query [Q, D]`` and ``feats_train [n, D]`` give ``[Q, n]`` float32; a zero vector gives
    0. Training rows are normalised ``chunk_size`` at a time, so extra memory is
    O(chunk_size * D) beyond the inputs and the output.
    """
    u = np.asarray(feats_query, np.float32)
    v = np.asarray(feats_train)
    if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[1]:
        raise DataError(f"feats_query must be [Q, D] and feats_train [n, D] with the same D; got "
                        f"{u.shape} and {v.shape}")
    if chunk_size < 1:
        raise DataError(f"chunk_size must be >= 1 (got {chunk_size})")
    u = _unit_rows(u)
    out = np.empty((u.shape[0], v.shape[0]), np.float32)
    for s in range(0, v.shape[0], chunk_size):
        out[:, s:s + chunk_size] = u @ _unit_rows(np.asarray(v[s:s + chunk_size], np.float32)).T
    return out


@functools.partial(jax.jit, static_argnames=("features_fn", "which"))
def _pool(params, ids_bl, att_bl, w_bl, *, features_fn: FeaturesFn,
          which: Literal["final", "reader"]) -> jax.Array:
    h_reader, h_final = features_fn(params, ids_bl, att_bl)
    h_bld = (h_final if which == "final" else h_reader).astype(jnp.float32)
    w_bl = w_bl.astype(jnp.float32)
    total_b = w_bl.sum(1, keepdims=True)
    # Pooling on device so only [b, D] crosses to the host; rows with no weight pool to zero.
    return jnp.einsum("bl,bld->bd", w_bl, h_bld) / jnp.where(total_b > 0, total_b, 1.0)


def pooled_features(features_fn: FeaturesFn, params: Any, input_ids: np.ndarray,
                    attention_mask: np.ndarray, weight_mask: np.ndarray, *, batch_size: int = 64,
                    which: Literal["final", "reader"] = "final") -> np.ndarray:
    """Weighted mean over positions of one output of ``features_fn``, ``[N, D]`` float32.

        pooled[i] = sum_t w[i, t] h[i, t] / sum_t w[i, t]      (0 where sum_t w[i, t] = 0)

    where ``(h_reader, h_final) = features_fn(params, input_ids, attention_mask)`` and ``h`` is
    ``h_final`` (``which="final"``) or ``h_reader``. Rows run in batches of
    ``min(batch_size, N)``; the last batch is filled by wrapping around to the first rows, so the
    jitted function compiles once per (``features_fn``, shapes) and results do not depend on
    ``batch_size``.
    """
    if which not in ("final", "reader"):
        raise DataError(f"which must be 'final' or 'reader' (got {which!r})")
    ids = np.asarray(input_ids)
    att = np.asarray(attention_mask)
    w = np.asarray(weight_mask)
    if ids.ndim != 2 or att.shape != ids.shape or w.shape != ids.shape:
        raise DataError(f"input_ids, attention_mask and weight_mask must all be [N, L]; got "
                        f"{ids.shape}, {att.shape} and {w.shape}")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1 (got {batch_size})")
    n = ids.shape[0]
    if n == 0:
        raise DataError("no rows to pool (N = 0)")
    b = min(batch_size, n)
    chunks = []
    for s in range(0, n, b):
        idx = np.arange(s, s + b) % n
        pooled = _pool(params, ids[idx], att[idx], w[idx], features_fn=features_fn, which=which)
        chunks.append(np.asarray(pooled)[: min(b, n - s)])
    return np.concatenate(chunks).astype(np.float32, copy=False)
