"""`stride-jax attribute --method M` for every method other than STRIDE, on a tiny model: the same
outputs with the same sign, duplicates found, stages reused, mixtures, report/select, bad input.

STRIDE itself is covered by tests/test_attribute.py; here one run per method (module fixture),
with a query that duplicates training row ``d5``.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from stride_jax.cli import main
from stride_jax.data import Document, read_documents, write_jsonl
from stride_jax.methods import default_mixture, mix_scores, parse_method
from stride_jax.recipes import pretrain
from _tiny import TINY, write_pairs

METHODS = ["ekfac", "kfac", "trak", "logra", "tracin", "graddot", "if", "bm25", "repsim"]
DUP = 5                                         # query "dup" is training row d5
FAST = ["topk=4", "methods.trak.proj_dim=64", "methods.ekfac.batch_size=40"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    write_pairs(root, pretrain(TINY, root / "model", progress=False))
    train = read_documents(root / "train.jsonl")
    queries = read_documents(root / "queries.jsonl")[:2]
    write_jsonl([Document(id="dup", text=train[DUP].text), *queries], root / "q.jsonl")
    return root


def _args(root, out, method, *extra):
    return ["-q", "attribute", "--model", str(root / "model"), "--train", str(root / "train.jsonl"),
            "--queries", str(root / "q.jsonl"), "--out", str(out), "--method", method, *FAST,
            *extra]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("method_runs")
    for m in METHODS:
        assert main(_args(data, out / m, m)) == 0, m
    return out


@pytest.mark.parametrize("method", METHODS)
def test_outputs_shape_and_the_duplicate_is_the_top_positive_proponent(runs, method):
    run = runs / method
    scores = np.load(run / "scores.npy", allow_pickle=False)
    assert scores.shape == (3, 120) and scores.dtype == np.float32
    assert np.isfinite(scores).all()
    ids = json.loads((run / "ids.json").read_text())
    assert ids["queries"] == ["dup", "q0", "q1"] and len(ids["train"]) == 120
    # Sign: the query's own training row is its strongest proponent, with a positive score.
    assert int(np.argmax(scores[0])) == DUP and scores[0, DUP] > 0, scores[0, :8]
    recs = [json.loads(x) for x in (run / "topk.jsonl").read_text().splitlines()]
    assert recs[0]["proponents"][0]["id"] == f"d{DUP}"
    assert recs[0]["proponents"][0]["text"].strip()
    assert "lambda" not in recs[0] and recs[0]["base_loss"] > 0
    for rec, row in zip(recs, scores):
        assert [e["score"] for e in rec["proponents"]] == sorted(row[row > 0])[::-1][:4]
    assert parse_method(method).text in (run / "attribute.yaml").read_text()


def test_a_rerun_reuses_every_stage_and_tracin_without_checkpoints_is_graddot(runs, data,
                                                                           capsys, caplog):
    before = np.load(runs / "ekfac" / "scores.npy")
    with caplog.at_level(logging.INFO, logger="stride_jax.methods"):
        assert main(_args(data, runs / "ekfac", "ekfac")) == 0
    for stage in ("factors/kfac", "factors/ekfac"):
        assert f"reusing {runs / 'ekfac' / stage}" in caplog.text, caplog.text
    np.testing.assert_array_equal(np.load(runs / "ekfac" / "scores.npy"), before)
    np.testing.assert_array_equal(np.load(runs / "tracin" / "scores.npy"),
                                  np.load(runs / "graddot" / "scores.npy"))
    # Other settings are refused, naming the key, unless --overwrite.
    assert main(_args(data, runs / "ekfac", "ekfac", "methods.ekfac.layers=mlp")) == 2
    assert "layers: 'blocks' -> 'mlp'" in capsys.readouterr().err


def test_mixture_is_the_weighted_sum_of_per_query_zscores(runs, data, capsys, caplog):
    graddot = np.load(runs / "graddot" / "scores.npy")
    bm25 = np.load(runs / "bm25" / "scores.npy")
    out = runs / "bm25"
    # Another method in the same --out is another run: refused, naming the method ...
    assert main(_args(data, out, "mix:bm25=0.5,graddot=2")) == 2
    assert "method: 'bm25' -> 'mix:bm25=0.5,graddot=2'" in capsys.readouterr().err
    # ... unless --overwrite, which keeps the stamped method stages: the bm25 stage is reused
    # and graddot is computed there.
    with caplog.at_level(logging.INFO, logger="stride_jax.methods"):
        assert main(_args(data, out, "mix:bm25=0.5,graddot=2", "--overwrite")) == 0
    assert f"reusing {out / 'methods' / 'bm25'}" in caplog.text, caplog.text
    want = mix_scores({"bm25": bm25, "graddot": graddot}, {"bm25": 0.5, "graddot": 2.0})
    np.testing.assert_allclose(np.load(out / "scores.npy"), want, rtol=1e-6, atol=1e-6)
    z = (graddot - graddot.mean(1, keepdims=True)) / graddot.std(1, keepdims=True)
    np.testing.assert_allclose(mix_scores({"g": graddot}, {"g": 1.0}), z, rtol=1e-5, atol=1e-5)
    assert "method: mix:bm25=0.5,graddot=2" in (out / "attribute.yaml").read_text()
    assert sum(default_mixture().values()) > 0


def test_report_and_select_accept_a_method_run(runs, capsys):
    assert main(["report", str(runs / "ekfac")]) == 0
    page = (runs / "ekfac" / "report.html").read_text()
    assert "method <b>ekfac</b>" in page and "<dt>ekfac damping_fraction</dt>" in page
    # Each query names what produced its scores (per_query.npz / topk.jsonl: estimator).
    recs = [json.loads(x) for x in (runs / "ekfac" / "topk.jsonl").read_text().splitlines()]
    assert {r["estimator"] for r in recs} == {"ekfac"}
    assert page.count("nats/token · ekfac · ") == len(recs)
    capsys.readouterr()
    assert main(["select", "--run", str(runs / "ekfac"), "--k", "5"]) == 0
    assert "selected 5 examples (ekfac scores) by zscore" in capsys.readouterr().out
    sel = [json.loads(x) for x in (runs / "ekfac" / "selected.jsonl").read_text().splitlines()]
    assert len(sel) == 5


@pytest.mark.parametrize("case", [
    "unknown_method", "mixture_without_weight", "self_influence", "no_matching_layer",
    "negative_damping", "missing_train_file", "config_typo", "memory_budget"])
def test_bad_input(data, tmp_path, capsys, case):
    method, extra = "ekfac", []
    expect = {"unknown_method": "unknown method 'ekfax'; choose from stride, ekfac",
              "mixture_without_weight": "mixture component 'stride' in 'mix:stride' needs a "
                                        "weight",
              "self_influence": "--self-influence uses STRIDE's operators",
              "no_matching_layer": "layers='nothing' matches none of the model's 14 dense layers",
              "negative_damping": "methods.ekfac.damping=-1.0 must be > 0",
              "missing_train_file": "nope.jsonl: no such file",
              "config_typo": "did you mean 'methods.ekfac.damping'",
              "memory_budget": "the ekfac stage needs about"}[case]
    if case == "unknown_method":
        method = "ekfax"
    elif case == "mixture_without_weight":
        method = "mix:stride"
    elif case == "self_influence":
        extra = ["--self-influence"]
    elif case == "no_matching_layer":
        extra = ["methods.ekfac.layers=nothing"]
    elif case == "negative_damping":
        extra = ["methods.ekfac.damping=-1"]
    elif case == "config_typo":
        extra = ["methods.ekfac.dampin=1"]
    elif case == "memory_budget":
        extra = ["--memory-budget", "10KiB"]
    args = _args(data, tmp_path / "run", method, *extra)
    if case == "missing_train_file":
        args[args.index("--train") + 1] = str(tmp_path / "nope.jsonl")
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("stride-jax attribute: error: "), err
    assert expect in err, err
    # No scores were written for a refused run.
    assert not (tmp_path / "run" / "scores.npy").exists()
