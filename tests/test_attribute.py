"""The Attributor facade and the `attribute` command: stages, stamps, outputs, bad input."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from stride_jax.attributor import AttributeConfig, Attributor, DesignConfig
from stride_jax.cli import main
from stride_jax.data import Document, write_jsonl
from stride_jax.io.stamps import StaleArtifactError
from stride_jax.recipes import pretrain
from stride_jax.train import OperatorTrainConfig
from _tiny import TINY, write_pairs


FAST = AttributeConfig(
    operators="trained",
    design=DesignConfig(num_subsets=40, per_example=4),
    train=OperatorTrainConfig(epochs=3, subsets_per_step=20, rows_per_subset=4, stability_rows=4,
                              tokens_per_row=8),
    topk=3)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    res = pretrain(TINY, out, progress=False)
    train = res.corpus.train.subset(range(300))
    return res, out, train, res.corpus.heldout.subset(range(4))


def test_attributor_stages_write_stamped_artifacts_and_reuse_them(pretrained, tmp_path):
    res, _, train, queries = pretrained
    att = Attributor(res.model, train, FAST, workdir=tmp_path, progress=False)
    out = att.attribute(queries)
    assert out.scores_qn.shape == (4, 300) and out.scores_qn.dtype == np.float32
    assert np.isfinite(out.scores_qn).all()
    assert out.y_qk.shape == (4, 40)
    stamps = [tmp_path / "design" / "stamp.json", tmp_path / "operators" / "stamp.json",
              *(tmp_path / "responses").glob("*/stamp.json"), *(tmp_path / "solve").glob("*/stamp.json")]
    assert len(stamps) == 4
    for stamp in stamps:
        assert json.loads(stamp.read_text())["complete"] is True, stamp
    # A second Attributor with the same arguments reuses every stage and gives the same scores.
    again = Attributor(res.model, train, FAST, workdir=tmp_path, progress=False).attribute(queries)
    np.testing.assert_array_equal(again.scores_qn, out.scores_qn)
    # Different arguments are refused, naming what changed.
    other = dataclasses.replace(FAST, steering=dataclasses.replace(FAST.steering, rank=4))
    with pytest.raises(StaleArtifactError, match="steering.rank"):
        Attributor(res.model, train, other, workdir=tmp_path, progress=False).attribute(queries)
    # ...unless overwrite is asked for.
    Attributor(res.model, train, other, workdir=tmp_path, overwrite=True,
               progress=False).fit_operators()


def test_in_memory_run_equals_the_stored_run(pretrained, tmp_path):
    res, _, train, queries = pretrained
    a = Attributor(res.model, train, FAST, progress=False).attribute(queries)
    b = Attributor(res.model, train, FAST, workdir=tmp_path, progress=False).attribute(queries)
    np.testing.assert_array_equal(a.scores_qn, b.scores_qn)


def test_outputs_and_sign_convention(pretrained, tmp_path):
    res, _, train, queries = pretrained
    out = Attributor(res.model, train, FAST, progress=False).attribute(queries)
    out.write(tmp_path, train_texts=[f"t{i}" for i in range(len(train))],
              query_texts=[f"q{i}" for i in range(len(queries))], k=3)
    scores = np.load(tmp_path / "scores.npy", allow_pickle=False)
    np.testing.assert_array_equal(scores, out.scores_qn)
    lines = [json.loads(x) for x in (tmp_path / "topk.jsonl").read_text().splitlines()]
    assert [x["query_id"] for x in lines] == list(queries.ids)
    for q, rec in enumerate(lines):
        for e in rec["proponents"]:
            assert e["score"] > 0 and e["text"] == f"t{e['index']}"
            assert scores[q, e["index"]] == pytest.approx(e["score"])
        for e in rec["opponents"]:
            assert e["score"] < 0
    # Sign: the solve reproduces y = M w + b, so an example's score moves the responses of its
    # subsets, and y > 0 means the operator lowered the loss.
    design = Attributor(res.model, train, FAST, progress=False).design()
    fitted = design.matvec(out.scores_qn.astype(np.float64)) + out.intercept_q[:, None]
    assert np.corrcoef(fitted.ravel(), out.y_qk.ravel())[0, 1] > 0


def test_attribute_command_end_to_end(pretrained, tmp_path, capsys):
    res, model_dir, _, _ = pretrained
    write_pairs(tmp_path, res)
    rc = main(["-q", "attribute", "--model", str(model_dir), "--train", str(tmp_path / "train.jsonl"),
               "--queries", str(tmp_path / "queries.jsonl"), "--out", str(tmp_path / "run"),
               "design.num_subsets=30", "design.per_example=4", "train.epochs=2",
               "train.subsets_per_step=30", "--self-influence"])
    assert rc == 0, capsys.readouterr().err
    assert np.load(tmp_path / "run" / "scores.npy").shape == (3, 120)
    assert (tmp_path / "run" / "attribute.yaml").is_file()
    assert len((tmp_path / "run" / "topk.jsonl").read_text().splitlines()) == 3
    tokens = json.loads((tmp_path / "run" / "tokens.json").read_text())
    assert [q["query_id"] for q in tokens["queries"]] == ["q0", "q1", "q2"]
    selfinf = json.loads((tmp_path / "run" / "selfinf.json").read_text())
    assert selfinf["ids"] == [f"d{i}" for i in range(120)] and len(selfinf["score"]) == 120
    assert np.isfinite(selfinf["score"]).all()
    assert (tmp_path / "run" / "selfinf" / "stamp.json").is_file()
    printed = capsys.readouterr().out
    assert "top proponents" in printed
    assert "estimated peak memory per stage" in printed and "peak: host" in printed


@pytest.mark.parametrize("case", ["no_weights", "bad_train_format", "vocab_mismatch",
                                  "long_query", "bad_design", "layer_out_of_range", "typo",
                                  "memory_budget"])
def test_attribute_command_bad_input(pretrained, tmp_path, capsys, case):
    res, model_dir, _, _ = pretrained
    write_pairs(tmp_path, res)
    args = ["attribute", "--model", str(model_dir), "--train", str(tmp_path / "train.jsonl"),
            "--queries", str(tmp_path / "queries.jsonl"), "--out", str(tmp_path / "run")]
    expect = {"no_weights": "model.safetensors", "bad_train_format": "line 1",
              "vocab_mismatch": "tokenizer has", "long_query": "seq_len",
              "bad_design": "per_example", "layer_out_of_range": "out of range",
              "typo": "did you mean", "memory_budget": "stage needs about"}[case]
    if case == "no_weights":
        import shutil
        broken = tmp_path / "m"
        shutil.copytree(model_dir, broken)
        (broken / "model.safetensors").unlink()
        args[2] = str(broken)
    elif case == "bad_train_format":
        (tmp_path / "train.jsonl").write_text('{"text": "no id here"}\n')
    elif case == "vocab_mismatch":
        from stride_jax.data import shakespeare_plays
        from stride_jax.tokenizer import save_tokenizer, train_bpe
        big = train_bpe([d.text for d in shakespeare_plays(["hamlet"])], vocab_size=600)
        save_tokenizer(big, tmp_path / "tok")
        args += ["--tokenizer", str(tmp_path / "tok")]
    elif case == "long_query":
        write_jsonl([Document(id="long", text="word " * 400)], tmp_path / "queries.jsonl")
    elif case == "bad_design":
        args += ["design.num_subsets=10", "design.per_example=20"]
    elif case == "layer_out_of_range":
        args += ["steering.layer=7"]
    elif case == "typo":
        args += ["train.epoch=3"]
    elif case == "memory_budget":
        args += ["--memory-budget", "1MiB"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expect in err, err
    assert "Traceback" not in err


def test_lm_functions_api_attributes_a_foreign_jax_model(pretrained):
    """Any JAX model given as params + functions can be attributed in place."""
    import jax.numpy as jnp

    from stride_jax.steering import LMFunctions

    res, _, train, queries = pretrained
    # A hand-written bigram "model": embedding -> reader = final = embedding, head = matmul.
    V = res.model.config.vocab_size
    params = {"emb": jax.random.normal(jax.random.key(0), (V, 8)) * 0.1,
              "out": jax.random.normal(jax.random.key(1), (8, V)) * 0.1}
    lm = LMFunctions(
        params=params,
        features=lambda p, ids, mask: (p["emb"][ids], p["emb"][ids]),
        head=lambda p, h: jnp.einsum("btd,dv->btv", h, p["out"]),
        upper=None, d_reader=8, d_final=8, vocab_size=V, max_len=64, layer=0, num_layers=1,
        fingerprint="bigram")
    cfg = dataclasses.replace(FAST, steering=dataclasses.replace(FAST.steering, layer=0))
    out = Attributor(lm, train, cfg, progress=False).attribute(queries)
    assert out.scores_qn.shape == (len(queries), len(train))
    assert np.isfinite(out.scores_qn).all() and np.abs(out.scores_qn).max() > 0
