"""The public Python API (issue 17): what a JAX user embeds. Top-level imports, results that
reopen (``Attribution.load``), one error base, a user's own model and measurement."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stride_jax.attribution import Attribution, TopScores
from stride_jax.cli import main


def _result(Q=3, n=7, K=5, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(Q, n)).astype(np.float32)
    return Attribution(w, [f"q{q}" for q in range(Q)], [f"t{i}" for i in range(n)],
                       rng.normal(size=(Q, K)).astype(np.float32), rng.random(Q), rng.random(Q),
                       rng.normal(size=Q))


# --------------------------------------------------------------------------- results reopen
def test_attribution_load_reads_back_what_write_wrote(tmp_path):
    res = _result()
    res.write(tmp_path, train_texts=[f"text {i}" for i in range(7)], k=3)
    back = Attribution.load(tmp_path)
    np.testing.assert_array_equal(back.scores_qn, res.scores_qn)
    assert back.query_ids == res.query_ids and back.train_ids == res.train_ids
    for a, b in zip(back[3:7], res[3:7]):
        np.testing.assert_array_equal(a, b)
    assert back.top(1, 3) == res.top(1, 3)
    # The scores file alone (ids.json beside it is read), memory-mapped.
    again = Attribution.load(tmp_path / "scores.npy", mmap=True)
    assert isinstance(again.scores_qn, np.memmap) and again.query_ids == res.query_ids


def test_attribution_load_reads_top_k_runs(tmp_path):
    res = _result()
    sparse = res._replace(scores_qn=None, top_scores=TopScores.from_dense(res.scores_qn, 4))
    sparse.write(tmp_path, k=4)
    assert not (tmp_path / "scores.npy").exists()
    back = Attribution.load(tmp_path)
    assert back.scores_qn is None
    for q in range(3):
        assert back.top(q, 4) == res.top(q, 4)


def test_attribution_load_reads_a_score_command_directory(tmp_path):
    """``stride-jax score`` writes scores.npy and ids.json only: the per-query arrays are None."""
    np.save(tmp_path / "scores.npy", np.ones((2, 3), np.float32))
    (tmp_path / "ids.json").write_text(json.dumps({"queries": ["a", "b"],
                                                   "train": ["x", "y", "z"]}))
    back = Attribution.load(tmp_path)
    assert back.y_qk is None and back.lam_q is None and back.train_ids == ["x", "y", "z"]


@pytest.mark.parametrize("case,phrase", [
    ("no_dir", "does not exist"),
    ("no_scores", "has no scores.npy"),
    ("no_ids", "has no ids.json"),
    ("bad_ids", "is not an ids file"),
    ("ids_mismatch", "the files are from different runs"),
    ("not_npy", "is not a .npy file"),
    ("bad_per_query", "not over the 3 queries"),
])
def test_attribution_load_errors_name_the_file(tmp_path, case, phrase):
    from stride_jax.errors import StrideError
    run = tmp_path / "run"
    _result().write(run)
    if case == "no_dir":
        run = tmp_path / "nope"
    elif case == "no_scores":
        (run / "scores.npy").unlink()
    elif case == "no_ids":
        (run / "ids.json").unlink()
    elif case == "bad_ids":
        (run / "ids.json").write_text("[1, 2]")
    elif case == "ids_mismatch":
        (run / "ids.json").write_text(json.dumps({"queries": ["a"], "train": ["x"]}))
    elif case == "not_npy":
        (run / "scores.npy").write_bytes(b"garbage")
    elif case == "bad_per_query":
        np.savez(run / "per_query.npz", y=np.zeros((2, 5)))
    with pytest.raises((StrideError, FileNotFoundError), match=phrase):
        Attribution.load(run)


# --------------------------------------------------------------------------- one error base
def test_the_cli_reports_our_errors_in_one_line_and_bugs_with_a_traceback(tmp_path, capsys,
                                                                           monkeypatch):
    """``main`` turns a StrideError into ``error: ...`` + exit 2; a bug inside the library
    (a plain KeyError, TypeError or ValueError) keeps its traceback."""
    import stride_jax.apps.select as select
    _result().write(tmp_path)
    assert main(["select", "--run", str(tmp_path), "--k", "99"]) == 2
    assert "error: --k 99 is out of range" in capsys.readouterr().err
    for bug in (KeyError("internal"), TypeError("internal"), ValueError("internal"),
                AssertionError("internal")):
        def broken(*a, _bug=bug, **k):
            raise _bug
        monkeypatch.setattr(select, "select_run", broken)
        with pytest.raises(type(bug)):
            main(["select", "--run", str(tmp_path), "--k", "2"])


def test_every_error_class_is_a_stride_error():
    import stride_jax.errors as errors
    from stride_jax.config import ConfigError
    from stride_jax.data import DataError
    from stride_jax.io.atomic import DiskFullError
    from stride_jax.io.stamps import StaleArtifactError
    from stride_jax.model.hf import HFConfigError, HFWeightsError
    from stride_jax.train import NonFiniteOperatorLossError
    for cls in (ConfigError, DataError, DiskFullError, StaleArtifactError, HFConfigError,
                HFWeightsError, NonFiniteOperatorLossError):
        assert issubclass(cls, errors.StrideError) and issubclass(cls, ValueError), cls
    assert issubclass(DiskFullError, OSError)
    assert issubclass(NonFiniteOperatorLossError, FloatingPointError)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.StrideError), name
