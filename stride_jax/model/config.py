"""Model configuration: one frozen dataclass covering the Llama, Qwen2 and GPT-2 families.

The three families differ only in a handful of switches, so a single implementation reads them:

==================  ===========  ===========  =============
switch              llama        qwen2        gpt2
==================  ===========  ===========  =============
``norm``            rms          rms          layer
``position``        rope         rope         learned
``mlp``             gated (SwiGLU) gated      plain (GELU)
``qkv_bias``        False*       True         True
``out_bias``        False*       False        True
``weight_layout``   linear       linear       conv1d (in, out) in the HF files
==================  ===========  ===========  =============

(*) Llama's ``attention_bias`` / ``mlp_bias`` HF settings switch these on.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax.numpy as jnp

from stride_jax.errors import ModelError

Family = Literal["llama", "qwen2", "gpt2"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling (HF ``rope_scaling`` / ``rope_parameters``).

    ``kind`` is ``"default"`` (none), ``"linear"`` (positions divided by ``factor``) or ``"llama3"``
    (Llama 3.1's frequency-band interpolation).
    """

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        problems = [f"rope_scaling.{name}={getattr(self, name)} must be a positive finite number"
                    for name in ("factor", "low_freq_factor", "high_freq_factor",
                                 "original_max_position_embeddings")
                    if not _positive(getattr(self, name))]
        if problems:
            raise ModelError("invalid RopeScaling: " + "; ".join(problems))


def _positive(x: Any) -> bool:
    try:
        return math.isfinite(float(x)) and float(x) > 0
    except (TypeError, ValueError):
        return False


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only causal LM.

    Attributes:
      family: ``llama`` (also Mistral-free Llama-likes such as SmolLM2), ``qwen2`` or ``gpt2``.
      vocab_size: rows of the token embedding.
      hidden_size: model width d.
      num_layers: transformer blocks L.
      num_heads: query heads.
      num_kv_heads: key/value heads (grouped-query attention when < ``num_heads``).
      head_dim: per-head width; ``hidden_size // num_heads`` unless the checkpoint says otherwise.
      intermediate_size: MLP width.
      max_position_embeddings: context length (size of the learned position table for GPT-2).
      norm_eps: epsilon of RMSNorm / LayerNorm.
      rope_theta: rotary base.
      rope_scaling: rotary frequency scaling.
      tie_word_embeddings: unembedding shares the token embedding.
      qkv_bias / out_bias / mlp_bias: biases on q/k/v, on the attention output, on the MLP.
      activation: ``silu`` (SwiGLU gate), ``gelu_new`` (tanh GELU) or ``gelu`` (exact).
      dtype: compute dtype (``float32`` or ``bfloat16``); parameters stay ``param_dtype``.
        Norms, softmax and the loss are computed in float32 whatever the compute dtype.
      param_dtype: storage dtype of the parameters.
      bos_token_id / eos_token_id / pad_token_id: carried for export and generation.
    """

    family: Family = "llama"
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 32
    intermediate_size: int = 512
    max_position_embeddings: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)
    tie_word_embeddings: bool = True
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    activation: str = "silu"
    dtype: str = "float32"
    param_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        problems = []
        if self.family not in ("llama", "qwen2", "gpt2"):
            problems.append(f"family={self.family!r} is not one of 'llama', 'qwen2', 'gpt2'")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads={self.num_heads} is not a multiple of "
                            f"num_kv_heads={self.num_kv_heads}")
        if self.activation not in ("silu", "gelu_new", "gelu", "gelu_pytorch_tanh", "relu"):
            problems.append(f"activation={self.activation!r} is not supported")
        for name in ("norm_eps", "rope_theta"):
            if not _positive(getattr(self, name)):
                problems.append(f"{name}={getattr(self, name)} must be a positive finite number")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                problems.append(f"{name}={getattr(self, name)!r} must be one of {sorted(_DTYPES)}")
        if problems:
            raise ModelError("invalid ModelConfig: " + "; ".join(problems))

    # Derived properties -------------------------------------------------------------------------
    @property
    def norm(self) -> str:
        return "layer" if self.family == "gpt2" else "rms"

    @property
    def position(self) -> str:
        return "learned" if self.family == "gpt2" else "rope"

    @property
    def gated_mlp(self) -> bool:
        return self.family != "gpt2"

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return _DTYPES[self.param_dtype]

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (embeddings included, tied head counted once)."""
        d, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        if self.out_bias:
            attn += d
        mlp = (3 if self.gated_mlp else 2) * d * f
        if self.mlp_bias:
            mlp += (2 * f if self.gated_mlp else f) + d
        norms = (2 if self.norm == "rms" else 4) * d
        block = attn + mlp + norms
        total = v * d + self.num_layers * block + (d if self.norm == "rms" else 2 * d)
        if not self.tie_word_embeddings:
            total += v * d
        if self.position == "learned":
            total += self.max_position_embeddings * d
        return total


def tiny_llama(vocab_size: int = 2048, **overrides: Any) -> ModelConfig:
    """The bundled tiny model: 2 layers, d=128, 4 heads (2 KV heads), SwiGLU 512, tied head."""
    base = dict(family="llama", vocab_size=vocab_size, hidden_size=128, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=32, intermediate_size=512, max_position_embeddings=256,
                norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    base.update(overrides)
    return ModelConfig(**base)
