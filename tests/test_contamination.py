"""Contamination audit: injection of replicas, the metrics (hand-computed cases and scikit-learn
as a reference), combination, and the audit end to end on a tiny task with heavy leaks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from stride_jax.apps.contamination import (average_precision, combine, detection, hit_at_k,
                                           inject, query_statistic, replica_recall, roc_auc)
from stride_jax.data import TokenizedSet


def _rows(n: int, prefix: str, seed: int, L: int = 8) -> TokenizedSet:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 50, (n, L)).astype(np.int32)
    mask = np.ones_like(ids)
    loss = mask.copy()
    loss[:, -1] = 0
    names = [f"{prefix}{i}" for i in range(n)]
    return TokenizedSet(names, ids, mask, loss, [f"{prefix}doc"] * n)


# ----------------------------------------------------------------------------------------------
# inject
# ----------------------------------------------------------------------------------------------
def test_inject_counts_ids_positions_and_replica_map():
    train, queries = _rows(30, "t", 0), _rows(6, "q", 1)
    copies = [0, 3, 0, 1, 2, 0]
    rows, rmap = inject(train, queries, [1, 3, 4], copies, seed=5)
    assert len(rows) == 30 + 6
    assert sorted(rmap) == [1, 3, 4]
    assert [len(rmap[q]) for q in (1, 3, 4)] == [3, 1, 2]
    everything = np.concatenate(list(rmap.values()))
    assert len(set(everything.tolist())) == 6                      # disjoint positions
    for q, idx in rmap.items():
        assert np.all(np.diff(idx) > 0)
        for j, i in enumerate(idx):
            np.testing.assert_array_equal(rows.input_ids[i], queries.input_ids[q])
            np.testing.assert_array_equal(rows.loss_mask[i], queries.loss_mask[q])
            assert rows.ids[i].startswith(f"replica:{queries.ids[q]}:")
    # Fresh, unique ids; the original rows keep their order in the other positions.
    assert len(set(rows.ids)) == len(rows)
    rest = np.setdiff1d(np.arange(len(rows)), everything)
    assert [rows.ids[i] for i in rest] == train.ids
    np.testing.assert_array_equal(rows.input_ids[rest], train.input_ids)
    # Deterministic in the seed; another seed moves the copies.
    again, rmap2 = inject(train, queries, [1, 3, 4], copies, seed=5)
    assert again.ids == rows.ids and all(np.array_equal(rmap[q], rmap2[q]) for q in rmap)
    other, rmap3 = inject(train, queries, [1, 3, 4], copies, seed=6)
    assert any(not np.array_equal(rmap[q], rmap3[q]) for q in rmap)


def test_inject_accepts_a_mask_an_int_or_a_mapping_and_rejects_bad_input():
    train, queries = _rows(10, "t", 0), _rows(4, "q", 1)
    _, a = inject(train, queries, np.array([True, False, True, False]), 2, seed=0)
    _, b = inject(train, queries, [0, 2], {0: 2, 2: 2}, seed=0)
    assert sorted(a) == sorted(b) == [0, 2]
    assert all(np.array_equal(a[q], b[q]) for q in a)
    with pytest.raises(ValueError, match="at least 1"):
        inject(train, queries, [0, 2], [1, 0, 0, 0], seed=0)
    with pytest.raises(ValueError, match="no entry for leaked query 2"):
        inject(train, queries, [0, 2], {0: 1}, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        inject(train, _rows(4, "q", 1, L=6), [0], 1, seed=0)


def test_inject_with_noise_changes_exactly_that_many_scored_tokens():
    train, queries = _rows(40, "t", 0, L=21), _rows(3, "q", 1, L=21)   # 20 scored tokens a row
    exact, rmap0 = inject(train, queries, [0, 2], 3, seed=4)
    noisy, rmap = inject(train, queries, [0, 2], 3, seed=4, noise=0.25)
    assert all(np.array_equal(rmap[q], rmap0[q]) for q in rmap)       # same positions
    np.testing.assert_array_equal(noisy.loss_mask, exact.loss_mask)
    replicas = np.concatenate(list(rmap.values()))
    others = np.setdiff1d(np.arange(len(noisy)), replicas)
    np.testing.assert_array_equal(noisy.input_ids[others], exact.input_ids[others])
    changed = noisy.input_ids[replicas] != exact.input_ids[replicas]
    assert (changed.sum(1) == 5).all()                                 # round(0.25 * 20)
    assert not changed[:, 0].any()                                     # never the unscored first
    assert np.isin(noisy.input_ids[replicas], train.input_ids[:, 1:]).all()
    # The 3 copies of a query differ from each other.
    assert len({noisy.input_ids[i].tobytes() for i in rmap[0]}) == 3
    with pytest.raises(ValueError, match="noise=1.5"):
        inject(train, queries, [0], 1, seed=0, noise=1.5)


def test_inject_refuses_an_id_clash():
    train = _rows(3, "replica:q0:", 0)                # ids replica:q0:0 .. replica:q0:2
    with pytest.raises(ValueError, match="clashes"):
        inject(train, _rows(1, "q", 1), [0], 1, seed=0)


# ----------------------------------------------------------------------------------------------
# metrics: hand-computed cases
# ----------------------------------------------------------------------------------------------
def test_replica_recall_hand_computed():
    s = np.array([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0],      # q0: replicas {0, 3}: top-2 = {0, 1}
                  [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],      # q1: clean
                  [1.0, 9.0, 8.0, 7.0, 0.0, 0.0]])     # q2: replica {1}: top-1 = {1}
    rmap = {0: [0, 3], 2: [1]}
    r = replica_recall(s, rmap)
    assert r["per_query"] == {0: 0.5, 2: 1.0}
    assert r["mean"] == 0.75 and r["by_copies"] == {1: 1.0, 2: 0.5}
    # Pooled: T = 3 pairs; the top-3 of all 18 scores are 9 (q2,1), 8 (q2,2), 7 (q2,3).
    assert r["pooled"] == pytest.approx(1 / 3)
    assert r["chance_mean"] == pytest.approx((2 / 6 + 1 / 6) / 2)
    assert r["chance_pooled"] == pytest.approx(3 / 18)
    # by="abs": the most extreme scores of either sign.
    neg = -s
    assert replica_recall(neg, rmap)["mean"] < 0.75
    assert replica_recall(neg, rmap, by="abs")["mean"] == 0.75


def test_ties_give_the_expectation_under_random_order():
    n = 20
    zeros = np.zeros((2, n))
    rmap = {0: [3, 7], 1: [5]}
    r = replica_recall(zeros, rmap)
    assert r["per_query"][0] == pytest.approx(2 / n) and r["per_query"][1] == pytest.approx(1 / n)
    assert r["pooled"] == pytest.approx(3 / (2 * n))
    h = hit_at_k(zeros, rmap, k=10)
    # All tied: P(some replica in the top 10) = 1 - C(n - R, 10) / C(n, 10).
    want0 = 1 - math.comb(n - 2, 10) / math.comb(n, 10)
    want1 = 1 - math.comb(n - 1, 10) / math.comb(n, 10)
    assert h["per_query"][0] == pytest.approx(want0) and h["per_query"][1] == pytest.approx(want1)
    assert h["mean"] == pytest.approx(h["chance"])
    # First rank with ties: one replica among 20 tied values -> expected rank (20 + 1) / 2.
    assert h["first_rank"][1] == pytest.approx(10.5)
    # A partial tie at the cut: scores 3 > 2 = 2 = 2 > ..., replica at one of the tied 2s, k=2.
    s = np.array([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0]])
    h = hit_at_k(s, {0: [2]}, k=2)
    assert h["per_query"][0] == pytest.approx(1 / 3)
    assert h["first_rank"][0] == pytest.approx(1 + 1 + 2 / 2)   # 1 above, 2 tied non-replicas


def test_hit_at_k_hand_computed():
    s = np.array([[0.1, 0.9, 0.5, 0.7, 0.2],
                  [0.9, 0.1, 0.2, 0.3, 0.4]])
    rmap = {0: [2], 1: [1, 2]}
    h = hit_at_k(s, rmap, k=2)
    assert h["per_query"] == {0: 0.0, 1: 0.0}
    assert h["first_rank"] == {0: 3.0, 1: 4.0}
    h = hit_at_k(s, rmap, k=3)
    assert h["per_query"] == {0: 1.0, 1: 0.0}
    assert h["by_copies"] == {1: 1.0, 2: 0.0} and h["mrr"] == pytest.approx((1 / 3 + 1 / 4) / 2)


def test_auc_hand_computed_with_ties():
    y = np.array([1, 0, 1, 0])
    s = np.array([0.9, 0.8, 0.3, 0.3])
    # pairs (pos, neg): (0.9, 0.8) 1, (0.9, 0.3) 1, (0.3, 0.8) 0, (0.3, 0.3) 1/2  -> 2.5 / 4
    assert roc_auc(y, s) == pytest.approx(0.625)
    # thresholds 0.9: P=1, R=1/2; 0.8: P=1/2, R=1/2; 0.3: P=2/4, R=1 -> 1/2 * 1 + 1/2 * 1/2
    assert average_precision(y, s) == pytest.approx(0.75)
    assert math.isnan(roc_auc([1, 1], [0.1, 0.2])) and math.isnan(average_precision([0, 0], [1, 2]))


def test_auc_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(2, 60))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        s = rng.integers(0, 6, n).astype(float) if rng.random() < 0.5 else rng.normal(size=n)
        assert roc_auc(y, s) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)
        assert average_precision(y, s) == pytest.approx(metrics.average_precision_score(y, s),
                                                        abs=1e-12)


def test_detection_and_query_statistics():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(6, 50))
    leaked = np.array([1, 0, 1, 0, 1, 0], bool)
    s[leaked, 7] += 20.0                                  # a planted spike in each leaked query
    d = detection(s, leaked)
    assert d["roc_auc"] == 1.0 and d["pr_auc"] == 1.0 and d["chance_pr_auc"] == 0.5
    assert detection(s, leaked, stat="max")["roc_auc"] == 1.0
    assert detection(-s, leaked)["roc_auc"] < 0.5
    z = query_statistic(np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 3.0]]), "max_z")
    assert z[0] == 0.0 and z[1] == pytest.approx(2 / np.sqrt(2))   # (3 - 1) / std([0, 0, 3])
    with pytest.raises(ValueError, match="unknown detection statistic"):
        query_statistic(s, "median")


def test_combine_rank_zscore_rrf():
    a = np.array([[3.0, 1.0, 2.0, 2.0]])
    b = np.array([[0.0, 10.0, 5.0, 1.0]])
    ra = combine([a], "rank")
    np.testing.assert_allclose(ra, [[4 / 4, 1 / 4, 2.5 / 4, 2.5 / 4]])  # ties share rank 2.5
    # Ranks ignore monotone transforms; z-scores do not.
    np.testing.assert_allclose(combine([np.exp(a), b], "rank"), combine([a, b], "rank"))
    np.testing.assert_allclose(combine([a, b], "rank"), ra + combine([b], "rank"))
    za = combine([a], "zscore")
    np.testing.assert_allclose(za, (a - a.mean()) / a.std())
    np.testing.assert_allclose(combine([a, b], "zscore", weights=[2.0, 0.0]), 2 * za)
    assert np.all(combine([np.ones((2, 3))], "zscore") == 0)          # constant rows: 0
    np.testing.assert_allclose(combine([a], "rrf"), [[1 / 61, 1 / 64, 1 / 62.5, 1 / 62.5]])
    with pytest.raises(ValueError, match="differ in shape"):
        combine([a, np.zeros((1, 3))])
    with pytest.raises(ValueError, match="unknown combination"):
        combine([a], "mean")
    with pytest.raises(ValueError, match="NaN"):
        combine([np.array([[np.nan, 1.0]])])


def test_combining_two_partial_signals_beats_each():
    # Replica i=0; signal a ranks it 2nd (a decoy first), signal b ranks it 2nd (another decoy).
    a = np.array([[5.0, 9.0, 0.0, 1.0, 2.0]])
    b = np.array([[5.0, 0.0, 9.0, 1.0, 2.0]])
    assert hit_at_k(a, {0: [0]}, k=1)["mean"] == 0.0 == hit_at_k(b, {0: [0]}, k=1)["mean"]
    assert hit_at_k(combine([a, b], "rank"), {0: [0]}, k=1)["mean"] == 1.0


# ----------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("operators", ["trained", "closed_form"])
def test_audit_end_to_end_finds_heavily_replicated_leaks(tmp_path, capsys, operators):
    """A tiny decoder on a small text, 8 queries of which 4 leak with 12 copies each; STRIDE
    with trained operators (the settings below) and with the closed-form default."""
    from stride_jax.cli import main
    from stride_jax.data import shakespeare_plays
    text = shakespeare_plays(["macbeth"])[0].text[:24000]
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "audit"
    args = ["-q", "contamination", "--out", str(out), "--methods", "stride,graddot,repsim",
            f"task.base.corpus.source={tmp_path / 'corpus.txt'}", "task.base.corpus.seq_len=32",
            "task.base.corpus.vocab_size=300", "task.base.corpus.heldout_fraction=0.05",
            "task.base.arch.hidden_size=32", "task.base.arch.intermediate_size=64",
            "task.base.arch.num_heads=2", "task.base.arch.num_kv_heads=1",
            "task.base.arch.head_dim=16", "task.base.optim.epochs=6", "task.base.num_queries=8",
            "task.copies=[12]", "stride.design.per_example=8", "stride.steering.rank=8",
            "stride.train.epochs=6", "stride.train.subsets_per_step=16", "combine=[rank]",
            f"stride.operators={operators}"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "stride+graddot (rank)" in printed and "chance" in printed
    res = json.loads((out / "contamination.json").read_text())
    task = res["task"]
    assert len(task["leaked"]) == 4 and task["n"] == task["n_clean"] + 4 * 12
    rows = {r["method"]: r for r in res["rows"]}
    chance = res["chance"]
    # Chance: 12 replicas among n (~220) rows: recall 12 / n ~ 0.05, hit@10 ~ 0.45, pooled
    # recall 48 / (8 n) ~ 0.03, ROC-AUC 0.5. The audit must find the planted copies far above it.
    assert chance["recall"] < 0.1 and chance["hit@10"] < 0.6
    s = rows["stride"]
    assert s["hit@10"] == 1.0
    if operators == "trained":
        assert s["recall"] >= 0.3 > 10 * chance["recall"], s["recall"]
        assert s["recall_pooled"] >= 0.3
        assert s["roc_auc"] >= 0.75
    else:
        # The closed form scores an exact copy like the query itself: every replica is on top,
        # and the scores are comparable across queries (measured: recall 1.0, pooled 0.92).
        # Query-level detection is not asserted: the max_z statistic shrinks when 12 equal
        # replicas inflate a query's spread (ROC-AUC 0.25 on these 8 queries, as repsim's).
        assert s["recall"] >= 0.9 and s["recall_pooled"] >= 0.8, (s["recall"], s["recall_pooled"])
    # Exact copies: their gradient and representation equal the query's, so these find them.
    assert rows["repsim"]["recall"] == 1.0 and rows["graddot"]["hit@10"] == 1.0
    assert rows["stride+graddot (rank)"]["hit@10"] == 1.0
    assert (out / "scores" / "stride.npy").is_file() and (out / "contamination.yaml").is_file()
