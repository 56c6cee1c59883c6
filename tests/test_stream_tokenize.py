"""Streaming a training set larger than memory: documents read one at a time (iter_documents),
tokenized chunk by chunk into memory-mapped files (tokenize_to_disk, load_tokenized), and the
`attribute` command's data.stream option."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from stride_jax.data import (
    DataError,
    Document,
    iter_documents,
    load_tokenized,
    read_documents,
    read_jsonl,
    tokenize_documents,
    tokenize_to_disk,
    write_jsonl,
)
from stride_jax.tokenizer import PAD_TOKEN
# The word-level vocabulary (exact token counts) and the catalogue of malformed .jsonl files.
from test_data import BAD_JSONL, VOCAB

ARRAYS = ("input_ids", "attention_mask", "loss_mask")


@pytest.fixture(scope="module")
def wtok():
    """test_data's word-level tokenizer: "w3 w7" is [id(w3), id(w7)]."""
    import tokenizers
    from tokenizers import models, pre_tokenizers
    tok = tokenizers.Tokenizer(models.WordLevel(VOCAB, unk_token=PAD_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def _docs(n: int, seed: int = 0, prompts: bool = True) -> list[Document]:
    """``n`` documents of 1..20 words, every third with a prompt."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        text = " ".join(f"w{j}" for j in rng.integers(0, 30, rng.integers(1, 21)))
        prompt = (" ".join(f"p{j}" for j in rng.integers(0, 5, rng.integers(1, 4)))
                  if prompts and i % 3 == 0 else None)
        out.append(Document(f"d{i}", text, prompt=prompt))
    return out


def assert_same_rows(a, b) -> None:
    assert a.ids == b.ids and a.source_ids == b.source_ids
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == np.int32, name
        np.testing.assert_array_equal(x, y, err_msg=name)


# ----------------------------------------------------------------------------------------------
# tokenize_to_disk


@pytest.mark.parametrize("mode, options", [("document", {}), ("document", {"add_bos": True}),
                                           ("chunk", {}), ("chunk", {"min_tokens": 5})])
@pytest.mark.parametrize("chunk_docs", [1, 3, 10_000])
def test_tokenize_to_disk_equals_tokenize_documents(wtok, tmp_path, mode, options, chunk_docs):
    docs = _docs(40)
    # seq_len 8 cuts most documents into several chunks (and, in document mode, would refuse the
    # long ones, so those are truncated there).
    if mode == "document":
        options = {**options, "truncate": True}
    expected = tokenize_documents(docs, wtok, 8, mode=mode, **options)
    # A generator: the stream is consumed once, its length unknown up front.
    got = tokenize_to_disk((d for d in docs), wtok, 8, tmp_path / "t", mode=mode,
                           chunk_docs=chunk_docs, **options)
    assert_same_rows(got, expected)
    assert got.targets is None
    assert_same_rows(load_tokenized(tmp_path / "t"), expected)
    listed = json.loads((tmp_path / "t" / "ids.json").read_text())
    assert listed == {"ids": expected.ids, "source_ids": expected.source_ids}
    marker = json.loads((tmp_path / "t" / "complete.json").read_text())
    assert marker["rows"] == len(expected) and marker["seq_len"] == 8 and marker["mode"] == mode
    # Only the finished files: no temporary file is left behind.
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "attention_mask.npy", "complete.json", "ids.json", "input_ids.npy", "loss_mask.npy"]


def test_result_arrays_are_read_only_memmaps(wtok, tmp_path):
    ts = tokenize_to_disk(_docs(10), wtok, 8, tmp_path, mode="chunk")
    for loaded in (ts, load_tokenized(tmp_path)):
        for name in ARRAYS:
            a = getattr(loaded, name)
            assert isinstance(a, np.memmap), name
            assert not a.flags.writeable, name
    # A plain .npy file that any numpy reads.
    np.testing.assert_array_equal(np.load(tmp_path / "input_ids.npy"), ts.input_ids)


def test_tokenize_to_disk_errors(wtok, tmp_path):
    docs = _docs(20, prompts=False)
    # A duplicate id far from its first occurrence, in another chunk, is still refused.
    dup = [*docs, Document("d2", "w1 w2")]
    with pytest.raises(DataError, match="duplicate document id 'd2'"):
        tokenize_to_disk(dup, wtok, 8, tmp_path / "dup", mode="chunk", chunk_docs=3)
    assert not (tmp_path / "dup" / "complete.json").exists()
    assert list((tmp_path / "dup").iterdir()) == []   # the temporary files are removed
    with pytest.raises(DataError, match="no documents"):
        tokenize_to_disk(iter([]), wtok, 8, tmp_path / "none", mode="chunk")
    too_long = [*docs, Document("big", " ".join(["w1"] * 30))]   # the others fit in 24
    with pytest.raises(DataError, match="'big' has 31 tokens but seq_len is 24"):
        tokenize_to_disk(too_long, wtok, 24, tmp_path / "long", mode="document", chunk_docs=4)
    with pytest.raises(ValueError, match="chunk_docs"):
        tokenize_to_disk(docs, wtok, 8, tmp_path / "c", mode="chunk", chunk_docs=0)
    with pytest.raises(ValueError, match="mode"):
        tokenize_to_disk(docs, wtok, 8, tmp_path / "m", mode="rows")  # type: ignore[arg-type]


def test_incomplete_directory_is_rebuilt_and_refused_by_load(wtok, tmp_path):
    docs = _docs(30)
    expected = tokenize_documents(docs, wtok, 8, mode="chunk")
    d = tmp_path / "tok"
    with pytest.raises(DataError, match=f"{d}.*complete.json is missing"):
        load_tokenized(d)   # never written

    tokenize_to_disk(docs, wtok, 8, d, mode="chunk", chunk_docs=4)

    def killed(docs):   # a run that dies after some chunks were written
        yield from docs[:10]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tokenize_to_disk(killed(docs), wtok, 8, d, mode="chunk", chunk_docs=4)
    # The old marker went first, so the directory no longer claims to be complete.
    with pytest.raises(DataError, match=f"{d}.*complete.json is missing"):
        load_tokenized(d)
    # Leftovers of a process killed mid-write (which removes nothing) are cleared by the rebuild.
    (d / "input_ids.npy").write_bytes(b"torn")
    (d / ".loss_mask.npy.abc123.tmp").write_bytes(b"torn")
    assert_same_rows(tokenize_to_disk(docs, wtok, 8, d, mode="chunk", chunk_docs=4), expected)
    assert not (d / ".loss_mask.npy.abc123.tmp").exists()
    assert_same_rows(load_tokenized(d), expected)


def test_load_tokenized_checks_meta(wtok, tmp_path):
    meta = {"source": "train.jsonl", "size": 10, "seq_len": 8}
    tokenize_to_disk(_docs(5), wtok, 8, tmp_path, mode="document", truncate=True, meta=meta)
    assert len(load_tokenized(tmp_path, meta=dict(meta))) == 5
    with pytest.raises(DataError, match="other inputs"):
        load_tokenized(tmp_path, meta={**meta, "size": 11})


def test_peak_memory_is_bounded_by_the_chunk_not_the_set(wtok, tmp_path):
    n, seq_len, chunk_docs = 20_000, 256, 256
    full = 3 * n * seq_len * 4   # input_ids, attention_mask, loss_mask: 61 MB
    docs = (Document(f"d{i}", " ".join(f"w{(i + j) % 30}" for j in range(i % 7 + 1)))
            for i in range(n))   # generated on demand: the stream itself holds nothing
    # Imports made by the first call (jax, through the atomic writer) are not the call's memory.
    tokenize_to_disk([Document("x", "w1")], wtok, seq_len, tmp_path / "warm", mode="document")
    tracemalloc.start()
    try:
        ts = tokenize_to_disk(docs, wtok, seq_len, tmp_path / "t", mode="document",
                              chunk_docs=chunk_docs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ts) == n
    # What may be resident: one chunk's rows (3 x 256 x 256 x 4 B = 0.8 MB) and its token lists,
    # plus what grows with n but not with seq_len: the row ids and the set of seen ids (about
    # 4 MB for 20k ids; about 5 MB measured in all). Building the arrays in memory needs all of
    # `full`; a sixth of it (10 MB) leaves a 2x margin to the expected peak and is 6x below the
    # in-memory one.
    assert peak < full / 6, (peak, full)


# ----------------------------------------------------------------------------------------------
# iter_documents


def test_iter_documents_equals_read_documents(tmp_path):
    docs = _docs(50)
    path = write_jsonl(docs, tmp_path / "d.jsonl")
    it = iter_documents(path)
    assert not isinstance(it, list)
    assert list(it) == read_documents(path) == docs
    # Blank lines, integer ids, extra fields and CRLF line ends, as read_jsonl.
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(b'{"id": 7, "text": "seven", "x": 1}\r\n\r\n{"id": "8", "prompt": "p", '
                     b'"completion": "c"}\r\n')
    assert list(iter_documents(crlf)) == read_jsonl(crlf) == [Document("7", "seven"),
                                                               Document("8", "c", prompt="p")]
    # A text file is one document; a directory, its .txt files.
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "b.txt").write_text("bee")
    (tmp_path / "dir" / "sub" / "a.txt").write_text("ay")
    for p in (tmp_path / "dir", tmp_path / "dir" / "b.txt"):
        assert list(iter_documents(p)) == read_documents(p)


def test_iter_documents_reads_jsonl_lazily(tmp_path, monkeypatch):
    from pathlib import Path
    lines = [json.dumps({"id": f"d{i}", "text": "x"}) for i in range(500)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([*lines[:300], "{not json", *lines[300:]]) + "\n")

    def whole_file(*a, **k):
        raise AssertionError("read the whole file")
    monkeypatch.setattr(Path, "read_bytes", whole_file)
    monkeypatch.setattr(Path, "read_text", whole_file)
    it = iter_documents(path)
    assert next(it) == Document("d0", "x")   # the bad line 301 is not reached yet
    assert sum(1 for _ in zip(range(299), it)) == 299
    with pytest.raises(DataError, match=r"line 301: invalid JSON"):
        next(it)


def test_iter_documents_errors_match_read_jsonl(tmp_path):
    for case, (content, _) in BAD_JSONL.items():
        path = tmp_path / f"{case.replace(' ', '_').replace('/', '_')}.jsonl"
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        with pytest.raises(DataError) as eager:
            read_jsonl(path)
        with pytest.raises(DataError) as streamed:
            list(iter_documents(path))
        assert str(streamed.value) == str(eager.value), case
    # A duplicate id on distant lines names both.
    lines = [json.dumps({"id": f"d{i}", "text": "x"}) for i in range(1000)]
    lines[899] = json.dumps({"id": "d4", "text": "again"})
    path = tmp_path / "dup.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="duplicate id 'd4' on lines 5 and 900"):
        list(iter_documents(path))
    # Path problems are raised by the call itself, before any iteration.
    with pytest.raises(DataError, match="no such file"):
        iter_documents(tmp_path / "missing.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \*\.txt files"):
        iter_documents(tmp_path / "empty")


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    # JSON allows U+2028 and U+0085 unescaped inside strings (write_jsonl writes them so); a
    # JSON Lines record ends only at "\n".
    docs = [Document("a", "one\u2028two\x85three"), Document("b", "four")]
    path = write_jsonl(docs, tmp_path / "u.jsonl")
    assert read_jsonl(path) == list(iter_documents(path)) == docs


# ----------------------------------------------------------------------------------------------
# The attribute command


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from stride_jax.recipes import pretrain
    from _tiny import TINY
    out = tmp_path_factory.mktemp("tiny") / "model"
    return pretrain(TINY, out, progress=False), out


def test_row_texts_is_lazy(pretrained):
    from stride_jax.tokenizer import row_texts
    res, _ = pretrained
    rows = res.corpus.train.subset(range(5))
    texts = row_texts(rows, res.tokenizer)
    assert not isinstance(texts, list) and len(texts) == 5
    from stride_jax.tokenizer import as_backend
    real = rows.input_ids[0][rows.attention_mask[0] == 1]
    first = as_backend(res.tokenizer).decode(real.tolist())
    assert texts[0] == texts[-5] == first
    assert list(texts) == texts[:] == [texts[i] for i in range(5)]
    assert texts[np.int64(4)] == texts[4]
    with pytest.raises(IndexError):
        texts[5]


def test_attribute_command_streamed_equals_in_memory(pretrained, tmp_path, capsys):
    from stride_jax.cli import main
    from _tiny import write_pairs
    res, model_dir = pretrained
    write_pairs(tmp_path, res)
    runs = {}
    for stream in ("off", "on", "on"):   # the second streamed run reuses the tokenized rows
        out = tmp_path / f"run_{stream}"
        rc = main(["-q", "attribute", "--model", str(model_dir), "--train",
                   str(tmp_path / "train.jsonl"), "--queries", str(tmp_path / "queries.jsonl"),
                   "--out", str(out), "design.num_subsets=20", "design.per_example=4",
                   "train.epochs=1", "train.subsets_per_step=20", "token_queries=0",
                   f"data.stream={stream}"])
        printed, err = capsys.readouterr()
        assert rc == 0, err
        runs.setdefault(stream, []).append(printed)
    off, on = tmp_path / "run_off", tmp_path / "run_on"
    assert not (off / "tokens").exists()
    assert (on / "tokens" / "train" / "complete.json").is_file()
    assert "tokenizing" in runs["on"][0] and "reusing the tokenized" in runs["on"][1]
    np.testing.assert_array_equal(np.load(on / "scores.npy"), np.load(off / "scores.npy"))
    assert np.load(on / "scores.npy").shape == (3, 120)
    for name in ("ids.json", "topk.jsonl"):
        assert (on / name).read_text() == (off / name).read_text(), name
