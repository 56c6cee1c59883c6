"""Building blocks of the decoder: dense layers, norms, rotary embeddings, attention, MLP.

All parameters are stored in ``config.param_dtype``; matmuls run in ``config.dtype``; norms,
softmax and rotary phases are computed in float32 (as the HF PyTorch models do), so bfloat16
compute keeps float32 accumulation where it matters.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from stride_jax.errors import ModelError
from stride_jax.model.config import ModelConfig
from stride_jax.model.taps import tap

_INIT_STD = 0.02


def _normal(rngs: nnx.Rngs, shape, dtype):
    return _INIT_STD * jax.random.normal(rngs.params(), shape, dtype)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias), kernel stored (in, out) like Flax and GPT-2's Conv1D."""

    taps_itself = True    # stride_jax.model.taps names these modules (module_names)

    def __init__(self, d_in: int, d_out: int, *, use_bias: bool, config: ModelConfig,
                 rngs: nnx.Rngs):
        self.kernel = nnx.Param(_normal(rngs, (d_in, d_out), config.params_dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), config.params_dtype)) if use_bias else None
        self.dtype = config.compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        # A named hook point for curvature methods (stride_jax.model.taps); y itself otherwise.
        return tap(self, x, y, self.bias is not None)


class Norm(nnx.Module):
    r"""RMSNorm (Llama/Qwen2) or LayerNorm (GPT-2), computed in float32.

    RMSNorm: :math:`y = w \odot x / \sqrt{\mathrm{mean}(x^2) + \epsilon}`; the normalised value is
    cast back to the compute dtype before the scale, exactly as ``LlamaRMSNorm`` does.
    LayerNorm: :math:`y = w \odot (x - \mu) / \sqrt{\sigma^2 + \epsilon} + b`.
    """

    def __init__(self, d: int, *, config: ModelConfig):
        self.kind = config.norm
        self.eps = config.norm_eps
        self.dtype = config.compute_dtype
        self.scale = nnx.Param(jnp.ones((d,), config.params_dtype))
        self.bias = nnx.Param(jnp.zeros((d,), config.params_dtype)) if self.kind == "layer" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        if self.kind == "rms":
            var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
            y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
            return self.scale[...].astype(self.dtype) * y
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def rope_inv_freq(config: ModelConfig) -> jax.Array:
    r"""Rotary inverse frequencies :math:`\theta^{-2i/d_h}`, with HF's ``linear``/``llama3`` scaling."""
    hd = config.head_dim
    inv = 1.0 / (config.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    rs = config.rope_scaling
    if rs.kind == "linear":
        inv = inv / rs.factor
    elif rs.kind == "llama3":
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = jnp.where(medium, smoothed, scaled)
    elif rs.kind != "default":
        raise ModelError(f"rope scaling {rs.kind!r} is not supported (default, linear, llama3)")
    return inv


def rope_cos_sin(positions_bt: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables (batch, seq, head_dim) in float32, HF's non-interleaved layout."""
    freqs = positions_bt.astype(jnp.float32)[..., None] * rope_inv_freq(config)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_bthd: jax.Array, cos_btd: jax.Array, sin_btd: jax.Array) -> jax.Array:
    r"""Rotate pairs (x_i, x_{i+d/2}): :math:`x \cos + \mathrm{rot}(x) \sin`, rot(x) = [-x_2, x_1]."""
    x32 = x_bthd.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x32 * cos_btd[:, :, None, :] + rotated * sin_btd[:, :, None, :]
    return out.astype(x_bthd.dtype)


def attention_mask_bqk(attention_mask_bt: jax.Array | None, segment_ids_bt: jax.Array | None,
                       batch: int, seq: int) -> jax.Array:
    """Boolean (batch, query, key) mask: causal, keys must be real tokens, same packed segment."""
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))[None]
    mask = jnp.broadcast_to(causal, (batch, seq, seq))
    if attention_mask_bt is not None:
        mask = mask & attention_mask_bt.astype(bool)[:, None, :]
    if segment_ids_bt is not None:
        mask = mask & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])
    return mask


class Attention(nnx.Module):
    r"""Multi-head / grouped-query causal self-attention.

    :math:`\mathrm{softmax}(q k^T / \sqrt{d_h} + \mathrm{mask}) v`, with ``num_heads / num_kv_heads``
    query heads sharing each key/value head. Scores and softmax are float32.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, hd = config.hidden_size, config.head_dim
        self.config = config
        self.q_proj = Dense(d, config.num_heads * hd, use_bias=config.qkv_bias, config=config, rngs=rngs)
        self.k_proj = Dense(d, config.num_kv_heads * hd, use_bias=config.qkv_bias, config=config, rngs=rngs)
        self.v_proj = Dense(d, config.num_kv_heads * hd, use_bias=config.qkv_bias, config=config, rngs=rngs)
        self.o_proj = Dense(config.num_heads * hd, d, use_bias=config.out_bias, config=config, rngs=rngs)

    def __call__(self, x_btd: jax.Array, mask_bqk: jax.Array,
                 rope: tuple[jax.Array, jax.Array] | None) -> jax.Array:
        c = self.config
        b, t, _ = x_btd.shape
        q = self.q_proj(x_btd).reshape(b, t, c.num_heads, c.head_dim)
        k = self.k_proj(x_btd).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x_btd).reshape(b, t, c.num_kv_heads, c.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        groups = c.num_heads // c.num_kv_heads
        q = q.reshape(b, t, c.num_kv_heads, groups, c.head_dim)
        scores = jnp.einsum("bqkgh,bskh->bkgqs", q, k, preferred_element_type=jnp.float32)
        scores = scores * (1.0 / math.sqrt(c.head_dim))
        # A finite minimum (not -inf) keeps fully masked rows (padding queries) NaN-free.
        scores = jnp.where(mask_bqk[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(c.compute_dtype)
        out = jnp.einsum("bkgqs,bskh->bqkgh", probs, v, preferred_element_type=jnp.float32)
        out = out.astype(c.compute_dtype).reshape(b, t, c.num_heads * c.head_dim)
        return self.o_proj(out)


def _activation(name: str):
    if name == "silu":
        return jax.nn.silu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu
    raise ModelError(f"unsupported activation {name!r}")


class MLP(nnx.Module):
    """SwiGLU ``down(act(gate(x)) * up(x))`` (Llama/Qwen2) or ``down(act(up(x)))`` (GPT-2)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gated = config.gated_mlp
        self.act = _activation(config.activation)
        self.gate_proj = (Dense(d, f, use_bias=config.mlp_bias, config=config, rngs=rngs)
                          if self.gated else None)
        self.up_proj = Dense(d, f, use_bias=config.mlp_bias, config=config, rngs=rngs)
        self.down_proj = Dense(f, d, use_bias=config.mlp_bias, config=config, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nnx.Module):
    """Pre-norm transformer block: ``h + attn(norm(h))`` then ``h + mlp(norm(h))``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = Norm(config.hidden_size, config=config)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = Norm(config.hidden_size, config=config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, h: jax.Array, mask_bqk: jax.Array, rope) -> jax.Array:
        h = h + self.attn(self.attn_norm(h), mask_bqk, rope)
        return h + self.mlp(self.mlp_norm(h))
