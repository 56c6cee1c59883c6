"""Rows as long as the documents (issue 16): with ``data.seq_len`` null, a row is as long as the
longest document (training and queries) rounded up to a multiple of 16, at most the model's
context, instead of the context itself; padding never changes a score."""

from __future__ import annotations

import numpy as np
import pytest

from stride_jax.cli import main
from stride_jax.data import (ROW_MULTIPLE, Document, longest_row, pad_columns, read_documents,
                             tokenize_documents, tokenize_to_disk, write_jsonl)
from stride_jax.recipes import pretrain
from _tiny import TINY, write_pairs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("row_length")
    res = pretrain(TINY, root / "model", progress=False)
    write_pairs(root, res)
    # Shorter documents than the model's 32-token context (about 5-10 tokens each).
    for name in ("train.jsonl", "queries.jsonl"):
        docs = read_documents(root / name)
        write_jsonl([Document(d.id, d.text[:12]) if d.prompt is None else
                     Document(d.id, d.text[:6], d.prompt[:4]) for d in docs], root / name)
    return root, res.tokenizer


def test_fit_pads_to_the_longest_row_only(tiny, tmp_path):
    root, tok = tiny
    docs = read_documents(root / "train.jsonl")
    full = tokenize_documents(docs, tok, 32, mode="document")
    fit = tokenize_documents(docs, tok, 32, mode="document", fit=True)
    longest = int(full.attention_mask.sum(1).max())
    L = -(-longest // ROW_MULTIPLE) * ROW_MULTIPLE
    assert fit.seq_len == L < 32
    assert longest_row(iter(docs), tok, 32, chunk_docs=7) == L
    for name in ("input_ids", "attention_mask", "loss_mask"):
        np.testing.assert_array_equal(getattr(fit, name), getattr(full, name)[:, :L])
    assert not full.attention_mask[:, L:].any() and not full.loss_mask[:, L:].any()
    # Padding back to 32 gives the fixed-length rows exactly.
    back = pad_columns(fit, 32, int(full.input_ids[full.attention_mask == 0][0]))
    for name in ("input_ids", "attention_mask", "loss_mask"):
        np.testing.assert_array_equal(getattr(back, name), getattr(full, name))
    # The bound still holds, and streamed rows of that length are the same rows.
    assert tokenize_documents([Document("x", "word " * 200)], tok, 32, mode="document",
                              fit=True, truncate=True).seq_len == 32
    disk = tokenize_to_disk(iter(docs), tok, L, tmp_path / "tok", mode="document")
    np.testing.assert_array_equal(np.asarray(disk.input_ids), fit.input_ids)
    with pytest.raises(ValueError, match="fit=True needs mode=\"document\""):
        tokenize_documents(docs, tok, 32, mode="chunk", fit=True)


def _attribute(root, out, *extra):
    code = main(["-q", "attribute", "--model", str(root / "model"), "--train",
                 str(root / "train.jsonl"), "--queries", str(root / "queries.jsonl"), "--out",
                 str(out), "token_queries=0", *extra])
    assert code == 0
    return np.load(out / "scores.npy")


def test_attribute_fits_rows_to_the_documents(tiny, tmp_path, capsys):
    root, _ = tiny
    fitted = _attribute(root, tmp_path / "fit")
    assert "120 training rows and 3 queries of 16 tokens (data.seq_len null: the longest " \
           "document, rounded up)" in capsys.readouterr().out
    # Streamed (a length pass, then rows of that length on disk): the same rows.
    streamed = _attribute(root, tmp_path / "stream", "data.stream=on")
    assert "of 16 tokens" in capsys.readouterr().out
    np.testing.assert_array_equal(streamed, fitted)
    # The context-length rows of data.seq_len=32 give the same scores: padding is never scored
    # and never attended to by a real token.
    full = _attribute(root, tmp_path / "full", "data.seq_len=32")
    assert "of 32 tokens (data.seq_len)" in capsys.readouterr().out
    np.testing.assert_allclose(fitted, full, rtol=2e-4, atol=1e-6 * np.abs(full).max())
