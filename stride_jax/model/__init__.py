"""Decoder-only LMs in Flax NNX (Llama, Qwen2, GPT-2 families), HF loading/export, activation sites."""

from stride_jax.model.config import ModelConfig, RopeScaling, tiny_llama
from stride_jax.model.hf import HFConfigError, HFWeightsError, from_hf, to_hf
from stride_jax.model.transformer import (CausalLM, Context, ForwardOutput, abstract_model,
                                          init_model, site_names)

__all__ = ["ModelConfig", "RopeScaling", "tiny_llama", "CausalLM", "Context", "ForwardOutput",
           "HFConfigError", "HFWeightsError", "abstract_model", "from_hf", "init_model",
           "site_names", "to_hf"]
