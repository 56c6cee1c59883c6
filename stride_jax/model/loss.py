"""Next-token log-likelihoods and losses, computed in float32.

Conventions (shared with :class:`stride_jax.data.TokenizedSet`): with logits ``[b, L, V]`` and
``input_ids [b, L]``, position ``t`` predicts token ``t + 1``; ``loss_mask[:, t]`` weights that
prediction, so the last column never counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_logprobs(logits_btv: jax.Array, input_ids_bt: jax.Array) -> jax.Array:
    r"""``[b, L-1]`` log p(x_{t+1} | x_{<=t}) by a float32 log-softmax (stable for tiny differences)."""
    logp = jax.nn.log_softmax(logits_btv[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, input_ids_bt[:, 1:, None], axis=-1)[..., 0]


def sequence_nll(logits_btv: jax.Array, input_ids_bt: jax.Array,
                 loss_mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row summed negative log-likelihood of the scored targets and their count, both ``[b]``."""
    w = loss_mask_bt[:, :-1].astype(jnp.float32)
    nll = -next_token_logprobs(logits_btv, input_ids_bt) * w
    return nll.sum(axis=1), w.sum(axis=1)


def mean_token_loss(logits_btv: jax.Array, input_ids_bt: jax.Array,
                    loss_mask_bt: jax.Array) -> jax.Array:
    """Token-weighted mean cross-entropy over the batch (0 when nothing is scored)."""
    total, count = sequence_nll(logits_btv, input_ids_bt, loss_mask_bt)
    return total.sum() / jnp.maximum(count.sum(), 1.0)
