"""Data selection: aggregates, top-k, `stride-jax select`, and STRIDE selection beating random.

The end-to-end case is constructed so the useful examples are known: a pool of two "languages"
(rows of words from two disjoint word lists), targets from one of them; fine-tuning on the target
language's rows must lower the target loss more than a random half-and-half selection. STRIDE
(tiny settings) attributes the model fine-tuned on the whole pool, its scores are aggregated over
the targets and the top k kept (benchmarks/selection.py runs the same on Shakespeare).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from stride_jax.apps.select import aggregate, select_top
from stride_jax.cli import main

# ---------------------------------------------------------------------------------------------
# aggregate / select_top
# ---------------------------------------------------------------------------------------------


def test_zscore_is_invariant_to_per_query_scale_and_shift():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(5, 40))
    scaled = s * np.array([1e-4, 1.0, 30.0, 2e3, 0.5])[:, None] + rng.normal(size=(5, 1))
    np.testing.assert_allclose(aggregate(scaled, "zscore"), aggregate(s, "zscore"), atol=1e-12)
    # The plain mean is not: the query with the largest scale decides the ranking.
    assert not np.array_equal(select_top(aggregate(scaled, "mean"), 5),
                              select_top(aggregate(s, "mean"), 5))
    np.testing.assert_array_equal(select_top(aggregate(scaled, "mean"), 5),
                                  select_top(scaled[3], 5))


def test_zscore_values_and_constant_queries():
    s = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    # Query 0 standardised: [-1.2247, 0, 1.2247]; constant queries contribute 0.
    np.testing.assert_allclose(aggregate(s, "zscore"), np.array([-1, 0, 1]) * np.sqrt(1.5) / 3)
    assert np.all(aggregate(np.zeros((2, 4)), "zscore") == 0)
    np.testing.assert_allclose(aggregate(s, "mean"), [2.0, 7 / 3, 8 / 3])


def test_rank_aggregate_is_mean_per_query_rank_with_ties_averaged():
    s = np.array([[0.1, 0.5, 0.3, 0.3],
                  [9.0, -1.0, 4.0, 100.0]])
    # ranks (0-based, ties averaged) / (n - 1): q0 [0, 3, 1.5, 1.5] / 3; q1 [2, 0, 1, 3] / 3
    np.testing.assert_allclose(aggregate(s, "rank"), [1 / 3, 1 / 2, 5 / 12, 3 / 4])
    # Invariant to an increasing transform of one query's scores.
    t = s.copy()
    t[1] = np.exp(t[1] / 10)
    np.testing.assert_allclose(aggregate(t, "rank"), aggregate(s, "rank"))
    assert aggregate(np.array([[3.0]]), "rank").tolist() == [0.0]


def test_select_top_is_stable_and_validated():
    v = np.array([0.5, 2.0, 0.5, 2.0, -1.0])
    assert select_top(v, 3).tolist() == [1, 3, 0]          # ties: lower index first
    assert select_top(v, 5).tolist() == [1, 3, 0, 2, 4]
    assert select_top(v, np.int64(1)).tolist() == [1]
    for k in (0, 6, -1):
        with pytest.raises(ValueError, match=rf"k={k} is out of range for a pool of n=5"):
            select_top(v, k)
    with pytest.raises(ValueError, match="must be an integer"):
        select_top(v, 2.0)
    with pytest.raises(ValueError, match="must be 1-D"):
        select_top(np.zeros((2, 3)), 1)
    with pytest.raises(ValueError, match="NaN/inf"):
        select_top(np.array([1.0, np.nan]), 1)
    with pytest.raises(ValueError, match="unknown aggregate 'median'"):
        aggregate(np.zeros((1, 3)), "median")
    with pytest.raises(ValueError, match=r"query 0, example 1"):
        aggregate(np.array([[0.0, np.inf]]), "zscore")


# ---------------------------------------------------------------------------------------------
# stride-jax select on a hand-written run directory
# ---------------------------------------------------------------------------------------------


def _fake_run(root, *, Q=3, n=8, texts=True):
    run = root / "run"
    run.mkdir()
    scores = np.zeros((Q, n), np.float32)
    scores[:, 5] = [1.0, 0.01, 100.0]      # best for every query
    scores[:, 2] = [0.5, 0.005, 50.0]
    scores[1, 7] = 0.02                    # query 1 alone: large by its own scale
    np.save(run / "scores.npy", scores)
    ids = {"queries": [f"q{q}" for q in range(Q)], "train": [f"row-{i}" for i in range(n)]}
    (run / "ids.json").write_text(json.dumps(ids))
    if texts:
        rec = {"query_id": "q0", "proponents": [{"id": "row-5", "index": 5, "score": 1.0,
                                                 "text": "the best row"}], "opponents": []}
        (run / "topk.jsonl").write_text(json.dumps(rec) + "\n")
    return run


def test_cli_select_round_trip(tmp_path, capsys):
    run = _fake_run(tmp_path)
    assert main(["select", "--run", str(run), "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert "selected 3 examples by zscore aggregate" in out and "1 with text" in out
    recs = [json.loads(line) for line in (run / "selected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == ["row-5", "row-2", "row-7"]
    assert [r["rank"] for r in recs] == [1, 2, 3]
    assert [r["index"] for r in recs] == [5, 2, 7]
    assert recs[0]["text"] == "the best row" and "text" not in recs[1]
    assert recs[0]["value"] > recs[1]["value"] > recs[2]["value"]
    # The mean aggregate follows query 2's large scale; --out writes elsewhere.
    other = tmp_path / "sel.jsonl"
    assert main(["select", "--run", str(run), "--k", "2", "--aggregate", "mean",
                 "--out", str(other)]) == 0
    assert [json.loads(x)["id"] for x in other.read_text().splitlines()] == ["row-5", "row-2"]


def test_cli_select_without_texts_writes_ids_only(tmp_path, capsys):
    run = _fake_run(tmp_path, texts=False)
    assert main(["select", "--run", str(run), "--k", "8"]) == 0
    recs = [json.loads(line) for line in (run / "selected.jsonl").read_text().splitlines()]
    assert len(recs) == 8 and not any("text" in r for r in recs)
    assert sorted(r["index"] for r in recs) == list(range(8))


@pytest.mark.parametrize("case, message", [
    ("missing_dir", "run directory .*nope does not exist; pass the --out directory of "
                    "`stride-jax attribute`"),
    ("missing_scores", "has no scores.npy; pass the --out directory"),
    ("missing_ids", "has no ids.json"),
    ("k_zero", r"--k 0 is out of range: the run's pool has n=8 examples, so choose 1 <= k <= 8"),
    ("k_too_big", r"--k 9 is out of range: .* n=8 .* 1 <= k <= 8"),
    ("shape_mismatch", r"has shape \(3, 8\) but .*ids.json lists 3 queries x 7 training"),
])
def test_cli_select_errors_are_one_line(tmp_path, capsys, case, message):
    run = _fake_run(tmp_path)
    k = {"k_zero": "0", "k_too_big": "9"}.get(case, "2")
    if case == "missing_dir":
        run = tmp_path / "nope"
    elif case == "missing_scores":
        (run / "scores.npy").unlink()
    elif case == "missing_ids":
        (run / "ids.json").unlink()
    elif case == "shape_mismatch":
        (run / "ids.json").write_text(json.dumps({"queries": ["a", "b", "c"],
                                                  "train": [str(i) for i in range(7)]}))
    assert main(["select", "--run", str(run), "--k", k]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stride-jax select: error: ") and "\n" not in err
    assert re.search(message, err), err
    assert not (run / "selected.jsonl").exists()


def test_selection_task_refuses_distractors_that_are_base_or_target_text():
    from stride_jax.config import load_config
    from stride_jax.tasks.selection import SelectionTaskConfig, build_selection_task
    cfg = load_config(SelectionTaskConfig, None, ["distractors=[tempest,hamlet]"])
    with pytest.raises(ValueError, match=r"distractor play\(s\) \['hamlet'\] are also"):
        build_selection_task(cfg)


# ---------------------------------------------------------------------------------------------
# End to end: STRIDE's top-k beats random selections on the target loss
# ---------------------------------------------------------------------------------------------

_A = "amber apple arrow atlas anchor autumn azure acorn alpine amulet".split()
_B = "bronze button bishop basket bubble bottle banner biscuit boulder".split()


def _two_language_task():
    """Pool: 32 rows of language A + 32 of B (shuffled); 12 A targets, 8 held-out A rows."""
    from flax import nnx

    from stride_jax.data import Document, tokenize_documents
    from stride_jax.model import init_model
    from stride_jax.recipes.pretrain import ArchConfig, OptimConfig, model_config_for
    from stride_jax.tasks.selection import _concat, assemble_selection_task
    from stride_jax.tokenizer import special_ids, train_bpe, vocab_size_of

    rng = np.random.default_rng(0)

    def docs(words, prefix, m):
        return [Document(id=f"{prefix}{i}", text=" ".join(rng.choice(words, 10)))
                for i in range(m)]

    a, b = docs(_A, "a", 52), docs(_B, "b", 32)
    tok = train_bpe([d.text for d in a + b], vocab_size=300)
    sp = special_ids(tok)
    seq_len = 24
    rows_a = tokenize_documents(a, tok, seq_len, mode="document", truncate=True)
    rows_b = tokenize_documents(b, tok, seq_len, mode="document", truncate=True)
    pool = _concat(rows_a.subset(range(32)), rows_b)
    pool = pool.subset(rng.permutation(len(pool)))
    arch = ArchConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                      intermediate_size=64)
    mcfg = model_config_for(arch, vocab_size_of(tok), seq_len, eos_id=sp.eos_id,
                            pad_id=sp.pad_id)
    graphdef, params = nnx.split(init_model(mcfg, seed=0), nnx.Param)
    optim = OptimConfig(learning_rate=3e-3, warmup_steps=2, weight_decay=0.0, batch_size=8,
                        epochs=8.0)
    return assemble_selection_task(
        graphdef=graphdef, base_params=params, pool=pool,
        in_domain=np.array([i.startswith("a") for i in pool.ids]),
        targets=rows_a.subset(range(32, 44)), eval_rows=rows_a.subset(range(44, 52)),
        optim=optim, seed=0, stamp={"task": "two-language test"}, num_layers=2, tok=tok)


def test_stride_selection_beats_random_selection_on_target_loss():
    from stride_jax.config import load_config
    from stride_jax.eval.suite import TaskConfig, run_method

    task = _two_language_task()
    Q, E = task.num_queries, task.num_eval
    assert (task.n, Q, E) == (64, 12, 8) and task.in_domain.sum() == 32
    # Fine-tuning on the whole pool helps the targets (the attributed model is that one).
    assert task.full_losses.mean() < task.pretrained_losses.mean() - 1.0
    np.testing.assert_allclose(task.base_query_losses, task.full_losses[:Q], rtol=1e-5)

    cfg = load_config(TaskConfig, None, [
        "stride.design.num_subsets=64", "stride.design.per_example=16",
        "stride.train.subsets_per_step=16", "stride.train.epochs=6"])
    scores = run_method("stride", task, cfg).scores_qn
    k = 16
    top = select_top(aggregate(scores, "zscore"), k)
    assert task.in_domain[top].mean() >= 0.75          # random: 0.5 on average

    rng = np.random.default_rng(1)
    rand = np.stack([rng.choice(task.n, k, replace=False) for _ in range(5)])
    subsets = np.concatenate([top[None], rand])
    losses = task.retrain_all(subsets)
    assert losses.shape == (6, Q + E)
    np.testing.assert_allclose(task.retrain(subsets), losses[:, :Q], rtol=1e-6)
    target, heldout = losses[:, :Q].mean(1), losses[:, Q:].mean(1)
    # STRIDE's selection lowers the target loss below the random selections' mean by more than
    # their spread, and helps the held-out rows of the target language too.
    assert target[0] < target[1:].mean() - target[1:].std()
    assert heldout[0] < heldout[1:].mean() - heldout[1:].std()
