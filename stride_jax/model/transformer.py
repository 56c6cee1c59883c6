"""The decoder-only causal LM, with named activation sites where steering plugs in.

Activation sites (names used by ``hooks`` and ``capture``):

* ``"residual.{i}"`` for ``i in range(num_layers)``: the residual stream *after* block ``i``
  (HF's ``hidden_states[i + 1]`` before the final norm);
* ``"final_hidden"``: the final hidden state after the final norm, i.e. what the unembedding reads;
* ``"logits"``: the output logits.

A hook is a function ``h -> h'`` applied at its site; the modified value flows on through the rest
of the network. Hooks are plain Python callables closed over whatever (steering) parameters they
need, so ``jax.vmap`` over those parameters broadcasts the base weights instead of copying them.

The forward pass is also exposed in pieces (``embed``, ``run_layers``, ``head``) so that a stage
which cached the residual stream at layer ``l`` can run only the frozen upper layers.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from stride_jax.errors import ModelError
from stride_jax.model._layers import Block, Dense, Norm, attention_mask_bqk, rope_cos_sin, _normal
from stride_jax.model.config import ModelConfig

Hook = Callable[[jax.Array], jax.Array]


class ForwardOutput(NamedTuple):
    logits: jax.Array
    activations: dict[str, jax.Array]


def site_names(config: ModelConfig) -> list[str]:
    """All activation sites of a model, in forward order."""
    return [f"residual.{i}" for i in range(config.num_layers)] + ["final_hidden", "logits"]


def _check_sites(config: ModelConfig, names) -> None:
    valid = set(site_names(config))
    bad = [n for n in names if n not in valid]
    if bad:
        raise ModelError(f"unknown activation site(s) {bad}; valid sites are 'residual.0' .. "
                         f"'residual.{config.num_layers - 1}', 'final_hidden', 'logits'")


class Context(NamedTuple):
    """Per-batch tensors shared by all blocks: the attention mask and the rotary tables."""

    mask_bqk: jax.Array
    rope: tuple[jax.Array, jax.Array] | None


class CausalLM(nnx.Module):
    """Llama / Qwen2 / GPT-2 decoder (see :class:`ModelConfig` for the per-family switches).

    ``model(input_ids, attention_mask=None) -> logits`` of shape (batch, seq, vocab), float32.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Param(_normal(rngs, (config.vocab_size, config.hidden_size),
                                              config.params_dtype))
        self.embed_positions = (
            nnx.Param(_normal(rngs, (config.max_position_embeddings, config.hidden_size),
                              config.params_dtype))
            if config.position == "learned" else None)
        self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = Norm(config.hidden_size, config=config)
        self.lm_head = (None if config.tie_word_embeddings else
                        Dense(config.hidden_size, config.vocab_size, use_bias=False, config=config,
                              rngs=rngs))

    # Pieces of the forward pass ---------------------------------------------------------------
    def context(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                positions: jax.Array | None = None,
                segment_ids: jax.Array | None = None) -> tuple[Context, jax.Array]:
        """Mask and rotary tables for a batch; returns (context, positions)."""
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        rope = rope_cos_sin(positions, self.config) if self.config.position == "rope" else None
        return Context(attention_mask_bqk(attention_mask, segment_ids, b, t), rope), positions

    def embed(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        """Token (+ learned position) embeddings, (batch, seq, d) in the compute dtype."""
        dt = self.config.compute_dtype
        h = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(dt)
        if self.embed_positions is not None:
            h = h + jnp.take(self.embed_positions[...], positions, axis=0).astype(dt)
        return h

    def run_layers(self, h: jax.Array, ctx: Context, start: int = 0, stop: int | None = None, *,
                   hooks: Mapping[str, Hook] | None = None,
                   capture: Sequence[str] = (), activations: dict | None = None) -> jax.Array:
        """Run blocks ``start .. stop-1`` on the residual stream ``h`` (the input of block ``start``)."""
        stop = self.config.num_layers if stop is None else stop
        hooks = hooks or {}
        for i in range(start, stop):
            h = self.layers[i](h, ctx.mask_bqk, ctx.rope)
            name = f"residual.{i}"
            if name in hooks:
                h = hooks[name](h)
            if activations is not None and name in capture:
                activations[name] = h
        return h

    def head(self, h: jax.Array, *, hooks: Mapping[str, Hook] | None = None,
             capture: Sequence[str] = (), activations: dict | None = None) -> jax.Array:
        """Final norm and unembedding of the last residual stream; float32 logits."""
        hooks = hooks or {}
        h = self.final_norm(h)
        if "final_hidden" in hooks:
            h = hooks["final_hidden"](h)
        if activations is not None and "final_hidden" in capture:
            activations["final_hidden"] = h
        logits = self.unembed(h)
        if "logits" in hooks:
            logits = hooks["logits"](logits)
        if activations is not None and "logits" in capture:
            activations["logits"] = logits
        return logits

    def unembed(self, h_final: jax.Array) -> jax.Array:
        """Logits from a final hidden state (already normed); float32."""
        dt = self.config.compute_dtype
        if self.lm_head is None:
            w = self.embed_tokens[...].astype(dt)
            logits = jnp.einsum("btd,vd->btv", h_final.astype(dt), w,
                                preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("btd,dv->btv", h_final.astype(dt), self.lm_head.kernel[...].astype(dt),
                                preferred_element_type=jnp.float32)
        return logits.astype(jnp.float32)

    # Whole forward pass -----------------------------------------------------------------------
    def forward(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                hooks: Mapping[str, Hook] | None = None,
                capture: Sequence[str] = ()) -> ForwardOutput:
        """Forward pass returning logits and the captured activations.

        Args:
          input_ids: int (batch, seq).
          attention_mask: optional (batch, seq), 1 on real tokens, 0 on padding. Padding keys are
            never attended to; outputs at padding positions are meaningless.
          positions: optional (batch, seq) position ids (default ``arange(seq)``; pass per-segment
            positions for packed batches).
          segment_ids: optional (batch, seq) ids of packed documents; attention stays within a
            segment.
          hooks: site name -> function modifying the activation there.
          capture: site names whose (post-hook) activations are returned.
        """
        _check_sites(self.config, list(hooks or {}) + list(capture))
        if input_ids.ndim != 2:
            raise ModelError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
        t = input_ids.shape[1]
        if self.config.position == "learned" and t > self.config.max_position_embeddings:
            raise ModelError(f"sequence length {t} exceeds the model's context "
                             f"({self.config.max_position_embeddings} positions)")
        ctx, positions = self.context(input_ids, attention_mask, positions=positions,
                                      segment_ids=segment_ids)
        acts: dict[str, jax.Array] = {}
        h = self.embed(input_ids, positions)
        h = self.run_layers(h, ctx, hooks=hooks, capture=capture, activations=acts)
        logits = self.head(h, hooks=hooks, capture=capture, activations=acts)
        return ForwardOutput(logits, acts)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, **kw) -> jax.Array:
        return self.forward(input_ids, attention_mask, **kw).logits


def init_model(config: ModelConfig, *, seed: int = 0) -> CausalLM:
    """A randomly initialised model (normal(0, 0.02) weights, unit norms), deterministic in ``seed``."""
    return CausalLM(config, rngs=nnx.Rngs(params=seed))


def abstract_model(config: ModelConfig) -> CausalLM:
    """The model with shape/dtype placeholders instead of arrays (no memory allocated)."""
    return nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(params=0)))
