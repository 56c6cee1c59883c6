"""Tokenizer training, saving/loading, HF parity and special-id handling."""

from __future__ import annotations

import json

import pytest

from stride_jax.data import shakespeare_plays
from stride_jax.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    SpecialIds,
    check_vocab_matches,
    load_tokenizer,
    save_tokenizer,
    special_ids,
    train_bpe,
    vocab_size_of,
)

SAMPLES = [
    "To be, or not to be: that is the question.",
    "  leading spaces and\ttabs\nnew lines  ",
    "Ünïcödé — “quotes” and emoji 🎭 too",
    f"two docs{EOS_TOKEN}joined by eos",
]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [d.text for d in shakespeare_plays(["tempest", "macbeth"])]


@pytest.fixture(scope="module")
def tok(texts):
    return train_bpe(texts, 512)


def test_train_is_deterministic(texts, tok):
    again = train_bpe(texts, 512)
    assert again.to_str() == tok.to_str()
    assert tok.get_vocab_size() == 512


def test_special_tokens_come_first_and_roundtrip(tok):
    assert tok.token_to_id(EOS_TOKEN) == 0
    assert tok.token_to_id(PAD_TOKEN) == 1
    assert special_ids(tok) == SpecialIds(eos_id=0, pad_id=1, bos_id=0)
    for s in SAMPLES:
        enc = tok.encode(s)
        assert tok.decode(enc.ids, skip_special_tokens=False) == s
    # The eos string is one token, not split into bytes.
    assert tok.encode(SAMPLES[3]).ids.count(0) == 1
    # Byte-level without a prefix space: "the" and " the" are different tokens.
    assert tok.encode("the").ids != tok.encode(" the").ids[-1:]


def test_merges_compress(tok, texts):
    n_bytes = len(texts[0].encode())
    n_tokens = len(tok.encode(texts[0]).ids)
    assert n_tokens < 0.6 * n_bytes


def test_vocab_too_small_raises():
    with pytest.raises(ValueError, match="vocab_size=200"):
        train_bpe(["abc"], 200)


def test_save_load_roundtrip(tok, tmp_path):
    out = save_tokenizer(tok, tmp_path / "tk", model_max_length=128)
    assert sorted(p.name for p in out.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["eos_token"] == EOS_TOKEN and config["pad_token"] == PAD_TOKEN
    assert config["model_max_length"] == 128
    for path in (out, out / "tokenizer.json"):
        loaded = load_tokenizer(path)
        assert loaded.to_str() == tok.to_str()


def test_load_missing_names_path_and_file(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(e.value)
    assert "expected a `tokenizer.json` file" in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")


def test_autotokenizer_parity(tok, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    save_tokenizer(tok, tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(hf, PreTrainedTokenizerFast)
    assert (hf.eos_token, hf.bos_token, hf.pad_token) == (EOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert special_ids(hf) == special_ids(tok)
    for s in SAMPLES:
        assert hf(s)["input_ids"] == tok.encode(s).ids
        assert hf.decode(tok.encode(s).ids) == s


def test_no_pad_token(texts):
    tok = train_bpe(texts[:1], 300, special_tokens=(EOS_TOKEN,))
    ids = special_ids(tok)
    assert ids == SpecialIds(eos_id=0, pad_id=None, bos_id=0)
    assert ids.filler_id == 0
    assert SpecialIds(None, None, None).filler_id == 0
    assert SpecialIds(eos_id=5, pad_id=7, bos_id=None).filler_id == 7


def test_check_vocab_matches(tok):
    assert vocab_size_of(tok) == 512
    check_vocab_matches(tok, 512)
    check_vocab_matches(tok, 576)  # padded embedding is fine
    with pytest.raises(ValueError) as e:
        check_vocab_matches(tok, 500)
    msg = str(e.value)
    assert "tokenizer has 512 tokens" in msg
    assert "embedding has 500 rows" in msg
    assert "tokenizer saved with the model" in msg
