"""Steering operators: a shared basis network and per-subset coefficient matrices.

Operator ``k`` shifts the frozen model at its *site* by

.. math::  \\Delta_k(h_t) = B_\\psi(\\bar h_t)\\, a_k, \\qquad B_\\psi: \\mathbb{R}^{D} \\to \\mathbb{R}^{r},
           \\quad a_k \\in \\mathbb{R}^{r \\times C},

where :math:`h_t` is the activation at the *reader* layer ``l`` (the residual stream after block
``l``) and :math:`\\bar h_t = h_t / \\mathrm{rms}(h_t)` (a parameter-free RMS norm: the residual
stream's scale grows with depth and differs per token, which would otherwise make one learning
rate fit badly across tokens). Sites:

* ``logits`` (C = V): added to the output logits;
* ``final_hidden`` (C = d): added to the final hidden state before the unembedding, so the logit
  shift is :math:`U \\Delta_k`;
* ``residual`` (C = d): added to the residual stream after block ``l`` and carried through the
  frozen upper layers.

For ``logits`` and ``final_hidden`` the shift of the logits is linear in :math:`a_k`, so the
change of a token's log-probability has a closed form that is exact and stable for tiny shifts
(see :func:`delta_logprob_and_kl`). Steering parameters are a pytree separate from the model:
``{"basis": {...}, "coef": [K, r, C]}``; vmapping over ``coef`` broadcasts the basis and the base
model.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from stride_jax.config import check_ranges, option
from stride_jax.errors import ConfigError

Site = Literal["logits", "final_hidden", "residual"]


@dataclasses.dataclass(frozen=True)
class SteeringConfig:
    """Operator family: where it reads, where it writes, its rank and basis network."""

    site: Site = option("logits", "where the shift is added: logits (C=vocab), final_hidden "
                                  "(C=d, before the unembedding) or residual (C=d, at the reader "
                                  "layer, carried through the upper layers)")
    layer: int | None = option(None, "reader layer l (residual stream after block l); null: "
                                     "round(2/3 * num_layers) - 1, the paper's ~2/3 depth")
    rank: int = option(32, "rank r of the basis (paper: 16; 32-64 measured better)")
    basis: Literal["linear", "mlp"] = option("linear", "basis network: linear (the prototype's "
                                                       "best) or a one-hidden-layer MLP")
    mlp_hidden: int = option(64, "hidden width of the MLP basis")

    def __post_init__(self) -> None:
        check_ranges(self, {"layer": ">= 0", "rank": ">= 1", "mlp_hidden": ">= 1"},
                     fixes={"rank": "set a positive rank (default 32, paper 16)",
                            "layer": "or null for ~2/3 depth"})


def default_layer(num_layers: int) -> int:
    """About two thirds of the depth (the paper's choice), as a 0-based block index."""
    return max(0, min(num_layers - 1, round(2 * num_layers / 3) - 1))


def resolve_layer(cfg: SteeringConfig, num_layers: int) -> int:
    layer = default_layer(num_layers) if cfg.layer is None else cfg.layer
    if not 0 <= layer < num_layers:
        raise ConfigError(f"steering.layer={cfg.layer} is out of range: the model has {num_layers} "
                          f"blocks, so use 0 .. {num_layers - 1} (or null for ~2/3 depth)")
    return layer


def validate(cfg: SteeringConfig) -> None:
    """Check ``cfg`` (the checks run when a config is made; kept for callers)."""
    cfg.__post_init__()


def init_steering(cfg: SteeringConfig, *, d_reader: int, d_out: int, num_subsets: int,
                  key: jax.Array) -> dict:
    """Basis with variance-preserving random weights; coefficients zero (= the base model)."""
    if num_subsets < 1:
        raise ConfigError("num_subsets must be >= 1")
    k1, k2 = jax.random.split(key)
    if cfg.basis == "linear":
        basis = {"w": jax.random.normal(k1, (d_reader, cfg.rank)) / jnp.sqrt(d_reader)}
    else:
        basis = {"w1": jax.random.normal(k1, (d_reader, cfg.mlp_hidden)) / jnp.sqrt(d_reader),
                 "b1": jnp.zeros((cfg.mlp_hidden,)),
                 "w2": jax.random.normal(k2, (cfg.mlp_hidden, cfg.rank)) / jnp.sqrt(cfg.mlp_hidden)}
    return {"basis": basis, "coef": jnp.zeros((num_subsets, cfg.rank, d_out), jnp.float32)}


def basis_features(basis: dict, h_btd: jax.Array) -> jax.Array:
    """B_psi(rmsnorm(h)): ``[..., r]`` in float32."""
    h = h_btd.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + 1e-6)
    if "w" in basis:
        return h @ basis["w"]
    return jax.nn.gelu(h @ basis["w1"] + basis["b1"]) @ basis["w2"]


def shift(feats_btr: jax.Array, coef_rc: jax.Array) -> jax.Array:
    """Delta = features @ a_k, ``[..., C]``."""
    return feats_btr @ coef_rc


def _expm1_minus_x(c: jax.Array) -> jax.Array:
    """e^c - 1 - c without cancellation for small c (series below |c| = 1e-2)."""
    series = 0.5 * c * c * (1.0 + c / 3.0 * (1.0 + c / 4.0 * (1.0 + c / 5.0)))
    cc = jnp.minimum(c, 60.0)  # the unused branch must stay finite
    return jnp.where(jnp.abs(c) < 1e-2, series, jnp.expm1(cc) - cc)


def delta_logprob(base_logp_btv: jax.Array, delta_btv: jax.Array,
                  targets_bt: jax.Array) -> jax.Array:
    r"""Exact change of the target log-probability for a logit shift, in ~4 passes over V.

    .. math::  \log p'_y - \log p_y = (\delta_y - \mu) - \big(s + \mathrm{log1p}\,
               E_p[\mathrm{expm1}(c - s)]\big), \quad \mu = E_p[\delta],\ c = \delta - \mu,
               \ s = \max(\max_v c_v - 60, 0)

    The log-normaliser change is computed as a ``log1p`` of a sum of ``expm1`` terms, so its
    float32 error is relative to the shift itself (~1e-7 |delta|), not to 1; ``s`` only
    matters for absurd shifts (> 60 nats), where it prevents overflow.
    """
    logp = base_logp_btv.astype(jnp.float32)
    p = jnp.exp(logp)
    delta = delta_btv.astype(jnp.float32)
    mu = jnp.sum(p * delta, axis=-1, keepdims=True)
    c = delta - mu
    s = jax.lax.stop_gradient(jnp.maximum(jnp.max(c, axis=-1, keepdims=True) - 60.0, 0.0))
    lse_c = s[..., 0] + jnp.log1p(jnp.sum(p * jnp.expm1(c - s), axis=-1))
    cy = jnp.take_along_axis(c, targets_bt[..., None], axis=-1)[..., 0]
    return cy - lse_c


def delta_logprob_and_kl(base_logp_btv: jax.Array, delta_btv: jax.Array,
                         targets_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""Exact change of the target log-probability and KL(base || steered) for a logit shift.

    With base distribution :math:`p`, steered logits :math:`z + \delta`, :math:`\mu = E_p[\delta]`
    and :math:`c = \delta - \mu`:

    .. math::
        \mathrm{KL}(p \,\|\, p') = \log E_p[e^{\delta}] - \mu
                                   = \mathrm{log1p}\big(E_p[e^{c} - 1 - c]\big)
                                   \qquad (E_p[c] = 0)

        \log p'_y - \log p_y = \delta_y - \log E_p[e^{\delta}] = (\delta_y - \mu) - \mathrm{KL}

    Computing :math:`e^c - 1 - c` by its series for small :math:`c` keeps both quantities exact to
    float32 relative precision even for shifts of 1e-6 (responses of 1e-4 are common), where a
    difference of two log-softmaxes would lose most digits. Returns ``(dlogp [b, t], kl [b, t])``.
    """
    p = jnp.exp(base_logp_btv.astype(jnp.float32))
    delta = delta_btv.astype(jnp.float32)
    mu = jnp.sum(p * delta, axis=-1, keepdims=True)
    c = delta - mu
    # Large shifts: log E_p[e^c] by a max-shifted logsumexp; small ones: the series form.
    m = jax.lax.stop_gradient(jnp.max(c, axis=-1, keepdims=True))
    kl_large = m[..., 0] + jnp.log(jnp.sum(p * jnp.exp(c - m), axis=-1))
    kl_small = jnp.log1p(jnp.sum(p * _expm1_minus_x(c), axis=-1))
    kl = jnp.where(m[..., 0] < 20.0, kl_small, kl_large)
    cy = jnp.take_along_axis(c, targets_bt[..., None], axis=-1)[..., 0]
    return cy - kl, kl
