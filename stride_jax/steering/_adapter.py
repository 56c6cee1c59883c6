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
    fingerprint: str = ""
    input_vocab_size: int | None = None   # when inputs index another table than the outputs
    # ``features_as(dtype)``: ``features`` with the layers computing in another dtype (e.g.
    # "bfloat16") over the same params; None when the model cannot (a foreign LMFunctions).
    features_as: Callable[[str], Callable] | None = None


def from_causal_lm(model: CausalLM, layer: int) -> LMFunctions:
    """Wrap a stride-jax :class:`CausalLM` with the reader at the residual stream after ``layer``."""
    c = model.config
    if not 0 <= layer < c.num_layers:
        raise ValueError(f"steering layer {layer} is out of range for a {c.num_layers}-block model "
                         f"(use 0 .. {c.num_layers - 1})")
    graphdef, state = nnx.split(model)
    features, head, upper, features_as = _functions(graphdef, c, layer)
    return LMFunctions(params=state, features=features, head=head, upper=upper,
                       d_reader=c.hidden_size, d_final=c.hidden_size, vocab_size=c.vocab_size,
                       max_len=c.max_position_embeddings, layer=layer, num_layers=c.num_layers,
                       fingerprint=params_fingerprint(state), features_as=features_as)


# The pure functions of one architecture and reader layer, shared by every model of that graph
# (they close over the graph only; the weights are an argument): a second Attributor of the same
# model, or of another checkpoint of its architecture, reuses the jitted kernels built on them
# instead of tracing and compiling them again.
_FUNCTIONS: dict = {}


def _functions(graphdef, c, layer: int):
    key = (graphdef, layer)
    if key in _FUNCTIONS:
        return _FUNCTIONS[key]

    def features_of(graph):
        def features(params, input_ids, attention_mask):
            m = nnx.merge(graph, params)
            ctx, pos = m.context(input_ids, attention_mask)
            h = m.embed(input_ids, pos)
            h_reader = m.run_layers(h, ctx, 0, layer + 1)
            h_top = m.run_layers(h_reader, ctx, layer + 1)
            return h_reader, m.final_norm(h_top)
        return features

    features = features_of(graphdef)
    variants: dict[str, Callable] = {c.dtype: features}

    def features_as(dtype: str) -> Callable:
        # Same parameter tree, another compute dtype: only the graph's static dtype differs
        # (each matmul casts its float32 weight on the fly). Built once per dtype, so the
        # jitted functions keyed by it are reused.
        if dtype not in variants:
            from stride_jax.model.transformer import abstract_model
            graph, _ = nnx.split(abstract_model(dataclasses.replace(c, dtype=dtype)))
            variants[dtype] = features_of(graph)
        return variants[dtype]

    def head(params, h_final):
        return nnx.merge(graphdef, params).unembed(h_final)

    def upper(params, h_reader, input_ids, attention_mask):
        m = nnx.merge(graphdef, params)
        ctx, _ = m.context(input_ids, attention_mask)
        return m.final_norm(m.run_layers(h_reader, ctx, layer + 1))

    _FUNCTIONS[key] = (features, head, upper, features_as)
    return _FUNCTIONS[key]


def params_fingerprint(params: Any) -> str:
    """A cheap content hash of a parameter pytree (shapes, dtypes and a strided sample of values)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        a = np.asarray(leaf)
        h.update(str((a.shape, a.dtype)).encode())
        flat = a.reshape(-1)
        step = max(1, flat.size // 4096)
        h.update(np.ascontiguousarray(flat[::step]).tobytes())
        h.update(np.float64(np.sum(flat, dtype=np.float64)).tobytes())
    return h.hexdigest()[:16]


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
    raise ValueError(f"site {site!r} is not linear in the logits")
