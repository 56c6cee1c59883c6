"""Bring your own measurement: what a query's response to an operator is.

By default the response of query ``q`` to operator ``k`` is the change of its mean per-token
log-probability (:data:`mean_logprob_change`, the module docstring of :mod:`stride_jax.measure`).
A :class:`Measurement` replaces that reduction: for one query and one operator it receives the
query's row as :class:`MeasureInputs` and returns **one scalar**, the response ``y[q, k]``,
positive when the operator *improves* the query by the measurement's own standard. The scores
then say which training examples improve it (positive) or worsen it (negative), in the
measurement's units per example.

Contract (``T`` positions of the query's row, ``V`` the vocabulary):

* ``dlogp_t [T]``: the exact change of the log-probability of the target at each position under
  the operator (computed without cancellation, :func:`stride_jax.steering.delta_logprob`);
  meaningful only where ``loss_mask_t`` is 1;
* ``loss_mask_t [T]``: 1 on the scored positions (the completion's tokens), 0 elsewhere;
* ``targets_t [T]``: the target token id at each position;
* ``base_logp_tv [T, V]``: the base model's log-probabilities;
* ``delta_tv [T, V]``: the operator's shift of the logits, so the steered logits are
  ``base_logp_tv + delta_tv`` up to a per-position constant.

The function must be a pure JAX function of these arrays (it is vmapped over the queries of a
batch and the operators of a chunk, and jitted); the measurement must be zero for a zero shift.
A difference of two large numbers (``f(steered) - f(base)``) loses float32 precision when
responses are tiny (1e-4 is common): build it from ``dlogp_t`` where you can.

Sites: ``logits`` and ``final_hidden`` (the steered logits exist in closed form there). The
``residual`` site, per-token attribution (``tokens.json``) and self-influence use the default.

Stamps: the measure stage records the measurement's ``fingerprint``, by default its qualified
name plus a hash of its code; give ``fingerprint=`` when it depends on anything else (a closed-
over token id, a table), so that changing that recomputes the responses instead of reusing them.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class MeasureInputs(NamedTuple):
    """One query's row under one operator (see the module docstring)."""

    dlogp_t: jax.Array         # [T] change of the target log-probability
    loss_mask_t: jax.Array     # [T] float32, 1 on scored positions
    targets_t: jax.Array       # [T] int32 target ids
    base_logp_tv: jax.Array    # [T, V] base log-probabilities
    delta_tv: jax.Array        # [T, V] logit shift of the operator


@dataclasses.dataclass(frozen=True)
class Measurement:
    """A query's response as a function of :class:`MeasureInputs` (one scalar), stamped by
    ``fingerprint`` (default: the function's qualified name and a hash of its code)."""

    fn: Callable[[MeasureInputs], jax.Array]
    fingerprint: str | None = None

    def stamp(self) -> str:
        if self.fingerprint:
            return self.fingerprint
        return _code_fingerprint(self.fn)

    def __call__(self, inputs: MeasureInputs) -> jax.Array:
        return self.fn(inputs)


def _code_fingerprint(fn: Any) -> str:
    code = getattr(fn, "__code__", None)
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    if code is None:
        return name
    h = hashlib.sha256(code.co_code)
    h.update(repr(code.co_consts).encode())
    h.update(repr(code.co_names).encode())
    return f"{name}:{h.hexdigest()[:12]}"


def _mean(x: MeasureInputs) -> jax.Array:
    return jnp.sum(x.dlogp_t * x.loss_mask_t) / jnp.maximum(jnp.sum(x.loss_mask_t), 1.0)


def _sum(x: MeasureInputs) -> jax.Array:
    return jnp.sum(x.dlogp_t * x.loss_mask_t)


#: The default: the change of the query's mean per-token log-probability (minus its loss change).
mean_logprob_change = Measurement(_mean, "mean_logprob_change")
#: The change of the completion's sequence log-probability (the sum over its scored tokens).
sum_logprob_change = Measurement(_sum, "sum_logprob_change")


def as_measurement(m: Measurement | Callable[[MeasureInputs], jax.Array] | None
                   ) -> Measurement | None:
    """``None`` for the default (also when :data:`mean_logprob_change` is given explicitly)."""
    if m is None or m is mean_logprob_change:
        return None
    if isinstance(m, Measurement):
        return m
    if not callable(m):
        from stride_jax.errors import ConfigError
        raise ConfigError(f"measurement must be a Measurement or a function of MeasureInputs, "
                          f"got {type(m).__name__}")
    return Measurement(m)
