"""Greedy / temperature sampling without a KV cache (for demos and sanity checks, not serving).

The whole buffer of ``len(prompt) + max_new_tokens`` tokens is run at every step, so one jitted
function serves every step (no recompilation as the text grows); causal masking makes the
not-yet-written tail irrelevant to the next token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stride_jax.errors import ConfigError, ModelError
from stride_jax.model.transformer import CausalLM


def generate(model: CausalLM, prompt_ids: list[int], max_new_tokens: int, *,
             temperature: float = 0.0, key: jax.Array | None = None,
             stop_id: int | None = None) -> list[int]:
    """Continue ``prompt_ids`` by up to ``max_new_tokens`` tokens; greedy when ``temperature == 0``."""
    if not prompt_ids:
        raise ModelError("generate needs a non-empty prompt")
    total = len(prompt_ids) + max_new_tokens
    limit = model.config.max_position_embeddings
    if total > limit:
        raise ModelError(f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's context of {limit} tokens")
    if temperature > 0 and key is None:
        raise ConfigError("sampling with temperature > 0 needs an explicit PRNG key")
    graphdef, state = nnx.split(model)

    @jax.jit
    def next_logits(state, buf, pos):
        logits = nnx.merge(graphdef, state)(buf[None])[0]
        return jax.lax.dynamic_index_in_dim(logits, pos, axis=0, keepdims=False)

    buf = np.zeros(total, dtype=np.int32)
    buf[: len(prompt_ids)] = prompt_ids
    out = list(prompt_ids)
    for step, pos in enumerate(range(len(prompt_ids) - 1, total - 1)):
        logits = next_logits(state, jnp.asarray(buf), pos)
        if temperature > 0:
            tok = int(jax.random.categorical(jax.random.fold_in(key, step), logits / temperature))
        else:
            tok = int(jnp.argmax(logits))
        buf[pos + 1] = tok
        out.append(tok)
        if stop_id is not None and tok == stop_id:
            break
    return out
