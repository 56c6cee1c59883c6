"""Sparse scores (``scores=topk``): when Q x n does not fit, each query keeps only its top
proponents and opponents; they equal the top of the dense matrix, block by block or whole, and
every consumer of a run says what to do when only the top scores exist."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from _tiny import random_rows
from stride_jax.attributor import (AttributeConfig, Attribution, Attributor, DesignConfig,
                                   TopScores)
from stride_jax.measure import MeasureConfig
from stride_jax.model.config import tiny_llama
from stride_jax.model.transformer import init_model
from stride_jax.solve import SolveConfig
from stride_jax.steering import SteeringConfig
from stride_jax.train import OperatorTrainConfig


def test_top_scores_match_the_dense_ranking():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(7, 50)).astype(np.float32)
    w[2] = np.abs(w[2])             # no opponent at all: padded with -1
    w[3, :45] = 0.0                 # fewer than k nonzeros
    top = TopScores.from_dense(w, 6)
    dense = Attribution(w, [str(q) for q in range(7)], [str(i) for i in range(50)],
                        np.zeros((7, 3)), np.zeros(7), np.zeros(7), np.zeros(7))
    sparse = dense._replace(scores_qn=None, top_scores=top)
    for q in range(7):
        for k in (1, 3, 6):
            assert sparse.top(q, k) == dense.top(q, k)
    assert (top.opp_index[2] == -1).all() and (top.opp_score[2] == 0).all()
    with pytest.raises(ValueError, match="only the top 6 scores per query were kept"):
        sparse.top(0, 7)


@pytest.fixture(scope="module")
def attributor_parts():
    vocab = 64
    model = init_model(tiny_llama(vocab_size=vocab, hidden_size=32, num_heads=2, num_kv_heads=1,
                                  head_dim=16, intermediate_size=64, num_layers=2), seed=0)
    train, queries = random_rows(48, 12, vocab, 0, "t"), random_rows(7, 12, vocab, 1, "q")
    cfg = AttributeConfig(
        operators="trained",
        design=DesignConfig(num_subsets=24, per_example=4),
        steering=SteeringConfig(rank=4),
        train=OperatorTrainConfig(epochs=2, subsets_per_step=8, rows_per_subset=4,
                                  stability_rows=4, tokens_per_row=6),
        measure=MeasureConfig(query_batch=4, subset_chunk=8),
        solve=SolveConfig(query_chunk=3), topk=4)
    att = Attributor(model, train, cfg, progress=False)
    return model, train, queries, cfg, att.measure(queries)


def test_topk_run_equals_the_top_of_the_dense_run(attributor_parts, tmp_path):
    model, train, queries, cfg, responses = attributor_parts
    dense = Attributor(model, train, dataclasses.replace(cfg, scores="dense"),
                       progress=False).solve(responses, queries.ids)
    # Cross-validated lambda, solved in blocks of 3 queries: a query's answer does not depend
    # on the block it is solved in.
    work = tmp_path / "run"
    att = Attributor(model, train, dataclasses.replace(cfg, scores="topk"), workdir=work,
                     progress=False)
    sparse = att.solve(responses, queries.ids)
    assert sparse.scores_qn is None and dense.scores_qn is not None
    scale = np.abs(dense.scores_qn).max()
    assert sum(len(p) + len(o) for p, o in map(dense.top, range(len(queries)))) >= 10
    for q in range(len(queries)):
        (dp, do), (sp, so) = dense.top(q, 4), sparse.top(q, 4)
        assert [i for i, _ in sp] == [i for i, _ in dp]
        assert [i for i, _ in so] == [i for i, _ in do]
        np.testing.assert_allclose([s for _, s in sp + so], [s for _, s in dp + do],
                                   atol=1e-4 * scale)
    np.testing.assert_allclose(sparse.lam_q, dense.lam_q, rtol=1e-5)
    # The stage stores only the top scores and reloads them.
    sparse.write(work / "out", k=4)
    assert (work / "out" / "scores_topk.npz").is_file() and not (work / "out" / "scores.npy").exists()
    again = Attributor(model, train, dataclasses.replace(cfg, scores="topk"), workdir=work,
                       progress=False).solve(responses, queries.ids)
    assert np.array_equal(again.top_scores.pro_index, sparse.top_scores.pro_index)


def test_auto_keeps_dense_scores_only_when_they_fit(attributor_parts):
    model, train, queries, cfg, responses = attributor_parts
    small = dataclasses.replace(cfg, scores_memory_limit="1KiB")   # 7 x 48 x 4 B > 1 KiB
    assert not Attributor(model, train, small, progress=False).dense_scores(len(queries))
    assert Attributor(model, train, cfg, progress=False).dense_scores(len(queries))
    with pytest.raises(ValueError, match="scores must be 'auto', 'dense' or 'topk'"):
        Attributor(model, train, dataclasses.replace(cfg, scores="sparse"), progress=False)


def test_only_process_zero_writes(tmp_path, monkeypatch):
    import stride_jax.io.atomic as atomic
    monkeypatch.setattr(atomic, "is_writer", lambda: False)
    atomic.atomic_write_text(tmp_path / "shared.txt", "x")
    assert not (tmp_path / "shared.txt").exists() and not list(tmp_path.iterdir())
    with atomic.atomic_path(tmp_path / "own.txt", every_process=True) as tmp:
        tmp.write_text("y")
    assert (tmp_path / "own.txt").read_text() == "y"
