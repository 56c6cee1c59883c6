"""Numerical parity with transformers' PyTorch models on tiny random configs (float32)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the `test` extra (torch==2.13.0)")
transformers = pytest.importorskip("transformers")

from stride_jax.model import ModelConfig, init_model  # noqa: E402
from stride_jax.model._layers import Norm, apply_rope, rope_cos_sin  # noqa: E402
from stride_jax.model.hf import HFConfigError, HFWeightsError, config_from_hf, from_hf, to_hf  # noqa: E402

MODEL_TOL = 1e-4
MODULE_TOL = 1e-5
VOCAB = 97


def _hf_config(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  max_position_embeddings=64)
    if kind == "llama_mha":
        return transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=4,
                                        tie_word_embeddings=False, rms_norm_eps=1e-5, **common)
    if kind == "llama_gqa":
        return transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True, rope_theta=500.0, **common)
    if kind == "llama_bias_llama3rope":
        return transformers.LlamaConfig(
            num_attention_heads=4, num_key_value_heads=1, attention_bias=True, mlp_bias=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16}, **common)
    if kind == "qwen2":
        return transformers.Qwen2Config(num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=False, **common)
    if kind == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                       n_positions=64, bos_token_id=0, eos_token_id=0)
    raise KeyError(kind)


KINDS = ["llama_mha", "llama_gqa", "llama_bias_llama3rope", "qwen2", "gpt2"]


def _save_random_hf(kind: str, path, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(kind))
    # Random (non-default) norm and bias values so a mis-mapped norm or bias cannot pass.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name or "ln_" in name else 0.0))
    model.eval()
    model.save_pretrained(path)
    return model


def _torch_logits(model, ids, mask=None):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
    return out.logits.numpy()


def _batch(seed=1, b=3, t=17):
    rng = np.random.default_rng(seed)
    return rng.integers(0, VOCAB, size=(b, t)).astype(np.int64)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(kind, tmp_path):
    torch_model = _save_random_hf(kind, tmp_path)
    ours = from_hf(tmp_path)
    ids = _batch()
    ref = _torch_logits(torch_model, ids)
    got = np.asarray(ours(jnp.asarray(ids)))
    assert got.shape == (3, 17, VOCAB)
    np.testing.assert_allclose(got, ref, atol=MODEL_TOL, rtol=0)


@pytest.mark.parametrize("kind", ["llama_gqa", "gpt2"])
def test_padded_batch_matches_transformers(kind, tmp_path):
    torch_model = _save_random_hf(kind, tmp_path)
    ours = from_hf(tmp_path)
    ids = _batch(seed=2, b=2, t=12)
    mask = np.ones_like(ids)
    mask[0, 8:] = 0  # right padding
    ref = _torch_logits(torch_model, ids, mask)
    got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], ref[valid], atol=MODEL_TOL, rtol=0)
    # Padding must not leak into real positions: the padded row equals the unpadded prefix.
    alone = np.asarray(ours(jnp.asarray(ids[:1, :8])))
    np.testing.assert_allclose(got[0, :8], alone[0], atol=MODULE_TOL, rtol=0)


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2", "gpt2"])
def test_residual_sites_match_hidden_states(kind, tmp_path):
    torch_model = _save_random_hf(kind, tmp_path)
    ours = from_hf(tmp_path)
    ids = _batch(seed=3)
    with torch.no_grad():
        hs = torch_model(input_ids=torch.tensor(ids), output_hidden_states=True).hidden_states
    out = ours.forward(jnp.asarray(ids), capture=["residual.0", "final_hidden"])
    # hidden_states[1] is block 0's output; the last entry has the final norm applied.
    np.testing.assert_allclose(np.asarray(out.activations["residual.0"]), hs[1].numpy(),
                               atol=MODEL_TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out.activations["final_hidden"]), hs[-1].numpy(),
                               atol=MODEL_TOL, rtol=0)


def test_rmsnorm_matches_torch():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    cfg = ModelConfig(hidden_size=48, norm_eps=1e-6)
    x = np.random.default_rng(0).normal(size=(2, 5, 48)).astype(np.float32) * 3
    w = np.random.default_rng(1).normal(size=(48,)).astype(np.float32)
    ref = LlamaRMSNorm(48, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(w))
        expect = ref(torch.tensor(x)).numpy()
    norm = Norm(48, config=cfg)
    norm.scale.set_value(jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), expect, atol=MODULE_TOL, rtol=0)


def test_layernorm_matches_torch():
    cfg = ModelConfig(family="gpt2", hidden_size=48, num_heads=4, num_kv_heads=4, head_dim=12,
                      norm_eps=1e-5)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 48)).astype(np.float32) * 3 + 1
    w, b = rng.normal(size=(48,)).astype(np.float32), rng.normal(size=(48,)).astype(np.float32)
    ref = torch.nn.LayerNorm(48, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(w))
        ref.bias.copy_(torch.tensor(b))
        expect = ref(torch.tensor(x)).numpy()
    norm = Norm(48, config=cfg)
    norm.scale.set_value(jnp.asarray(w))
    norm.bias.set_value(jnp.asarray(b))
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), expect, atol=MODULE_TOL, rtol=0)


@pytest.mark.parametrize("kind", ["llama_gqa", "llama_bias_llama3rope"])
def test_rotary_matches_transformers(kind):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    hf_cfg = _hf_config(kind)
    cfg = config_from_hf(hf_cfg.to_dict())
    rng = np.random.default_rng(0)
    b, t, h, hd = 2, 40, 4, cfg.head_dim
    q = rng.normal(size=(b, t, h, hd)).astype(np.float32)
    k = rng.normal(size=(b, t, 2, hd)).astype(np.float32)
    pos = np.stack([np.arange(t), np.arange(t) + 5])
    rot = LlamaRotaryEmbedding(hf_cfg)
    with torch.no_grad():
        cos, sin = rot(torch.tensor(q), torch.tensor(pos))
        qe, ke = apply_rotary_pos_emb(torch.tensor(q).transpose(1, 2), torch.tensor(k).transpose(1, 2),
                                      cos, sin)
    ours_cs = rope_cos_sin(jnp.asarray(pos), cfg)
    np.testing.assert_allclose(np.asarray(ours_cs[0]), cos.numpy(), atol=MODULE_TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(apply_rope(jnp.asarray(q), *ours_cs)),
                               qe.transpose(1, 2).numpy(), atol=MODULE_TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(apply_rope(jnp.asarray(k), *ours_cs)),
                               ke.transpose(1, 2).numpy(), atol=MODULE_TOL, rtol=0)


def test_attention_block_matches_transformers(tmp_path):
    """One Llama attention module, GQA, fed the same input, compared with an explicit mask."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    torch_model = _save_random_hf("llama_gqa", tmp_path)
    ours = from_hf(tmp_path)
    hf_attn = torch_model.model.layers[1].self_attn
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 9, 64)).astype(np.float32)
    pos = np.broadcast_to(np.arange(9), (2, 9))
    causal = np.triu(np.full((9, 9), -1e30, dtype=np.float32), k=1)[None, None]
    with torch.no_grad():
        pe = LlamaRotaryEmbedding(torch_model.config)(torch.tensor(x), torch.tensor(pos))
        expect = hf_attn(torch.tensor(x), position_embeddings=pe,
                         attention_mask=torch.tensor(np.broadcast_to(causal, (2, 1, 9, 9)).copy()))[0]
    ctx, _ = ours.context(jnp.zeros((2, 9), jnp.int32))
    got = ours.layers[1].attn(jnp.asarray(x), ctx.mask_bqk, ctx.rope)
    np.testing.assert_allclose(np.asarray(got), expect.numpy(), atol=MODULE_TOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_through_to_hf(kind, tmp_path):
    """ours -> to_hf -> transformers gives the same logits as ours, and reloads to the same params."""
    src = tmp_path / "src"
    _save_random_hf(kind, src, seed=7)
    ours = from_hf(src)
    out = to_hf(ours, tmp_path / "exported")
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    torch_model.eval()
    ids = _batch(seed=5)
    np.testing.assert_allclose(_torch_logits(torch_model, ids), np.asarray(ours(jnp.asarray(ids))),
                               atol=MODEL_TOL, rtol=0)
    again = from_hf(out)
    leaves_a = jax.tree.leaves(jax.tree.map(np.asarray, __import__("flax").nnx.state(ours)))
    leaves_b = jax.tree.leaves(jax.tree.map(np.asarray, __import__("flax").nnx.state(again)))
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(a, b)


def test_our_random_model_exports_and_loads_in_transformers(tmp_path):
    cfg = ModelConfig(family="qwen2", vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4,
                      num_kv_heads=1, head_dim=8, intermediate_size=80, qkv_bias=True,
                      tie_word_embeddings=False)
    ours = init_model(cfg, seed=3)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(to_hf(ours, tmp_path))
    ids = _batch(seed=6)
    np.testing.assert_allclose(_torch_logits(torch_model, ids), np.asarray(ours(jnp.asarray(ids))),
                               atol=MODEL_TOL, rtol=0)


def test_bfloat16_compute_is_close_to_float32(tmp_path):
    _save_random_hf("llama_gqa", tmp_path)
    f32 = from_hf(tmp_path)
    bf16 = from_hf(tmp_path, dtype="bfloat16")
    ids = jnp.asarray(_batch())
    a, b = np.asarray(f32(ids)), np.asarray(bf16(ids))
    assert b.dtype == np.float32  # logits are returned in float32 whatever the compute dtype
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()
    assert np.abs(a - b).max() > 0  # bf16 really ran


# Loader strictness --------------------------------------------------------------------------

def test_unknown_hf_setting_is_rejected(tmp_path):
    _save_random_hf("llama_gqa", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["attn_logit_softcapping"] = 30.0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFConfigError, match="attn_logit_softcapping"):
        from_hf(tmp_path)
    assert from_hf(tmp_path, strict=False) is not None  # explicit opt-out


def test_unsupported_value_is_rejected():
    cfg = _hf_config("llama_gqa").to_dict()
    cfg["hidden_act"] = "gelu"
    with pytest.raises(HFConfigError, match="hidden_act"):
        config_from_hf(cfg)
    cfg = _hf_config("llama_gqa").to_dict()
    cfg["pretraining_tp"] = 2
    with pytest.raises(HFConfigError, match="pretraining_tp"):
        config_from_hf(cfg)
    with pytest.raises(HFConfigError, match="model_type"):
        config_from_hf({"model_type": "bert"})


def test_missing_and_unused_weights_are_rejected(tmp_path):
    from stride_jax.io.safetensors import load_file, save_file

    _save_random_hf("llama_mha", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    dropped = dict(tensors)
    del dropped["model.layers.1.mlp.up_proj.weight"]
    save_file(dropped, tmp_path / "model.safetensors")
    with pytest.raises(HFWeightsError, match="missing.*layers.1.mlp.up_proj.weight"):
        from_hf(tmp_path)
    extra = dict(tensors)
    extra["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
    save_file(extra, tmp_path / "model.safetensors")
    with pytest.raises(HFWeightsError, match="q_norm"):
        from_hf(tmp_path)


def test_wrong_shape_and_nan_weights_are_rejected(tmp_path):
    from stride_jax.io.safetensors import load_file, save_file

    _save_random_hf("gpt2", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    bad = dict(tensors)
    bad["transformer.wte.weight"] = bad["transformer.wte.weight"][:-1]
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(HFWeightsError, match="shape"):
        from_hf(tmp_path)
    bad = dict(tensors)
    w = bad["transformer.h.0.mlp.c_fc.weight"].copy()
    w[0, 0] = np.nan
    bad["transformer.h.0.mlp.c_fc.weight"] = w
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(HFWeightsError, match="NaN"):
        from_hf(tmp_path)


def test_missing_directory_and_weights_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_hf(tmp_path / "nope")
    (tmp_path / "m").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(tmp_path / "m")
    _save_random_hf("gpt2", tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(Exception, match="safetensors"):
        from_hf(tmp_path / "m")


def test_sharded_checkpoint_loads(tmp_path):
    torch_model = _save_random_hf("qwen2", tmp_path / "src")
    torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids = _batch()
    np.testing.assert_allclose(np.asarray(from_hf(tmp_path / "sharded")(jnp.asarray(ids))),
                               _torch_logits(torch_model, ids), atol=MODEL_TOL, rtol=0)
