"""Hugging Face checkpoints in and out, without torch: ``config.json`` + ``*.safetensors``.

Loading is a *declared* mapping, in both directions:

* the HF config is read through an allowlist (:data:`_CONFIG_KEYS`): every key is either mapped
  onto :class:`ModelConfig`, checked to hold a value we implement, or known not to change the
  forward pass (bookkeeping, dropout, generation defaults). Any other key is an error that names
  it, because silently ignoring a setting gives a model that runs and is wrong.
* weights follow :func:`weight_rules`: one rule per HF tensor (or fused group, GPT-2's ``c_attn``)
  with the functions that convert it to our layout and back. A weight the rules expect but the
  files lack, or a weight in the files no rule consumes, is an error listing them.

Layouts: HF ``nn.Linear`` stores (out, in), we store (in, out); GPT-2's ``Conv1D`` already stores
(in, out) and fuses q/k/v into one ``c_attn`` matrix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from stride_jax.errors import HFConfigError, HFWeightsError
from stride_jax.model.config import ModelConfig, RopeScaling
from stride_jax.model.transformer import CausalLM, abstract_model

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

# Keys that never change the forward pass of a causal LM at inference: bookkeeping, training-only
# dropout/initialisation, generation defaults, label maps.
_HARMLESS = frozenset("""
_name_or_path architectures transformers_version torch_dtype dtype use_cache initializer_range
output_hidden_states output_attentions return_dict id2label label2id problem_type
chunk_size_feed_forward is_encoder_decoder is_decoder attention_dropout resid_pdrop embd_pdrop
attn_pdrop summary_type summary_use_proj summary_activation summary_proj_to_labels
summary_first_dropout task_specific_params model_type tokenizer_class unk_token_id sep_token_id
decoder_start_token_id max_length min_length do_sample early_stopping num_beams num_beam_groups
diversity_penalty temperature top_k top_p typical_p repetition_penalty length_penalty
no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids num_return_sequences
output_scores return_dict_in_generate forced_bos_token_id forced_eos_token_id
remove_invalid_values exponential_decay_length_penalty suppress_tokens begin_suppress_tokens
prefix finetuning_task cross_attention_hidden_size tie_encoder_decoder pruned_heads torchscript
tf_legacy_loss use_bfloat16 _attn_implementation_autoset gradient_checkpointing
is_llama_config transformers.js_config max_window_layers n_ctx
""".split())

# Keys that must hold one specific value (the one we implement).
_REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "pretraining_tp": (1, None),
    "use_sliding_window": (False, None),
    "add_cross_attention": (False, None),
    "scale_attn_weights": (True, None),
    "scale_attn_by_inverse_layer_idx": (False, None),
    "rope_interleaved": (False, None),
    "quantization_config": (None,),
    "is_decoder": (False, True, None),
}

# Keys that only reorder float ops (no change in exact arithmetic).
_NUMERICS_ONLY = frozenset({"reorder_and_upcast_attn"})

_FAMILY_KEYS = {
    "llama": {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
              "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "attention_bias",
              "mlp_bias", "head_dim", "tie_word_embeddings", "bos_token_id", "eos_token_id",
              "pad_token_id"},
    "gpt2": {"vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
             "activation_function", "layer_norm_epsilon", "tie_word_embeddings", "bos_token_id",
             "eos_token_id", "pad_token_id"},
}
_FAMILY_KEYS["qwen2"] = (_FAMILY_KEYS["llama"] - {"attention_bias", "mlp_bias"}) | {
    "sliding_window", "layer_types"}
_FAMILY_KEYS["mistral"] = _FAMILY_KEYS["llama"] | {"sliding_window"}

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}


def _token_id(v):
    # Some configs list several eos ids; we carry the first for generation.
    if isinstance(v, list):
        return int(v[0]) if v else None
    return None if v is None else int(v)


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, RopeScaling]:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    spec = dict(scaling)
    spec.update({k: v for k, v in params.items() if k != "rope_theta"})
    kind = spec.get("rope_type", spec.get("type", "default")) or "default"
    allowed = {"rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings", "rope_theta"}
    extra = set(spec) - allowed
    if kind not in ("default", "linear", "llama3") or extra:
        raise HFConfigError(
            f"rope scaling {spec} is not supported: stride-jax implements rope_type 'default', "
            f"'linear' and 'llama3' (unsupported fields: {sorted(extra) or 'none'})")
    rs = RopeScaling(
        kind=kind, factor=float(spec.get("factor", 1.0)),
        low_freq_factor=float(spec.get("low_freq_factor", 1.0)),
        high_freq_factor=float(spec.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(spec.get("original_max_position_embeddings", 8192)))
    return theta, rs


def config_from_hf(hf: Mapping[str, Any], *, dtype: str = "float32", param_dtype: str = "float32",
                   strict: bool = True) -> ModelConfig:
    """Translate an HF ``config.json`` dict into a :class:`ModelConfig`.

    Raises :class:`HFConfigError` for an unsupported ``model_type``, a setting we do not implement,
    or (``strict=True``) a key we do not know. ``strict=False`` logs unknown keys instead.
    """
    model_type = hf.get("model_type")
    family = {"llama": "llama", "qwen2": "qwen2", "gpt2": "gpt2", "mistral": "llama"}.get(model_type)
    if family is None:
        raise HFConfigError(f"model_type={model_type!r} is not supported; stride-jax loads "
                            f"'llama' (incl. SmolLM2), 'qwen2' and 'gpt2' checkpoints")
    known = _FAMILY_KEYS[model_type] | _HARMLESS | set(_REQUIRED_VALUES) | _NUMERICS_ONLY
    unknown = sorted(k for k in hf if k not in known)
    if unknown:
        msg = (f"config.json (model_type={model_type!r}) has setting(s) stride-jax does not handle: "
               f"{unknown}. They may change the model's forward pass")
        if strict:
            raise HFConfigError(f"{msg}, so loading stops here; if you know they are harmless for "
                                f"inference, pass strict=False (CLI: --no-strict-config)")
        log.warning("%s; loading anyway (strict=False): check that they are harmless for "
                    "inference", msg)
    for key, allowed in _REQUIRED_VALUES.items():
        if key in hf and hf[key] not in allowed:
            raise HFConfigError(f"config.json sets {key}={hf[key]!r}; stride-jax implements only "
                                f"{key} in {list(allowed)}")
    if model_type == "qwen2":
        layer_types = hf.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            raise HFConfigError(f"layer_types={layer_types} uses sliding-window attention, which "
                                f"stride-jax does not implement")
    if model_type == "mistral" and hf.get("sliding_window") not in (None,) and \
            int(hf["sliding_window"]) < int(hf.get("max_position_embeddings", 0)):
        raise HFConfigError("mistral sliding_window attention is not implemented")

    common = dict(dtype=dtype, param_dtype=param_dtype,
                  bos_token_id=_token_id(hf.get("bos_token_id")),
                  eos_token_id=_token_id(hf.get("eos_token_id")),
                  pad_token_id=_token_id(hf.get("pad_token_id")))
    if family == "gpt2":
        d = int(hf["n_embd"])
        act = hf.get("activation_function", "gelu_new")
        return ModelConfig(
            family="gpt2", vocab_size=int(hf["vocab_size"]), hidden_size=d,
            num_layers=int(hf["n_layer"]), num_heads=int(hf["n_head"]),
            num_kv_heads=int(hf["n_head"]), head_dim=d // int(hf["n_head"]),
            intermediate_size=int(hf.get("n_inner") or 4 * d),
            max_position_embeddings=int(hf.get("n_positions", 1024)),
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            qkv_bias=True, out_bias=True, mlp_bias=True, activation=act, **common)

    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HFConfigError(f"hidden_act={act!r}: stride-jax's Llama/Qwen2 MLP implements 'silu'")
    theta, rope_scaling = _rope_from_hf(hf)
    heads = int(hf["num_attention_heads"])
    d = int(hf["hidden_size"])
    head_dim = hf.get("head_dim") or d // heads
    attn_bias = True if family == "qwen2" else bool(hf.get("attention_bias", False))
    return ModelConfig(
        family=family, vocab_size=int(hf["vocab_size"]), hidden_size=d,
        num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=int(head_dim),
        intermediate_size=int(hf["intermediate_size"]),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=rope_scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=attn_bias, out_bias=(family == "llama" and attn_bias),
        mlp_bias=(family == "llama" and bool(hf.get("mlp_bias", False))), activation="silu",
        **common)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` dict that ``transformers`` (v5) reads back into the same model."""
    c = config
    ids = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
           "pad_token_id": c.pad_token_id}
    if c.family == "gpt2":
        return {"model_type": "gpt2", "architectures": [_ARCHITECTURES["gpt2"]],
                "vocab_size": c.vocab_size, "n_positions": c.max_position_embeddings,
                "n_embd": c.hidden_size, "n_layer": c.num_layers, "n_head": c.num_heads,
                "n_inner": c.intermediate_size, "activation_function": c.activation,
                "layer_norm_epsilon": c.norm_eps, "tie_word_embeddings": c.tie_word_embeddings,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **ids}
    rope: dict[str, Any] = {"rope_type": c.rope_scaling.kind, "rope_theta": c.rope_theta}
    if c.rope_scaling.kind != "default":
        rope["factor"] = c.rope_scaling.factor
    if c.rope_scaling.kind == "llama3":
        rope.update(low_freq_factor=c.rope_scaling.low_freq_factor,
                    high_freq_factor=c.rope_scaling.high_freq_factor,
                    original_max_position_embeddings=c.rope_scaling.original_max_position_embeddings)
    out = {"model_type": c.family, "architectures": [_ARCHITECTURES[c.family]],
           "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
           "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
           "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
           "head_dim": c.head_dim, "hidden_act": "silu",
           "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.norm_eps,
           "rope_parameters": rope, "tie_word_embeddings": c.tie_word_embeddings, **ids}
    if c.family == "llama":
        if c.qkv_bias != c.out_bias:
            raise HFConfigError("Llama's attention_bias covers q/k/v and o together; this model "
                                f"has qkv_bias={c.qkv_bias}, out_bias={c.out_bias}")
        out.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
    return out


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

Arrays = list[np.ndarray]


@dataclasses.dataclass(frozen=True)
class WeightRule:
    """``hf`` tensors <-> ``ours`` parameters (dotted paths), with the two conversions."""

    hf: tuple[str, ...]
    ours: tuple[str, ...]
    to_ours: Callable[[Arrays], Arrays]
    to_hf: Callable[[Arrays], Arrays]


def _same(xs: Arrays) -> Arrays:
    return list(xs)


def _transpose(xs: Arrays) -> Arrays:
    return [np.ascontiguousarray(x.T) for x in xs]


def _split3(xs: Arrays) -> Arrays:
    return np.split(xs[0], 3, axis=-1)


def _join3(xs: Arrays) -> Arrays:
    return [np.concatenate(xs, axis=-1)]


def _rule(hf: str, ours: str, transpose: bool = False) -> WeightRule:
    f = _transpose if transpose else _same
    return WeightRule((hf,), (ours,), f, f)


def weight_rules(config: ModelConfig) -> list[WeightRule]:
    """The declared HF <-> stride-jax key map for ``config`` (HF names without a model prefix)."""
    c = config
    rules: list[WeightRule] = []
    if c.family == "gpt2":
        rules += [_rule("wte.weight", "embed_tokens"), _rule("wpe.weight", "embed_positions"),
                  _rule("ln_f.weight", "final_norm.scale"), _rule("ln_f.bias", "final_norm.bias")]
        for i in range(c.num_layers):
            p, q = f"h.{i}.", f"layers.{i}."
            rules += [
                _rule(p + "ln_1.weight", q + "attn_norm.scale"), _rule(p + "ln_1.bias", q + "attn_norm.bias"),
                _rule(p + "ln_2.weight", q + "mlp_norm.scale"), _rule(p + "ln_2.bias", q + "mlp_norm.bias"),
                WeightRule((p + "attn.c_attn.weight",),
                           tuple(q + f"attn.{n}_proj.kernel" for n in "qkv"), _split3, _join3),
                WeightRule((p + "attn.c_attn.bias",),
                           tuple(q + f"attn.{n}_proj.bias" for n in "qkv"), _split3, _join3),
                _rule(p + "attn.c_proj.weight", q + "attn.o_proj.kernel"),
                _rule(p + "attn.c_proj.bias", q + "attn.o_proj.bias"),
                _rule(p + "mlp.c_fc.weight", q + "mlp.up_proj.kernel"),
                _rule(p + "mlp.c_fc.bias", q + "mlp.up_proj.bias"),
                _rule(p + "mlp.c_proj.weight", q + "mlp.down_proj.kernel"),
                _rule(p + "mlp.c_proj.bias", q + "mlp.down_proj.bias"),
            ]
        if not c.tie_word_embeddings:
            rules.append(_rule("lm_head.weight", "lm_head.kernel", transpose=True))
        return rules

    rules += [_rule("embed_tokens.weight", "embed_tokens"), _rule("norm.weight", "final_norm.scale")]
    for i in range(c.num_layers):
        p, q = f"layers.{i}.", f"layers.{i}."
        rules += [_rule(p + "input_layernorm.weight", q + "attn_norm.scale"),
                  _rule(p + "post_attention_layernorm.weight", q + "mlp_norm.scale")]
        for n in ("q", "k", "v", "o"):
            rules.append(_rule(p + f"self_attn.{n}_proj.weight", q + f"attn.{n}_proj.kernel", True))
            if (n != "o" and c.qkv_bias) or (n == "o" and c.out_bias):
                rules.append(_rule(p + f"self_attn.{n}_proj.bias", q + f"attn.{n}_proj.bias"))
        for n in ("gate", "up", "down"):
            rules.append(_rule(p + f"mlp.{n}_proj.weight", q + f"mlp.{n}_proj.kernel", True))
            if c.mlp_bias:
                rules.append(_rule(p + f"mlp.{n}_proj.bias", q + f"mlp.{n}_proj.bias"))
    if not c.tie_word_embeddings:
        rules.append(_rule("lm_head.weight", "lm_head.kernel", transpose=True))
    return rules


# Tensors some checkpoints carry that are buffers, not parameters.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def format_names(names: list[str], limit: int = 8) -> str:
    """``[a, b, ...] (N in all)``: a bounded listing of tensor names for error messages."""
    more = " ..." if len(names) > limit else ""
    return f"{names[:limit]}{more} ({len(names)} in all)"


def _hf_model_prefix(family: str) -> str:
    return "transformer." if family == "gpt2" else "model."


def _strip_prefix(name: str, family: str) -> str:
    prefix = _hf_model_prefix(family)
    return name[len(prefix):] if name.startswith(prefix) else name


def _flat_params(model: CausalLM) -> dict[str, Any]:
    return {".".join(map(str, path)): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def model_from_hf_tensors(config: ModelConfig, tensors: Mapping[str, np.ndarray]) -> CausalLM:
    """Build a :class:`CausalLM` from HF-named tensors, checking every name and shape."""
    by_name = {_strip_prefix(k, config.family): v for k, v in tensors.items()}
    file_name = {_strip_prefix(k, config.family): k for k in tensors}  # for messages
    if config.tie_word_embeddings:
        # Tied checkpoints sometimes store the head anyway; it must then equal the embedding.
        by_name.pop("lm_head.weight", None)
    rules = weight_rules(config)
    wanted = {n for r in rules for n in r.hf}
    missing = sorted(wanted - set(by_name))
    unused = sorted(n for n in set(by_name) - wanted if not n.endswith(_BUFFER_SUFFIXES))
    if missing or unused:
        parts = []
        if missing:
            parts.append(f"missing weight(s) {format_names(missing)}")
        if unused:
            parts.append(f"weight(s) no rule uses {format_names(unused)}")
        raise HFWeightsError("checkpoint does not match its config.json: " + "; ".join(parts) +
                             ". Is the checkpoint complete and of the family its config names?")

    model = abstract_model(config)
    params = _flat_params(model)
    values: dict[str, np.ndarray] = {}
    for r in rules:
        for ours, arr in zip(r.ours, r.to_ours([np.asarray(by_name[n]) for n in r.hf])):
            expect = params[ours].shape
            if tuple(arr.shape) != tuple(expect):
                raise HFWeightsError(f"weight {r.hf} -> {ours}: shape {tuple(arr.shape)} but the "
                                     f"config implies {tuple(expect)}")
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr.astype(np.float32))))
            if bad:
                raise HFWeightsError(
                    f"weight {file_name[r.hf[0]]!r} holds {bad} NaN/inf value(s) of "
                    f"{np.size(arr)}; the checkpoint is corrupt (or was saved after training "
                    f"diverged): re-download or re-export it")
            values[ours] = arr
    assert set(values) == set(params), sorted(set(params) ^ set(values))
    for name, var in params.items():
        var.set_value(jnp.asarray(values[name], dtype=config.params_dtype))
    return model


def model_to_hf_tensors(model: CausalLM, dtype=np.float32) -> dict[str, np.ndarray]:
    """HF-named tensors (with the family's model prefix) for ``model``."""
    config = model.config
    params = {k: np.asarray(v.get_value(), dtype=np.float32) for k, v in _flat_params(model).items()}
    out: dict[str, np.ndarray] = {}
    prefix = _hf_model_prefix(config.family)
    for r in weight_rules(config):
        for name, arr in zip(r.hf, r.to_hf([params[o] for o in r.ours])):
            full = name if name.startswith("lm_head.") else prefix + name
            out[full] = np.ascontiguousarray(arr).astype(dtype)
    return out


# ----------------------------------------------------------------------------------------------
# Directories
# ----------------------------------------------------------------------------------------------

# Every file an HF model directory may hold (ours and other exporters'): what replacing a model
# in a directory removes, so no stale shard, index or tokenizer file survives next to a new one.
HF_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors",
                  "model-*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "vocab.json", "merges.txt", "tokenizer.model", "stride_jax.json")


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    cfg = path / "config.json"
    if path.is_file():
        parent = f" ({path.parent})" if path.name == "config.json" or path.suffix in (
            ".safetensors", ".json") else ""
        raise FileNotFoundError(f"{path} is a file, not a directory; pass the model directory"
                                f"{parent} holding config.json and model.safetensors")
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist; pass a directory holding "
                                f"config.json and model.safetensors (an HF save_pretrained output)")
    if not cfg.is_file():
        raise FileNotFoundError(f"{path} has no config.json (it holds: "
                                f"{sorted(p.name for p in path.iterdir())[:20]}); pass an HF model "
                                f"directory")
    try:
        hf = json.loads(cfg.read_text(encoding="utf-8-sig"))   # a byte order mark is fine
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFConfigError(f"{cfg} is not valid UTF-8 JSON ({e}); the file is corrupt: "
                            f"re-download or re-export the model") from e
    if not isinstance(hf, dict):
        raise HFConfigError(f"{cfg} holds a JSON {type(hf).__name__}, not an object of settings; "
                            f"the file is corrupt: re-download or re-export the model")
    return hf


def from_hf(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str = "float32",
            strict: bool = True) -> CausalLM:
    """Load an HF causal-LM directory (``config.json`` + ``model.safetensors`` or a sharded index).

    Args:
      path: directory written by ``save_pretrained`` (or :func:`to_hf`).
      dtype: compute dtype (``float32`` or ``bfloat16``).
      param_dtype: storage dtype of the loaded parameters.
      strict: refuse config keys stride-jax does not know (see :data:`_HARMLESS`).
    """
    from stride_jax.io.safetensors import load_sharded

    hf = read_hf_config(path)
    try:
        config = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype, strict=strict)
    except HFConfigError:
        raise
    except KeyError as e:
        raise HFConfigError(f"{Path(path) / 'config.json'} lacks the setting {e}; the file is "
                            f"incomplete or not a causal-LM config: re-download or re-export "
                            f"the model") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        # A value of the wrong type, or out of range (ModelConfig checks each one).
        raise HFConfigError(f"{Path(path) / 'config.json'} holds a value stride-jax cannot use "
                            f"({e}); the file is corrupt or was edited: re-download or re-export "
                            f"the model") from None
    tensors = load_sharded(path)
    return model_from_hf_tensors(config, tensors)


def to_hf(model: CausalLM, path: str | os.PathLike, *, tokenizer=None,
          dtype: str = "float32") -> Path:
    """Write ``model`` as an HF directory that ``AutoModelForCausalLM.from_pretrained`` loads.

    Writes ``config.json`` and ``model.safetensors`` (and the tokenizer files when ``tokenizer`` is
    a ``tokenizers.Tokenizer``). Returns the directory.
    """
    from stride_jax.io.atomic import atomic_write_text
    from stride_jax.io.safetensors import save_file

    import ml_dtypes

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    hf = config_to_hf(model.config)
    hf["dtype"] = dtype
    save_file(model_to_hf_tensors(model, np_dtype), path / "model.safetensors",
              metadata={"format": "pt"})
    atomic_write_text(path / "config.json", json.dumps(hf, indent=2) + "\n")
    if tokenizer is not None:
        from stride_jax.tokenizer import MODEL_STAMP_FILE, save_tokenizer, tokenizer_fingerprint
        save_tokenizer(tokenizer, path)
        atomic_write_text(path / MODEL_STAMP_FILE, json.dumps(
            {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}) + "\n")
    return path
