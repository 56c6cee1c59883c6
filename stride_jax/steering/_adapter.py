"""What STRIDE needs from a language model, as pure functions over its parameters.

STRIDE never changes the base model; it needs three functions of it:

* ``features(params, input_ids, attention_mask) -> (h_reader [b, t, D], h_final [b, t, d])``:
  the activation at the reader layer and the final hidden state (what the head reads);
* ``head(params, h_final) -> logits [b, t, V]``: the unembedding, which must be affine in
  ``h_final`` for the ``final_hidden`` site;
* ``upper(params, h_reader, input_ids, attention_mask) -> h_final``: the frozen layers above the
  reader layer (only for the ``residual`` site).

Three ways to get them:

* :func:`from_causal_lm` for stride-jax's own :class:`CausalLM` (what ``Attributor`` does when
  given one);
* :meth:`LMFunctions.from_nnx` for your own Flax NNX model: say how to run it up to the reader
  layer, above it, and its head, as functions of the module; shapes are read with
  ``jax.eval_shape``;
* any other JAX model (Equinox, levanter, MaxText, plain functions): fill :class:`LMFunctions`
  with its parameter pytree and three pure functions of it. For Equinox,
  ``params, static = eqx.partition(model, eqx.is_array)`` and each function starts with
  ``m = eqx.combine(params, static)``.

The model is identified by ``fingerprint``: the one you give, or else a hash of every parameter
value (:func:`params_fingerprint`), which every stage's stamp records, so a changed model never
reuses another one's artifacts. The functions themselves are not fingerprinted: if you change
them with the same parameters (read another layer), change ``layer`` or give a new
``fingerprint``. :func:`check_shapes` checks the functions against the declared sizes before any
work, with one ``jax.eval_shape`` each.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from stride_jax.errors import ConfigError, ModelError
from stride_jax.io.stamps import pytree_fingerprint
from stride_jax.model.transformer import CausalLM


@dataclasses.dataclass(frozen=True)
class LMFunctions:
    """A frozen LM as parameters plus pure functions (see the module docstring).

    Attributes:
      params: the parameter pytree the functions take first.
      features, head, upper: the functions (``upper`` may be None unless the site is
        ``residual``).
      d_reader, d_final, vocab_size: sizes of ``h_reader``, ``h_final`` and the logits.
      max_len: the longest row the model takes (its context).
      layer, num_layers: the reader layer's index and the model's depth (stamped; ``layer``
        must match ``steering.layer`` when that is set).
      fingerprint: the model's identity in stamps (None: a hash of every parameter value).
      input_vocab_size: when the input ids index another table than the output classes.
    """

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

    @classmethod
    def from_nnx(cls, model: nnx.Module, *, reader: Callable, head: Callable,
                 upper: Callable | None = None, final_norm: Callable | None = None,
                 layer: int, num_layers: int | None = None, max_len: int,
                 fingerprint: str | None = None) -> "LMFunctions":
        """Wrap your own Flax NNX language model; its weights are used in place, never copied.

        Each function takes the module first (a fresh ``nnx.merge`` of its state per call):

        * ``reader(m, input_ids, attention_mask) -> h [b, t, D]``: the activation the operators
          read, e.g. the residual stream after block ``layer``;
        * ``upper(m, h, input_ids, attention_mask) -> h [b, t, d]``: the blocks above it
          (None: ``reader`` already reads the last block);
        * ``final_norm(m, h) -> h_final`` (None: the identity): what the head reads, the
          ``final_hidden`` site;
        * ``head(m, h_final) -> logits [b, t, V]``: affine in ``h_final`` for the
          ``final_hidden`` site.

        ``d_reader``, ``d_final`` and ``vocab_size`` are read with ``jax.eval_shape``. Only
        ``nnx.Param`` state is hashed into the fingerprint (other state, such as RNG counters,
        is carried along). Put the model in inference mode (``model.eval()``) first if it has
        dropout.
        """
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        norm = final_norm if final_norm is not None else (lambda m, h: h)

        def features(p, input_ids, attention_mask):
            m = nnx.merge(graphdef, p, rest)
            h = reader(m, input_ids, attention_mask)
            top = h if upper is None else upper(m, h, input_ids, attention_mask)
            return h, norm(m, top)

        def head_fn(p, h_final):
            return head(nnx.merge(graphdef, p, rest), h_final)

        def upper_fn(p, h, input_ids, attention_mask):
            m = nnx.merge(graphdef, p, rest)
            return norm(m, upper(m, h, input_ids, attention_mask))

        t = min(max_len, 8)
        ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
        h_reader, h_final = jax.eval_shape(features, params, ids, ids)
        logits = jax.eval_shape(head_fn, params, h_final)
        return cls(params=params, features=features, head=head_fn,
                   upper=None if upper is None else upper_fn,
                   d_reader=int(h_reader.shape[-1]), d_final=int(h_final.shape[-1]),
                   vocab_size=int(logits.shape[-1]), max_len=max_len, layer=layer,
                   num_layers=layer + 1 if num_layers is None else num_layers,
                   fingerprint=fingerprint)

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


def check_shapes(lm: LMFunctions, site: str, seq_len: int) -> None:
    """Check ``lm``'s functions against its declared sizes on a ``[1, seq_len]`` batch, with one
    ``jax.eval_shape`` per function (no computation), before any work: a wrong size would
    otherwise surface as a broadcast error deep in the activation cache. Raises a one-line
    :class:`~stride_jax.errors.ModelError` naming the field."""
    ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    out = jax.eval_shape(lm.features, lm.params, ids, ids)
    if not (isinstance(out, (tuple, list)) and len(out) == 2
            and all(hasattr(a, "shape") for a in out)):
        raise ModelError("LMFunctions.features must return two arrays (h_reader [b, t, "
                         f"d_reader], h_final [b, t, d_final]); it returned {_shapes(out)}")
    h_reader, h_final = out
    for name, h, d, what in (("d_reader", h_reader, lm.d_reader, "h_reader"),
                             ("d_final", h_final, lm.d_final, "h_final")):
        if h.shape != (1, seq_len, d):
            fix = (f"set {name}={h.shape[-1]}" if h.shape[:2] == (1, seq_len)
                   else "return one vector per token")
            raise ModelError(f"LMFunctions.{name}={d} but features returns {what} of shape "
                             f"{tuple(h.shape)} for a [1, {seq_len}] batch (expected "
                             f"(1, {seq_len}, {d})): {fix}")
    logits = jax.eval_shape(lm.head, lm.params, h_final)
    if getattr(logits, "shape", None) != (1, seq_len, lm.vocab_size):
        got = tuple(logits.shape) if hasattr(logits, "shape") else type(logits).__name__
        fix = (f"set vocab_size={got[-1]}" if isinstance(got, tuple) and got[:2] == (1, seq_len)
               else "return [b, t, vocab] logits")
        raise ModelError(f"LMFunctions.vocab_size={lm.vocab_size} but head returns logits of "
                         f"shape {got} (expected (1, {seq_len}, {lm.vocab_size})): {fix}")
    if site == "residual":
        if lm.upper is None:
            raise ModelError("steering.site=residual needs LMFunctions.upper (the frozen layers "
                             "above the reader layer); give it, or use the logits or "
                             "final_hidden site")
        top = jax.eval_shape(lm.upper, lm.params, h_reader, ids, ids)
        if getattr(top, "shape", None) != (1, seq_len, lm.d_final):
            raise ModelError(f"LMFunctions.upper returns shape {_shapes(top)} for h_reader "
                             f"{tuple(h_reader.shape)}; it must return the final hidden state "
                             f"(1, {seq_len}, d_final={lm.d_final})")


def _shapes(x: Any) -> Any:
    return jax.tree.map(lambda a: tuple(getattr(a, "shape", ())), x)


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
