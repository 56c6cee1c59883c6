"""The faithfulness suite end to end on a tiny digits task: every method, the CLI, counterfactuals."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("sklearn")

from stride_jax.config import load_config  # noqa: E402
from stride_jax.eval.suite import METHODS, TaskConfig, build_task, counterfactual, run_method  # noqa: E402

TINY = ["digits.num_train=150", "digits.num_queries=8", "digits.hidden=[32]",
        "digits.optim.epochs=5", "groundtruth.num_subsets=12", "groundtruth.parallel=6",
        "stride.train.epochs=5"]


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(TaskConfig, None, TINY)
    return cfg, build_task(cfg)


def test_every_method_scores_every_query_and_example(tiny):
    cfg, task = tiny
    for method in METHODS:
        if method == "bm25":
            with pytest.raises(ValueError, match="bm25 needs token sequences"):
                run_method(method, task, cfg)
            continue
        res = run_method(method, task, cfg)
        assert res.scores_qn.shape == (8, 150), method
        assert np.isfinite(res.scores_qn).all(), method
        assert res.seconds > 0


def test_unknown_method_is_named(tiny):
    cfg, task = tiny
    with pytest.raises(ValueError, match="unknown method 'trac'"):
        run_method("trac", task, cfg)


def test_counterfactual_shapes_and_removal_of_nothing_random(tiny):
    cfg, task = tiny
    scores = np.random.default_rng(0).normal(size=(task.num_queries, task.n))
    got = counterfactual(task, scores, k=10, queries=np.arange(3), num_random=2)
    assert got["top"].shape == (3,) and got["random"].shape == (2, 3)
    assert np.isfinite(got["top"]).all()
    with pytest.raises(ValueError, match="k=0"):
        counterfactual(task, scores, k=0, queries=np.arange(3))


def test_cli_groundtruth_score_evaluate(tmp_path, capsys):
    from stride_jax.cli import main
    gt, sc = tmp_path / "gt", tmp_path / "trak"
    assert main(["-q", "groundtruth", "--out", str(gt), *TINY]) == 0
    assert (gt / "losses.npy").is_file() and (gt / "ids.json").is_file()
    assert main(["-q", "score", "--method", "trak", "--out", str(sc), *TINY]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--scores", str(sc / "scores.npy"), "--groundtruth", str(gt),
                 "--json", str(tmp_path / "lds.json")]) == 0
    assert capsys.readouterr().out.startswith("LDS ")
    assert json.loads((tmp_path / "lds.json").read_text())["lds"]["num_subsets"] == 12
    assert main(["counterfactual", "--scores", str(sc / "scores.npy"), "--k", "10",
                 "--queries", "3", "--random", "2", *TINY]) == 0
    assert "removing each query's top-10 examples" in capsys.readouterr().out
    # A rerun of the ground truth is loaded, not retrained.
    assert main(["-q", "groundtruth", "--out", str(gt), *TINY]) == 0
    assert "retrained now: 0" in capsys.readouterr().out


def test_cli_evaluate_refuses_mismatched_scores(tmp_path, capsys):
    from stride_jax.cli import main
    gt = tmp_path / "gt"
    assert main(["-q", "groundtruth", "--out", str(gt), *TINY]) == 0
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "scores.npy", np.zeros((8, 149), np.float32))
    capsys.readouterr()
    assert main(["evaluate", "--scores", str(bad / "scores.npy"), "--groundtruth", str(gt)]) == 2
    assert "shape (8, 149)" in capsys.readouterr().err
    np.save(bad / "scores.npy", np.zeros((8, 150), np.float32))
    ids = json.loads((gt / "ids.json").read_text())
    ids["queries"] = ids["queries"][::-1]
    (bad / "ids.json").write_text(json.dumps(ids))
    assert main(["evaluate", "--scores", str(bad / "scores.npy"), "--groundtruth", str(gt)]) == 2
    assert "queries ids" in capsys.readouterr().err
    (bad / "x.npy").write_text("not an array")
    assert main(["evaluate", "--scores", str(bad / "x.npy"), "--groundtruth", str(gt)]) == 2
    assert "is not a .npy file (it lacks the .npy header)" in capsys.readouterr().err
    assert main(["evaluate", "--scores", str(bad / "scores.npy"),
                 "--groundtruth", str(tmp_path / "nope")]) == 2
    assert "stride-jax groundtruth" in capsys.readouterr().err
