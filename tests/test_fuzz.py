"""Property-based fuzzing of ``stride-jax attribute`` (hypothesis), in-process.

Generated inputs: JSON Lines and text training/query files under every kind of name (``.jsonl``,
``.json``, ``.txt``, none, ...), with byte order marks, CRLF line ends, control characters,
blank and very long lines, fields of the wrong type, missing fields and duplicate ids; binary
and wrongly encoded files; and config overrides in and out of range. Every case must end one of
two ways:

* exit status 0, with finite outputs that match the inputs: ``ids.json`` lists the training
  documents (JSON Lines) or the text's chunks and the queries, in order; ``scores.npy`` is
  ``[queries, train]``; ``topk.jsonl`` has one line per query; no file under the run directory
  holds a NaN or an infinity;
* exit status 2, with exactly one line on stderr, ``stride-jax attribute: error: ...``.

A traceback, a NaN in an output or any other status fails the test. Inputs the generator knows to
be clean must succeed, so the property cannot hold vacuously. Kept fast: a random-weight 2-layer
model (no training), K = 4 subsets, one epoch, a bounded number of examples and a fixed seed
(``derandomize``). Each failure it ever finds becomes a row of the README's bad-input catalogue.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings, strategies as st  # noqa: E402

from stride_jax.cli import main  # noqa: E402

# Small and fixed, so every case that reaches the pipeline costs about a second.
BASE = ["design.per_example=2", "train.epochs=1", "train.subsets_per_step=8",
        "train.rows_per_subset=2", "train.stability_rows=2", "train.tokens_per_row=4",
        "steering.rank=4", "token_queries=1", "data.seq_len=32", "solve.estimator=ridge"]

IN_RANGE = ["seed=3", "topk=2", "train.learning_rate=0.05", "token_queries=0",
            "solve.estimator=lasso", "measure.query_batch=1", "data.seq_len=24",
            "steering.site=final_hidden", "steering.site=residual", "scores=topk",
            "design.kind=bernoulli", "cache.dtype=bfloat16", "solve.lam=0.01"]
OUT_OF_RANGE = ["train.epochs=0", "train.epochs=-2", "data.seq_len=1", "data.seq_len=999",
                "token_queries=-1", "seed=-1", "seed=4294967296", "train.learning_rate=.nan",
                "train.learning_rate=.inf", "solve.cv_folds=9", "design.per_example=0",
                "design.num_subsets=3", "topk=0", "steering.rank=0", "measure.query_batch=0",
                "cache.memory_limit=big", "train.tokens_per_row=-1", "solve.lam=-1",
                "design.alpha=2", "solve.tol=.inf", "nonexistent.key=1", "train.epochs=abc",
                "steering.layer=7"]
EXTENSIONS = [".jsonl", ".json", ".txt", "", ".csv", ".md", ".JSONL", ".ndjson"]

SHORT = st.text(alphabet="abcdefghij klmnop,.!?", min_size=1, max_size=12).filter(str.strip)
ODD = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=16)


@st.composite
def documents(draw, *, queries: bool = False):
    """``(bytes, kind, ids)``: kind "clean" (valid JSON Lines whose documents fit), "jsonl"
    (maybe faulty), "text", "bytes" or "dir" (bytes: a JSON object of file name -> text, for a
    directory); ids are the documents' ids when clean."""
    kind = draw(st.sampled_from(["clean", "clean", "jsonl", "text", "bytes"]
                                + ([] if queries else ["dir"])))
    if kind == "dir":
        names = draw(st.lists(st.sampled_from(["a.txt", "b.txt", "sub/c.txt", "notes.md",
                                                ".hidden", "part.jsonl", "d.TXT"]),
                              min_size=1, max_size=4, unique=True))
        files = {n: draw(st.one_of(SHORT, ODD, st.just('{"id": "x", "text": "y"}'))) for n in names}
        return json.dumps(files).encode(), kind, None
    if kind == "bytes":
        raw = draw(st.one_of(st.binary(min_size=1, max_size=64),
                             ODD.map(lambda t: (t or "x").encode("utf-16")),
                             st.just(b"caf\xe9 au lait\n"), st.just(b"\x1f\x8b\x08rest")))
        return raw, kind, None
    if kind == "text":
        body = draw(st.one_of(SHORT, ODD, st.just("word " * 400)))
        bom = draw(st.booleans())
        return ("\ufeff" * bom + body).encode("utf-8"), kind, None
    # A clean training set has the 2 rows attribution needs at least (1 is refused).
    count = draw(st.integers(1 if queries or kind != "clean" else 2, 6))
    ids = [f"d{i}" for i in range(count)]
    lines = []
    for i in ids:
        if queries:
            lines.append({"id": i, "prompt": draw(SHORT), "completion": draw(SHORT)})
        else:
            lines.append({"id": i, "text": draw(SHORT)})
    if kind == "jsonl":   # one fault, or odd but valid content
        fault = draw(st.sampled_from(["wrong_type", "duplicate", "missing", "bad_json", "odd_text",
                                      "int_id", "huge"]))
        j = draw(st.integers(0, count - 1))
        if fault == "wrong_type":
            lines[j]["text" if "text" in lines[j] else "completion"] = draw(
                st.one_of(st.integers(), st.none(), st.lists(st.integers(), max_size=2)))
        elif fault == "duplicate":
            lines.append(dict(lines[j]))
        elif fault == "missing":
            lines[j].pop("text", None) or lines[j].pop("completion", None)
        elif fault == "odd_text":
            lines[j]["text" if "text" in lines[j] else "completion"] = draw(ODD)
        elif fault == "int_id":
            lines[j]["id"] = draw(st.one_of(st.integers(-5, 50), st.booleans(), st.floats()))
        elif fault == "huge":
            lines[j]["text" if "text" in lines[j] else "completion"] = "word " * 400
    text = [json.dumps(x) for x in lines]
    if kind == "jsonl" and fault == "bad_json":
        text[j] = text[j][:-1]
    sep = draw(st.sampled_from(["\n", "\r\n", "\n\n"]))
    bom = draw(st.booleans())
    raw = ("\ufeff" * bom + sep.join(text) + sep).encode("utf-8")
    return raw, kind, ids if kind == "clean" else None


def _strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"{name} in a JSON output")
    return json.loads(text, parse_constant=refuse)


def _check_outputs(run: Path, train_ids, query_ids) -> None:
    """Exit 0: finite outputs that match the inputs."""
    ids = _strict_json((run / "ids.json").read_text())
    if train_ids is not None:   # the generator knows them when the file is clean
        assert ids["train"] == train_ids
    if query_ids is not None:
        assert ids["queries"] == query_ids
    query_ids = ids["queries"]
    n, q = len(ids["train"]), len(query_ids)
    if (run / "scores.npy").exists():
        assert np.load(run / "scores.npy").shape == (q, n)
    else:
        with np.load(run / "scores_topk.npz") as z:
            assert z["pro_index"].shape[0] == q and z["pro_index"].max() < n
    lines = (run / "topk.jsonl").read_text(encoding="utf-8").splitlines()
    assert [_strict_json(x)["query_id"] for x in lines] == query_ids
    for path in run.rglob("*"):
        if path.suffix == ".npy":
            a = np.load(path, allow_pickle=False)
            assert a.dtype.kind not in "fc" or np.isfinite(a).all(), path
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                for k in z.files:
                    assert z[k].dtype.kind not in "fc" or np.isfinite(z[k]).all(), (path, k)
        elif path.suffix in (".json", ".jsonl") and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines() if path.suffix == \
                    ".jsonl" else [path.read_text(encoding="utf-8")]:
                _strict_json(line)


@pytest.fixture(scope="module")
def fuzz_model(tmp_path_factory):
    """A random-weight 2-layer model (no training: the pipeline only needs its shapes) with a
    byte-level BPE, saved as an HF directory; and a clean queries file."""
    from stride_jax.model.config import tiny_llama
    from stride_jax.model.hf import to_hf
    from stride_jax.model.transformer import init_model
    from stride_jax.tokenizer import train_bpe, vocab_size_of
    root = tmp_path_factory.mktemp("fuzz")
    tok = train_bpe(["the quick brown fox jumps over the lazy dog, abcdefghij klmnop!? " * 20],
                    vocab_size=300)
    cfg = tiny_llama(vocab_size=vocab_size_of(tok), hidden_size=16, num_heads=2,
                     num_kv_heads=1, head_dim=8, intermediate_size=32, num_layers=2,
                     max_position_embeddings=32)
    to_hf(init_model(cfg, seed=0), root / "model", tokenizer=tok)
    queries = root / "queries.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{i}", "prompt": "the quick",
                                           "completion": f" fox {i}"}) + "\n" for i in range(2)))
    return root / "model", queries


@settings(max_examples=24, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(train=documents(), ext=st.sampled_from(EXTENSIONS),
       queries=st.one_of(st.none(), st.none(), st.none(), documents(queries=True)),
       overrides=st.lists(st.sampled_from(IN_RANGE + OUT_OF_RANGE), max_size=2))
def test_attribute_ends_in_finite_outputs_or_one_line(fuzz_model, capsys, train, ext, queries,
                                                      overrides):
    model, good_queries = fuzz_model
    raw, kind, train_ids = train
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        train_path = d / f"train{ext}"
        if kind == "dir":
            for name, text in json.loads(raw).items():
                (train_path / name).parent.mkdir(parents=True, exist_ok=True)
                (train_path / name).write_text(text, encoding="utf-8")
        else:
            train_path.write_bytes(raw)
        query_ids = ["q0", "q1"]
        query_path = good_queries
        if queries is not None:
            query_path = d / "queries.jsonl"
            query_path.write_bytes(queries[0])
            query_ids = queries[2]   # None unless clean
        capsys.readouterr()
        rc = main(["-q", "attribute", "--model", str(model), "--train", str(train_path),
                   "--queries", str(query_path), "--out", str(d / "run"), *BASE, *overrides])
        err = capsys.readouterr().err
        event(f"exit {rc}")   # --hypothesis-show-statistics shows how the cases ended
        assert "Traceback" not in err, err
        if rc == 2:
            lines = [x for x in err.splitlines() if x.strip()]
            assert len(lines) == 1 and lines[0].startswith("stride-jax attribute: error: "), err
            clean = (kind == "clean" and (queries is None or queries[1] == "clean")
                     and not set(overrides) & set(OUT_OF_RANGE))
            assert not clean, f"clean input refused: {err}"
            return
        assert rc == 0, (rc, err)
        _check_outputs(d / "run", train_ids, query_ids)
