"""The bad-input catalogue: one case per entry of the README's "Bad input" table.

Every case feeds one kind of bad input and asserts the key phrase of the error, which must name
the problem and the fix. Command-line cases also check the contract of ``stride-jax``: exit
status 2 and a single ``stride-jax <cmd>: error: ...`` line on stderr, never a traceback.
"""

from __future__ import annotations

import errno
import gzip
import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import stride_jax.io.atomic as atomic
from stride_jax.cli import main
from stride_jax.eval.groundtruth import GroundTruthConfig, run_groundtruth
from stride_jax.io.atomic import DiskFullError, load_npy, save_npy
from stride_jax.io.safetensors import load_file, save_file
from stride_jax.model.hf import from_hf
from stride_jax.recipes import pretrain
from stride_jax.subsets import bernoulli_design, expander_design
from stride_jax.tokenizer import load_tokenizer, save_tokenizer, train_bpe
from _tiny import TINY, write_pairs

# The tiny model of tests/test_attribute.py: 2 blocks, a 300-token vocabulary, 32-token context.

# Small enough that a case reaching operator training stays a few seconds on 2 cores.
FAST = ["design.num_subsets=30", "design.per_example=4", "train.epochs=1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model directory, directory with a good train.jsonl and queries.jsonl)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    write_pairs(root, pretrain(TINY, root / "model", progress=False))
    return root / "model", root


def _fails(args: list[str], capsys) -> str:
    """Run the CLI, check the one-line error contract, return the message."""
    assert main(["-q", *args]) == 2   # -q: no progress bars on stderr
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    # Only the error line: warnings or progress output would bury it.
    assert len(lines) == 1 and lines[0].startswith(f"stride-jax {args[0]}: error: "), err
    return lines[0]


def _model_copy(model_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(model_dir, out)
    return out


# ---------------------------------------------------------------------------------------------
# `stride-jax attribute`: input files, model directory and config
# ---------------------------------------------------------------------------------------------

def _write(path: Path, data: str | bytes) -> Path:
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def _edit_config_json(model: Path, **settings) -> None:
    hf = json.loads((model / "config.json").read_text())
    hf.update(settings)
    (model / "config.json").write_text(json.dumps(hf))


def _set_nan(model: Path) -> str:
    tensors = load_file(model / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name][1, 2] = np.nan
    save_file(tensors, model / "model.safetensors")
    return name


def _bigger_tokenizer(model: Path, tmp_path: Path) -> Path:
    # The model's own tokenizer plus 20 tokens: ids 300.. would index past the 300-row embedding.
    tok = load_tokenizer(model)
    tok.add_tokens([f"<extra{i}>" for i in range(20)])
    return save_tokenizer(tok, tmp_path / "tok")


def _foreign_tokenizer(tmp_path: Path) -> Path:
    # Another model's tokenizer, no larger than the model's embedding: it passes the size check
    # and, unchecked, runs and gives wrong losses and scores.
    other = train_bpe(["To be, or not to be, that is the question. " * 50,
                       "Shall I compare thee to a summer's day? " * 50], vocab_size=290)
    return save_tokenizer(other, tmp_path / "other_tok")


def _lines(src: Path, dst: Path, count: int) -> Path:
    return _write(dst, "".join(src.read_text(encoding="utf-8").splitlines(True)[:count]))


def _dir_with(tmp_path: Path, files: dict[str, str]) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    for name, text in files.items():
        _write(d / name, text)
    return d


# case -> (function (model, data dir, tmp) -> (--model, --train, --queries, extra args), phrases)
ATTRIBUTE_CASES = {
    "missing_file": (
        lambda m, d, t: (m, t / "nope.jsonl", d / "queries.jsonl", []),
        ["nope.jsonl: no such file; check the path"]),
    "missing_model_dir": (
        lambda m, d, t: (t / "nowhere", d / "train.jsonl", d / "queries.jsonl", []),
        ["does not exist; pass a directory holding config.json and model.safetensors"]),
    "empty_file": (
        lambda m, d, t: (m, _write(t / "train.jsonl", ""), d / "queries.jsonl", []),
        ["train.jsonl: the file is empty; add at least one document"]),
    "empty_query_file": (
        lambda m, d, t: (m, d / "train.jsonl", _write(t / "q.jsonl", ""), []),
        ["q.jsonl: the file is empty; add at least one document"]),
    "blank_query_file": (
        lambda m, d, t: (m, d / "train.jsonl", _write(t / "q.jsonl", "\n  \n"), []),
        ["q.jsonl: no documents (the file has only blank lines); add at least one line"]),
    "empty_completion": (
        lambda m, d, t: (m, d / "train.jsonl", _write(
            t / "q.jsonl", '{"id": "q", "prompt": "To be", "completion": " "}\n'), []),
        ['q.jsonl, line 1 (id \'q\'): blank "completion"', "drop the line if it is empty"]),
    "non_utf8_txt": (
        lambda m, d, t: (m, _write(t / "play.txt", "caf\xe9 au lait\n".encode("latin-1")),
                         d / "queries.jsonl", []),
        ["play.txt: not valid UTF-8 at byte offset 3 (line 1, byte 0xe9)",
         "re-encode the file as UTF-8"]),
    "non_utf8_jsonl": (
        lambda m, d, t: (m, _write(t / "train.jsonl", '{"id": "a", "text": "ok"}\n'
                                   '{"id": "b", "text": "caf\xe9"}\n'.encode("latin-1")),
                         d / "queries.jsonl", []),
        ["not valid UTF-8 at byte offset", "(line 2, byte 0xe9)", "re-encode the file as UTF-8"]),
    "jsonl_missing_field": (
        lambda m, d, t: (m, _write(t / "train.jsonl", '{"id": "a", "txt": "typo"}\n'),
                         d / "queries.jsonl", []),
        ['line 1 (id \'a\'): missing field "text" (or "prompt" + "completion")']),
    "jsonl_duplicate_ids": (
        lambda m, d, t: (m, _write(t / "train.jsonl", '{"id": "a", "text": "one"}\n'
                                   '{"id": 7, "text": "two"}\n{"id": "a", "text": "three"}\n'),
                         d / "queries.jsonl", []),
        ["duplicate id 'a' on lines 1 and 3; ids must be unique"]),
    "query_longer_than_context": (
        lambda m, d, t: (m, d / "train.jsonl", _write(
            t / "q.jsonl", json.dumps({"id": "long", "text": "word " * 40}) + "\n"), []),
        ["document 'long' has", "tokens but seq_len is 32; shorten that query in",
         "(queries are never cut)"]),
    "seq_len_beyond_context": (
        lambda m, d, t: (m, d / "train.jsonl", d / "queries.jsonl", ["data.seq_len=64"]),
        ["data.seq_len=64 exceeds the model's context (32 tokens)",
         "set data.seq_len to at most 32"]),
    "config_typo": (
        lambda m, d, t: (m, d / "train.jsonl", d / "queries.jsonl", ["train.epoch=3"]),
        ["unknown config key 'train.epoch'", "did you mean 'train.epochs'?"]),
    "missing_config_file": (
        lambda m, d, t: (m, d / "train.jsonl", d / "queries.jsonl",
                         ["--config", str(t / "nope.yaml")]),
        ["config file not found:", "check the path (CLI: --config)"]),
    "non_utf8_config_file": (
        lambda m, d, t: (m, d / "train.jsonl", d / "queries.jsonl",
                         ["--config", str(_write(t / "c.yaml", b"seed: \xff\n"))]),
        ["c.yaml is not valid UTF-8", "save the config file as UTF-8"]),
    "design_d_above_k": (
        lambda m, d, t: (m, d / "train.jsonl", d / "queries.jsonl",
                         ["design.num_subsets=10", "design.per_example=20"]),
        ["design.per_example=20 cannot exceed the K=10 subsets of design.num_subsets",
         "lower design.per_example or raise design.num_subsets"]),
    "design_empty_subsets": (
        lambda m, d, t: (m, d / "train.jsonl", d / "queries.jsonl",
                         ["design.num_subsets=100", "design.per_example=1"]),
        ["num_subsets=100, per_example=1", "is empty (", "of 100 are)", "lower K or raise d"]),
    "design_subsets_cannot_fill": (
        lambda m, d, t: (m, d / "train.jsonl", d / "queries.jsonl",
                         ["design.num_subsets=1000", "design.per_example=1"]),
        ["design.num_subsets=1000 leaves subsets empty: n=120 rows",
         "lower design.num_subsets to at most 120 (or null), or raise design.per_example"]),
    "rank_zero": (
        lambda m, d, t: (m, d / "train.jsonl", d / "queries.jsonl", ["steering.rank=0"]),
        ["steering.rank=0 must be >= 1; set a positive rank"]),
    "layer_out_of_range": (
        lambda m, d, t: (m, d / "train.jsonl", d / "queries.jsonl", ["steering.layer=99"]),
        ["steering.layer=99 is out of range: the model has 2 blocks, so use 0 .. 1"]),
    "epochs_zero": (
        lambda m, d, t: (m, d / "train.jsonl", d / "queries.jsonl", ["train.epochs=0"]),
        ["train.epochs=0 must be >= 1"]),
    # Files that are neither JSON Lines nor text, whatever their name.
    "gzip_train": (
        lambda m, d, t: (m, _write(t / "train.jsonl.gz", gzip.compress(
            (d / "train.jsonl").read_bytes())), d / "queries.jsonl", []),
        ["train.jsonl.gz: a gzip-compressed file, not JSON Lines or UTF-8 text; decompress it "
         "first"]),
    "utf16_queries": (
        lambda m, d, t: (m, d / "train.jsonl", _write(
            t / "q.jsonl", (d / "queries.jsonl").read_text().encode("utf-16")), []),
        ["q.jsonl: UTF-16 text, not JSON Lines or UTF-8 text; re-encode it as UTF-8"]),
    "json_array_train": (
        lambda m, d, t: (m, _write(t / "train.json", json.dumps(
            [json.loads(x) for x in (d / "train.jsonl").read_text().splitlines()], indent=1)),
            d / "queries.jsonl", []),
        ["train.json: one JSON document (an array), not JSON Lines; write one JSON object per "
         "line", "jq -c"]),
    "directory_without_txt": (
        lambda m, d, t: (m, _dir_with(t, {"part.jsonl": '{"id": "a", "text": "x"}\n',
                                          "notes.md": "notes"}), d / "queries.jsonl", []),
        ["no *.txt files in this directory (it holds notes.md, part.jsonl)",
         "pass a .jsonl file itself"]),
    "jsonl_inside_a_text_directory": (
        lambda m, d, t: (m, _dir_with(t, {"part.txt": (d / "train.jsonl").read_text()}),
                         d / "queries.jsonl", []),
        ["part.txt: holds JSON Lines", "pass the file itself, or format='text' "
         "(data.format=text)"]),
    # Degenerate training sets and settings checked against them before any training.
    "one_training_row": (
        lambda m, d, t: (m, _lines(d / "train.jsonl", t / "one.jsonl", 1), d / "queries.jsonl",
                         ["design.num_subsets=null", "design.per_example=40"]),
        ["1 training row(s): attribution compares subsets with and without each example, so it "
         "needs at least 2 training rows"]),
    "cv_folds_above_k": (
        lambda m, d, t: (m, d / "train.jsonl", d / "queries.jsonl",
                         ["design.num_subsets=4", "design.per_example=2", "solve.cv_folds=5"]),
        ["solve.cv_folds=5 exceeds the K=4 subsets (design.num_subsets)",
         "set solve.cv_folds to at most 4"]),
    "cv_folds_above_automatic_k": (
        lambda m, d, t: (m, _lines(d / "train.jsonl", t / "two.jsonl", 2), d / "queries.jsonl",
                         ["design.num_subsets=null", "design.per_example=1"]),
        ["solve.cv_folds=3 exceeds the K=2 subsets (chosen for n=2 training rows and "
         "design.per_example=1; design.num_subsets sets it)", "set solve.cv_folds to at most 2"]),
    # Settings out of their range, refused when the config is loaded.
    "seq_len_zero": (
        lambda m, d, t: (m, d / "train.jsonl", d / "queries.jsonl", ["data.seq_len=0"]),
        ["data.seq_len=0 must be >= 2"]),
    "negative_token_queries": (
        lambda m, d, t: (m, d / "train.jsonl", d / "queries.jsonl", ["token_queries=-1"]),
        ["token_queries=-1 must be >= 0"]),
    "nan_learning_rate": (
        lambda m, d, t: (m, d / "train.jsonl", d / "queries.jsonl", ["train.learning_rate=.nan"]),
        ["train.learning_rate=nan must be a finite number > 0"]),
    "seed_beyond_32_bits": (
        lambda m, d, t: (m, d / "train.jsonl", d / "queries.jsonl", ["seed=4294967296"]),
        ["seed=4294967296 must lie in [0, 4294967295]"]),
    "unreadable_size": (
        lambda m, d, t: (m, d / "train.jsonl", d / "queries.jsonl", ["cache.memory_limit=lots"]),
        ["cache.memory_limit='lots' is not a size; write e.g. 24GiB"]),
    # The model, its tokenizer, and where the outputs go.
    "foreign_tokenizer": (
        lambda m, d, t: (m, d / "train.jsonl", d / "queries.jsonl",
                         ["--tokenizer", str(_foreign_tokenizer(t))]),
        ["other_tok is not the one the model was trained with", "tokens have another id",
         "omit --tokenizer to use the model's, or pass --force-tokenizer"]),
    "model_is_a_file": (
        lambda m, d, t: (m / "config.json", d / "train.jsonl", d / "queries.jsonl", []),
        ["config.json is a file, not a directory; pass the model directory"]),
}

# Cases that damage a copy of the model directory: case -> (edit (copy, tmp), phrases). An edit
# returns the extra CLI args it needs as a list; any other return value means none.
MODEL_CASES = {
    "corrupt_config_json": (
        lambda m, t: _write(m / "config.json", '{"model_type": "llama",'),
        ["config.json is not valid UTF-8 JSON", "the file is corrupt: re-download or re-export"]),
    "empty_config_json": (
        lambda m, t: _write(m / "config.json", ""),
        ["config.json is not valid UTF-8 JSON", "re-download or re-export the model"]),
    "corrupt_tokenizer": (
        lambda m, t: _write(m / "tokenizer.json", "{garbage"),
        ["tokenizer.json is not a readable tokenizer", "re-save it with the model"]),
    "truncated_safetensors": (
        lambda m, t: _write(m / "model.safetensors",
                            (m / "model.safetensors").read_bytes()[:57_000]),
        ["model.safetensors: truncated: expected at least", "file has 57000",
         "re-download or re-export the checkpoint"]),
    "empty_safetensors": (
        lambda m, t: _write(m / "model.safetensors", b""),
        ["model.safetensors: file has 0 bytes", "re-download or re-export the checkpoint"]),
    "missing_weights": (
        lambda m, t: (m / "model.safetensors").unlink(),
        ["neither model.safetensors nor model.safetensors.index.json found",
         "re-export the model or copy its weights there"]),
    "nan_in_weights": (
        lambda m, t: _set_nan(m),
        ["weight 'model.layers.0.mlp.up_proj.weight' holds 1 NaN/inf value(s)",
         "the checkpoint is corrupt", "re-download or re-export it"]),
    "unknown_hf_config_key": (
        lambda m, t: _edit_config_json(m, attn_logit_softcapping=30.0),
        ["has setting(s) stride-jax does not handle: ['attn_logit_softcapping']",
         "loading stops here", "--no-strict-config"]),
    "vocab_mismatch": (
        lambda m, t: ["--tokenizer", str(_bigger_tokenizer(m, t))],
        ["tokenizer has 320 tokens but the model's embedding has 300 rows",
         "pass the tokenizer saved with the model"]),
    "rope_theta_zero": (
        lambda m, t: _edit_config_json(m, rope_parameters={"rope_type": "default",
                                                           "rope_theta": 0}),
        ["config.json holds a value stride-jax cannot use",
         "rope_theta=0.0 must be a positive finite number", "re-download or re-export"]),
    "config_json_lacks_a_setting": (
        lambda m, t: _drop_config_key(m, "vocab_size"),
        ["config.json lacks the setting 'vocab_size'", "re-download or re-export the model"]),
}


def _drop_config_key(model: Path, key: str) -> None:
    hf = json.loads((model / "config.json").read_text())
    del hf[key]
    (model / "config.json").write_text(json.dumps(hf))


def _attribute(model, train, queries, out, extra) -> list[str]:
    return ["attribute", "--model", str(model), "--train", str(train), "--queries", str(queries),
            "--out", str(out), *FAST, *extra]


@pytest.mark.parametrize("case", list(ATTRIBUTE_CASES))
def test_attribute_bad_input(tiny, tmp_path, capsys, case):
    model_dir, data = tiny
    build, phrases = ATTRIBUTE_CASES[case]
    model, train, queries, extra = build(model_dir, data, tmp_path)
    err = _fails(_attribute(model, train, queries, tmp_path / "run", extra), capsys)
    for phrase in phrases:
        assert phrase in err, err


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_attribute_bad_model_dir(tiny, tmp_path, capsys, case):
    model_dir, data = tiny
    edit, phrases = MODEL_CASES[case]
    model = _model_copy(model_dir, tmp_path)
    extra = edit(model, tmp_path)
    extra = extra if isinstance(extra, list) else []
    err = _fails(_attribute(model, data / "train.jsonl", data / "queries.jsonl",
                            tmp_path / "run", extra), capsys)
    for phrase in phrases:
        assert phrase in err, err


def test_unknown_hf_config_key_only_warns_when_not_strict(tiny, tmp_path, caplog):
    model = _model_copy(tiny[0], tmp_path)
    _edit_config_json(model, attn_logit_softcapping=30.0)
    with caplog.at_level(logging.WARNING, logger="stride_jax.model.hf"):
        lm = from_hf(model, strict=False)
    assert lm.config.num_layers == 2
    assert "does not handle: ['attn_logit_softcapping']" in caplog.text
    assert "loading anyway (strict=False)" in caplog.text


@pytest.mark.parametrize("lr, what", [("1e38", "is not finite"),
                                      ("1e30", "exceeds train.max_loss=10000 (diverged)")])
def test_diverging_operator_loss_names_step_and_subset_and_keeps_checkpoint(tiny, tmp_path,
                                                                             capsys, lr, what):
    """A diverging operator training stops at the first non-finite or exploding loss, keeping its
    last checkpoint; 1e30 stays finite (~1e32 nats) and must not pass as a result."""
    model_dir, data = tiny
    run = tmp_path / "run"
    # Per-subset Adam moves each coefficient by ~learning_rate per visit: the first visit of a
    # subset is harmless at zero coefficients, its second visit (epoch 2) blows up, so the first
    # epoch's steps are good and checkpointed.
    err = _fails(_attribute(model_dir, data / "train.jsonl", data / "queries.jsonl", run,
                            [f"train.learning_rate={lr}", "train.epochs=2",
                             "train.subsets_per_step=10", "train.checkpoint_every=1"]), capsys)
    assert f"{what} at step 4 of 6 (first bad subset: " in err, err
    assert f"lower train.learning_rate (now {float(lr):g})" in err, err
    assert (f"the last good checkpoint (after 3 steps) in {run / 'operators' / 'checkpoints'} "
            f"is kept") in err, err
    assert (run / "operators" / "checkpoints").is_dir()
    # The stage is not marked finished, so a rerun resumes instead of loading garbage.
    assert json.loads((run / "operators" / "stamp.json").read_text())["complete"] is False


def test_diverged_operators_give_a_clear_error_at_measurement(tiny, tmp_path, capsys):
    """One epoch at a huge learning rate: every loss is evaluated before its update, so training
    ends 'successfully', but the operators are inf; measurement names the problem and the fix."""
    model_dir, data = tiny
    err = _fails(_attribute(model_dir, data / "train.jsonl", data / "queries.jsonl",
                            tmp_path / "run", ["train.learning_rate=1e38", "train.epochs=1"]),
                 capsys)
    assert "responses are NaN/inf (first: query 'q0', subset " in err, err
    assert "diverged; lower train.learning_rate and rerun with --overwrite" in err, err


# ---------------------------------------------------------------------------------------------
# Subset designs (Python API)
# ---------------------------------------------------------------------------------------------

def test_expander_design_with_empty_subsets():
    # 3 examples in 1 subset each cannot fill 50 subsets.
    with pytest.raises(ValueError, match=r"is empty \(47 of 50 are\).*lower K or raise d"):
        expander_design(3, 50, 1, key=jax.random.key(0))


def test_bernoulli_design_with_empty_subsets():
    with pytest.raises(ValueError, match=r"is empty .*alpha\*n=0\.2 .*; raise alpha or n"):
        bernoulli_design(4, 50, 0.05, key=jax.random.key(0))


# ---------------------------------------------------------------------------------------------
# `stride-jax evaluate`: scores files; a full disk
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def groundtruth(tmp_path_factory):
    """A finished ground truth over 6 training examples and 2 queries (a linear fake retrain)."""
    out = tmp_path_factory.mktemp("gt")
    w = np.random.default_rng(0).normal(size=(2, 6))
    run_groundtruth(lambda s: np.stack([-w[:, x].sum(1) for x in s]), n=6, num_queries=2,
                    cfg=GroundTruthConfig(num_subsets=8, alpha=0.5, parallel=4), out_dir=out,
                    progress=False)
    return out, w


@pytest.mark.parametrize("case,phrase", [
    ("missing", "no scores file"),
    ("garbage", "is not a .npy file (it lacks the .npy header)"),
    ("empty", "is not a .npy file (it is empty)"),
    ("truncated", "is not a .npy array of scores"),
    ("wrong_shape", "holds scores of shape (2, 5) but the ground truth in"),
])
def test_evaluate_bad_scores(groundtruth, tmp_path, capsys, case, phrase):
    gt, _ = groundtruth
    scores = tmp_path / "scores.npy"
    if case == "garbage":
        scores.write_bytes(b"\x00\x01 not numpy at all")
    elif case == "empty":
        scores.write_bytes(b"")
    elif case == "truncated":
        save_npy(scores, np.zeros((2, 6), np.float32))
        scores.write_bytes(scores.read_bytes()[:-8])
    elif case == "wrong_shape":
        save_npy(scores, np.zeros((2, 5), np.float32))
    err = _fails(["evaluate", "--scores", str(scores), "--groundtruth", str(gt)], capsys)
    assert phrase in err, err
    assert "pass the scores.npy written by" in err or case == "wrong_shape", err


def _full_disk(monkeypatch, keep: int = 16) -> None:
    """Writes inside stride_jax.io.atomic put ``keep`` bytes on disk, then fail with ENOSPC."""
    import builtins
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data)[:keep])   # a partial temp file, as on a real full disk
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return Full(f) if "w" in mode else f

    monkeypatch.setattr(atomic, "open", fake_open, raising=False)


def test_disk_full_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "scores.npy"
    save_npy(path, np.arange(4.0))
    _full_disk(monkeypatch)
    with pytest.raises(DiskFullError, match="the disk is full") as info:
        save_npy(path, np.ones(1000))
    assert info.value.errno == errno.ENOSPC
    assert "free some space or choose an output directory on another disk" in str(info.value)
    np.testing.assert_array_equal(load_npy(path), np.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.npy"]   # no temp file left


def test_evaluate_on_a_full_disk(groundtruth, tmp_path, monkeypatch, capsys):
    gt, w = groundtruth
    scores, out = tmp_path / "scores.npy", tmp_path / "lds.json"
    save_npy(scores, w.astype(np.float32))
    out.write_text("previous result\n")
    _full_disk(monkeypatch)
    err = _fails(["evaluate", "--scores", str(scores), "--groundtruth", str(gt),
                  "--bootstrap", "10", "--json", str(out)], capsys)
    assert f"the disk is full (no space left on the device) while writing {out}" in err, err
    assert "the previous lds.json, if any, is intact" in err, err
    assert out.read_text() == "previous result\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lds.json", "scores.npy"]


# ---------------------------------------------------------------------------------------------
# Output locations: checked before any work, stamped, locked, cleared by --overwrite
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def done_run(tiny, tmp_path_factory):
    """A finished run whose training file is JSON Lines named train.json, with tokens.json."""
    model_dir, data = tiny
    root = tmp_path_factory.mktemp("done")
    train = shutil.copy(data / "train.jsonl", root / "train.json")
    args = _attribute(model_dir, train, data / "queries.jsonl", root / "run", ["token_queries=1"])
    assert main(["-q", *args]) == 0
    return root / "run", args


def test_jsonl_named_json_is_read_as_jsonl(done_run):
    run, _ = done_run
    ids = json.loads((run / "ids.json").read_text())
    assert ids["train"] == [f"d{i}" for i in range(120)]   # 120 documents, not text chunks
    assert np.load(run / "scores.npy").shape == (3, 120)


def _read_only(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode & ~0o222)


def _writable(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | 0o200)


@pytest.mark.parametrize("command", ["attribute", "report", "select"])
def test_read_only_completed_run_is_refused_before_any_work(done_run, tmp_path, capsys, command):
    run, args = done_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    _read_only(copy)
    try:
        if command == "attribute":
            argv = [*args[:args.index("--out") + 1], str(copy), *args[args.index("--out") + 2:]]
        elif command == "report":
            argv = ["report", str(copy)]
        else:
            argv = ["select", "--run", str(copy), "--k", "3"]
        err = _fails(argv, capsys)
    finally:
        _writable(copy)
    assert f"{copy} is read-only; make it writable (chmod -R u+w {copy}) or pass" in err, err


OUT_CASES = {
    "existing_file": (lambda t: _write(t / "run", "not a directory"),
                      "run is a file, not a directory; pass a directory"),
    "under_proc": (lambda t: Path("/proc/stride-jax-test/run"),
                   "is under /proc, a file system of the kernel, not a disk; pass a path on disk"),
    "read_only_directory": (lambda t: _read_only_dir(t) / "run",
                            "ro is read-only; make it writable"),
    "under_a_file": (lambda t: _write(t / "afile", "x") / "run",
                     "afile is a file, so nothing can be created under it"),
}


def _read_only_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d


@pytest.mark.parametrize("case", list(OUT_CASES))
def test_output_directory_refused_before_any_work(tiny, tmp_path, capsys, case):
    """Every command that writes a directory checks it first, with the same message."""
    model_dir, data = tiny
    make, phrase = OUT_CASES[case]
    out = make(tmp_path)
    commands = [_attribute(model_dir, data / "train.jsonl", data / "queries.jsonl", out, []),
                ["pretrain", "--out", str(out)], ["demo", "--out", str(out)],
                ["groundtruth", "--out", str(out)], ["score", "--method", "bm25", "--out", str(out)],
                ["contamination", "--out", str(out)], ["export-smollm2", "--out", str(out)]]
    try:
        for argv in commands:
            err = _fails(argv, capsys)
            assert f"--out {out}" in err and phrase in err, err
    finally:
        if case == "read_only_directory":
            (tmp_path / "ro").chmod(0o755)


def test_empty_output_path_is_one_line(tiny, capsys):
    model_dir, data = tiny
    with pytest.raises(SystemExit) as e:
        main(["-q", *_attribute(model_dir, data / "train.jsonl", data / "queries.jsonl", "", [])])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "stride-jax attribute: error: argument --out: an empty path" in err, err


def test_file_outputs_given_a_directory(done_run, groundtruth, tmp_path, capsys):
    run, _ = done_run
    err = _fails(["select", "--run", str(run), "--k", "3", "--out", str(tmp_path)], capsys)
    assert f"--out {tmp_path} is a directory; pass a file name, e.g. " in err, err
    gt, w = groundtruth
    save_npy(tmp_path / "scores.npy", w.astype(np.float32))
    err = _fails(["evaluate", "--scores", str(tmp_path / "scores.npy"), "--groundtruth", str(gt),
                  "--json", str(tmp_path)], capsys)
    assert f"--json {tmp_path} is a directory; pass a file name, e.g. {tmp_path / 'lds.json'}" \
        in err, err


def test_overwrite_with_new_data_leaves_no_stale_output(done_run, tmp_path, capsys):
    """--overwrite clears every output of the earlier run: a tokens.json, a report or a selection
    the new run does not write must not survive next to its new scores."""
    run, args = done_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["-q", "report", str(copy)]) == 0
    assert main(["-q", "select", "--run", str(copy), "--k", "3"]) == 0
    capsys.readouterr()
    half = _lines(Path(args[args.index("--train") + 1]), tmp_path / "half.jsonl", 60)
    at = args.index("--train")
    new = [*args[:at + 1], str(half), *args[at + 2:]]
    new[new.index("--out") + 1] = str(copy)
    new[new.index("token_queries=1")] = "token_queries=0"
    err = _fails(new, capsys)   # another training set: refused, nothing removed
    assert "holds outputs made with other arguments or inputs" in err, err
    assert "config.token_queries: 1 -> 0" in err and "train.size:" in err, err
    assert "--overwrite to replace them" in err, err
    assert (copy / "tokens.json").is_file() and (copy / "report.html").is_file()
    assert main(["-q", *new, "--overwrite"]) == 0
    names = {p.name for p in copy.iterdir()}
    for stale in ("tokens.json", "report.html", "selected.jsonl"):
        assert stale not in names, names
    assert json.loads((copy / "ids.json").read_text())["train"] == [f"d{i}" for i in range(60)]
    assert len(list((copy / "responses").iterdir())) == 1
    assert len(list((copy / "solve").iterdir())) == 1
    assert json.loads((copy / "run.json").read_text())["complete"] is True


def test_second_process_on_one_out_meets_the_lock(tiny, tmp_path, capsys):
    import signal
    import subprocess
    import sys
    import time
    model_dir, data = tiny
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from stride_jax.io.outdir import "
         "lock_output_dir\nwith lock_output_dir(sys.argv[1], 'attribute'):\n"
         "    print('locked', flush=True); time.sleep(600)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = _fails(_attribute(model_dir, data / "train.jsonl", data / "queries.jsonl", out, []),
                     capsys)
        assert f"{out} is in use by another stride-jax process (pid {holder.pid} on " in err, err
        assert "wait for it to finish, or pass another --out" in err, err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed holder's lock file stays behind; the next process takes it over.
    from stride_jax.io.outdir import LOCK_FILE, lock_output_dir
    assert (out / LOCK_FILE).is_file()
    t0 = time.perf_counter()
    with lock_output_dir(out, "attribute"):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == __import__("os").getpid()
    assert time.perf_counter() - t0 < 5 and not (out / LOCK_FILE).exists()


def test_ctrl_c_is_one_line_and_the_rerun_resumes(tiny, tmp_path, capsys, monkeypatch):
    from stride_jax.train._checkpoint import OperatorCheckpointer
    model_dir, data = tiny
    save = OperatorCheckpointer.save

    def save_then_interrupt(self, step, state):
        save(self, step, state)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(OperatorCheckpointer, "save", save_then_interrupt)
    args = _attribute(model_dir, data / "train.jsonl", data / "queries.jsonl", tmp_path / "run",
                      ["train.subsets_per_step=10", "train.checkpoint_every=1", "train.epochs=2"])
    assert main(["-q", *args]) == 130
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0] == ("stride-jax attribute: interrupted at operator training step 2 of 6; a "
                        "rerun resumes from step 2, its last checkpoint; rerun the same command "
                        "to resume (finished stages and checkpoints are kept)"), err
    monkeypatch.setattr(OperatorCheckpointer, "save", save)
    assert main(["-q", *args]) == 0
    history = json.loads((tmp_path / "run" / "operators" / "history.json").read_text())
    assert [p["step"] for p in history][0] >= 2   # resumed, not restarted


def test_pretrain_over_an_existing_model(tiny, tmp_path, capsys):
    """Refused without --overwrite; with it, every file of the old model goes (a stale shard or
    the demo's old fingerprint would otherwise be read as part of the new model)."""
    from stride_jax.recipes.pretrain import finished_pretrain as reusable_model
    from stride_jax.config import dump_config
    model = _model_copy(tiny[0], tmp_path)
    stale = [_write(model / "recipe.fingerprint", "0" * 64 + "\n"),
             _write(model / "model-00002-of-00002.safetensors", b"stale shard")]
    cfg = tmp_path / "tiny.yaml"
    dump_config(TINY, cfg)
    err = _fails(["pretrain", "--config", str(cfg), "--out", str(model), "seed=1"], capsys)
    assert f"{model} holds outputs made with other arguments or inputs (recipe.seed: 0 -> 1)" \
        in err, err
    assert reusable_model(model, TINY) and not reusable_model(model, _seed(TINY, 1))
    assert main(["-q", "pretrain", "--config", str(cfg), "--out", str(model), "seed=1",
                 "--overwrite"]) == 0
    assert not any(p.exists() for p in stale)
    assert reusable_model(model, _seed(TINY, 1)) and not reusable_model(model, TINY)
    (model / "model.safetensors").unlink()   # a model that is no longer there is never reused
    assert not reusable_model(model, _seed(TINY, 1))


def _seed(cfg, seed: int):
    import dataclasses
    return dataclasses.replace(cfg, seed=seed)


@pytest.mark.parametrize("setting, phrase", [
    ("optim.epochs=-1", "optim.epochs=-1.0 must be > 0; a model trained for no step is the "
                        "random initialisation"),
    ("optim.epochs=0", "optim.epochs=0.0 must be > 0"),
    ("corpus.seq_len=0", "corpus.seq_len=0 must be >= 2"),
    ("optim.b2=1.5", "optim.b2=1.5 must lie in [0, 1)"),
    ("arch.num_kv_heads=3", "arch.num_heads=4 is not a multiple of num_kv_heads=3"),
])
def test_pretrain_refuses_nonsense_settings(tmp_path, capsys, setting, phrase):
    err = _fails(["pretrain", "--out", str(tmp_path / "m"), setting], capsys)
    assert phrase in err, err
    assert not (tmp_path / "m").exists()   # refused before any work


def test_three_training_documents_with_the_automatic_design(tiny, tmp_path, capsys):
    """n=3 with K and d left to their defaults: the automatic design adapts (no "lower K or
    raise d" for settings the user never made), and the scores are finite."""
    model_dir, data = tiny
    train = _lines(data / "train.jsonl", tmp_path / "three.jsonl", 3)
    out = tmp_path / "run"
    assert main(["-q", "attribute", "--model", str(model_dir), "--train", str(train),
                 "--queries", str(data / "queries.jsonl"), "--out", str(out),
                 "train.epochs=1", "token_queries=0"]) == 0
    scores = np.load(out / "scores.npy")
    assert scores.shape == (3, 3) and np.isfinite(scores).all()
    design = np.load(out / "design" / "design.npz")
    assert int(design["shape"][0]) == 80 and np.bincount(design["rows"], minlength=80).min() >= 1


# ---------------------------------------------------------------------------------------------
# NaN never reaches a file; misleading inputs get the right message
# ---------------------------------------------------------------------------------------------

def test_nan_is_refused_by_every_writer(tmp_path):
    from stride_jax.attributor import Attribution
    from stride_jax.io.atomic import write_json
    with pytest.raises(FloatingPointError, match=r"refusing to write .*a.npy: 1 of its 3 values "
                                                 r"\(first at index \(1,\)\) is NaN or infinite"):
        save_npy(tmp_path / "a.npy", np.array([0.0, np.nan, 1.0]))
    with pytest.raises(FloatingPointError, match=r"b.json: the value at x.1 is NaN or infinite"):
        write_json(tmp_path / "b.json", {"x": [1.0, float("inf")]})
    scores = np.array([[0.1, np.nan]], np.float32)
    result = Attribution(scores, ["q"], ["a", "b"], np.zeros((1, 4)), np.ones(1), np.ones(1),
                         np.zeros(1))
    with pytest.raises(FloatingPointError, match="1 scores value\\(s\\) are NaN or infinite "
                                                 "\\(first: query 'q'\\)"):
        result.write(tmp_path / "run")
    assert list(tmp_path.iterdir()) == []   # nothing at all was written


def test_one_training_row_is_refused_by_the_python_api():
    from stride_jax.attributor import AttributeConfig, Attributor
    from stride_jax.config import ConfigError
    from stride_jax.model.config import tiny_llama
    from stride_jax.model.transformer import init_model
    from _tiny import random_rows
    model = init_model(tiny_llama(vocab_size=64, hidden_size=16, num_heads=2, num_kv_heads=1,
                                  head_dim=8, intermediate_size=32, num_layers=2), seed=0)
    with pytest.raises(ConfigError, match="needs at least 2 training rows"):
        Attributor(model, random_rows(1, 8, 64, 0), AttributeConfig(), progress=False)


def test_byte_order_marks_are_accepted(tiny, tmp_path):
    from stride_jax.attributor import AttributeConfig
    from stride_jax.config import load_config
    from stride_jax.tokenizer import tokenizer_fingerprint
    model = _model_copy(tiny[0], tmp_path)
    for name in ("config.json", "tokenizer.json"):
        _write(model / name, b"\xef\xbb\xbf" + (model / name).read_bytes())
    assert from_hf(model).config.vocab_size == 300
    assert tokenizer_fingerprint(load_tokenizer(model)) == \
        tokenizer_fingerprint(load_tokenizer(tiny[0]))
    cfg = _write(tmp_path / "c.yaml", b"\xef\xbb\xbfseed: 3\n")
    assert load_config(AttributeConfig, cfg).seed == 3


def test_tokenizer_tie_forced_and_unverifiable(tiny, tmp_path, caplog):
    from stride_jax.tokenizer import check_model_tokenizer
    model = _model_copy(tiny[0], tmp_path)
    other = load_tokenizer(_foreign_tokenizer(tmp_path))
    with caplog.at_level(logging.WARNING, logger="stride_jax.tokenizer"):
        check_model_tokenizer(other, model, source="other", force=True)
    assert "is not the one the model was trained with" in caplog.text
    assert "using it anyway (--force-tokenizer)" in caplog.text
    # Without its tokenizer.json, the fingerprint stored with the model still tells.
    (model / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"stride_jax.json\); a model only understands"):
        check_model_tokenizer(other, model, source="other")
    check_model_tokenizer(load_tokenizer(tiny[0]), model, source="own")   # its own passes
    (model / "stride_jax.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stride_jax.tokenizer"):
        check_model_tokenizer(other, model, source="other")
    assert "cannot check that the tokenizer other belongs to the model" in caplog.text


def test_implausible_base_loss_is_warned():
    from stride_jax.measure import implausible_base_loss
    v = 2048
    assert implausible_base_loss(np.array([5.31, 5.2]), v) is None    # a trained model
    msg = implausible_base_loss(np.array([7.18, 7.2]), v)             # another tokenizer
    assert msg.startswith("the base model's mean loss on the queries is 7.19 nats per token, "
                          "close to ln(V) = 7.62"), msg
    assert "Check that the tokenizer is the model's own" in msg
    assert "above ln(V)" in implausible_base_loss(np.array([9.0]), v)


@pytest.mark.parametrize("case,phrase", [
    ("strings", "holds text (dtype <U3), not real-valued scores; pass the scores.npy"),
    ("nan", "holds 1 NaN/inf score(s) of 12"),
    # --scores takes a run directory too (Attribution.load); this one holds no scores
    ("directory", "has no scores.npy; pass the scores.npy written by `stride-jax attribute`"),
])
def test_evaluate_scores_that_are_not_numbers(groundtruth, tmp_path, capsys, case, phrase):
    gt, w = groundtruth
    scores = tmp_path / "scores.npy"
    if case == "strings":
        np.save(scores, np.full((2, 6), "abc"))
    elif case == "nan":
        bad = w.copy()
        bad[1, 2] = np.nan
        np.save(scores, bad)
    else:
        scores = tmp_path
    err = _fails(["evaluate", "--scores", str(scores), "--groundtruth", str(gt)], capsys)
    assert phrase in err, err


def test_overwrite_never_removes_another_commands_outputs(tiny, tmp_path, capsys):
    """`attribute --out` naming the model directory, even with --overwrite, must not delete the
    model it reads."""
    model_dir, data = tiny
    model = _model_copy(model_dir, tmp_path)
    before = sorted(p.name for p in model.iterdir())
    err = _fails(_attribute(model, data / "train.jsonl", data / "queries.jsonl", model,
                            ["--overwrite"]), capsys)
    assert (f"{model} holds the outputs of `stride-jax pretrain`; pass another --out "
            f"(--overwrite only replaces outputs of `stride-jax attribute`)") in err, err
    assert sorted(p.name for p in model.iterdir()) == before


def test_a_file_where_a_directory_is_expected_and_back(groundtruth, tmp_path, capsys):
    gt, w = groundtruth
    a_file = _write(tmp_path / "notes.json", "{}")
    save_npy(tmp_path / "scores.npy", w.astype(np.float32))
    cases = [
        (["evaluate", "--scores", str(tmp_path / "scores.npy"), "--groundtruth", str(a_file)],
         "notes.json is a file, not a ground-truth directory; pass the --out directory of "
         "`stride-jax groundtruth`"),
        (["select", "--run", str(a_file), "--k", "1"],
         "notes.json is a file, not a run directory; pass the --out directory of"),
        (["report", str(a_file)], "notes.json is a file, not a run directory"),
        (["groundtruth", "--out", str(tmp_path / "gt"), "--config", str(tmp_path)],
         f"{tmp_path} is a directory, not a config file; pass a YAML file"),
    ]
    for argv, phrase in cases:
        err = _fails(argv, capsys)
        assert phrase in err, err
