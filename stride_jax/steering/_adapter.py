"""What STRIDE needs from a language model, as pure functions over its parameters.

STRIDE never changes the base model; it needs three functions of it:

* ``features(params, input_ids, attention_mask) -> (h_reader [b, t, D], h_final [b, t, d])``:
  the activation at the reader layer and the final hidden state (what the head reads);
* ``head(params, h_final) -> logits [b, t, V]``: the unembedding, which must be affine in
  ``h_final`` for the ``final_hidden`` site;
* ``upper(params, h_reader, input_ids, attention_mask) -> h_final``: the frozen layers above the
  reader layer (only for the ``residual`` site).

:func:`from_causal_lm` builds them for stride-jax's own :class:`CausalLM`; any other JAX model
(Flax, Equinox, levanter, MaxText) can be attributed in place by filling a :class:`LMFunctions`
with its own params and functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from stride_jax.errors import ConfigError
from stride_jax.io.stamps import pytree_fingerprint
from stride_jax.model.transformer import CausalLM


@dataclasses.dataclass(frozen=True)
class LMFunctions:
    """A frozen LM as parameters plus pure functions (see the module docstring)."""

    params: Any
    features: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
    head: Callable[[Any, jax.Array], jax.Array]
    upper: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array] | None
    d_reader: int
    d_final: int
    vocab_size: int
    max_len: int
    layer: int
    num_layers: int
    fingerprint: str | None = None
    input_vocab_size: int | None = None   # when inputs index another table than the outputs

    def with_fingerprint(self) -> "LMFunctions":
        """This LM with ``fingerprint`` filled in: the one given, or else the hash of every
        parameter value (:func:`params_fingerprint`)."""
        if self.fingerprint:
            return self
        return dataclasses.replace(self, fingerprint=params_fingerprint(self.params))


def from_causal_lm(model: CausalLM, layer: int) -> LMFunctions:
    """Wrap a stride-jax :class:`CausalLM` with the reader at the residual stream after ``layer``."""
    c = model.config
    if not 0 <= layer < c.num_layers:
        raise ConfigError(f"steering layer {layer} is out of range for a {c.num_layers}-block model "
                          f"(use 0 .. {c.num_layers - 1})")
    graphdef, state = nnx.split(model)

    def features(params, input_ids, attention_mask):
        m = nnx.merge(graphdef, params)
        ctx, pos = m.context(input_ids, attention_mask)
        h = m.embed(input_ids, pos)
        h_reader = m.run_layers(h, ctx, 0, layer + 1)
        h_top = m.run_layers(h_reader, ctx, layer + 1)
        return h_reader, m.final_norm(h_top)

    def head(params, h_final):
        return nnx.merge(graphdef, params).unembed(h_final)

    def upper(params, h_reader, input_ids, attention_mask):
        m = nnx.merge(graphdef, params)
        ctx, _ = m.context(input_ids, attention_mask)
        return m.final_norm(m.run_layers(h_reader, ctx, layer + 1))

    return LMFunctions(params=state, features=features, head=head, upper=upper,
                       d_reader=c.hidden_size, d_final=c.hidden_size, vocab_size=c.vocab_size,
                       max_len=c.max_position_embeddings, layer=layer, num_layers=c.num_layers)


def params_fingerprint(params: Any) -> str:
    """Content hash of a parameter pytree: every value (:func:`stride_jax.io.stamps.pytree_fingerprint`)."""
    return pytree_fingerprint(params)


def logit_shift(lm: LMFunctions, site: str, shift_btc: jax.Array) -> jax.Array:
    """Logit change caused by a shift at a linear site (``logits`` or ``final_hidden``)."""
    if site == "logits":
        return shift_btc
    if site == "final_hidden":
        # head is affine: head(h + s) - head(h) = head(s) - head(0), computed without cancellation.
        d = shift_btc.shape[-1]
        bias = lm.head(lm.params, jnp.zeros((1, 1, d), shift_btc.dtype))[0, 0]
        flat = lm.head(lm.params, shift_btc.reshape(1, -1, d))[0] - bias
        return flat.reshape(*shift_btc.shape[:-1], flat.shape[-1])
    raise ConfigError(f"site {site!r} is not linear in the logits")
