"""Lexical and representation baselines against brute-force and scikit-learn references."""

from __future__ import annotations

import math
from collections import Counter

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from stride_jax.baselines.similarity import cosine_scores, pooled_features
from stride_jax.baselines.text import bm25_scores, docs_from_rows, tfidf_scores


def _corpus():
    rng = np.random.default_rng(0)
    train = [rng.integers(0, 12, rng.integers(1, 15)) for _ in range(9)]
    train.append(np.array([], np.int64))  # an empty row must score 0, not NaN
    query = [rng.integers(0, 14, rng.integers(1, 8)) for _ in range(4)]  # 12, 13 are unseen
    return train, query


def _bm25_reference(train, query, k1=1.5, b=0.75):
    n = len(train)
    avgdl = sum(len(d) for d in train) / n
    df = Counter(t for d in train for t in set(d.tolist()))
    out = np.zeros((len(query), n))
    for qi, q in enumerate(query):
        for di, d in enumerate(train):
            tf = Counter(d.tolist())
            for t in q.tolist():  # each query occurrence counts
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                f = tf[t]
                if f == 0:  # no match; also avoids 0/0 for an empty document with b = 1
                    continue
                out[qi, di] += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len(d) / avgdl))
    return out


def _tfidf_reference(train, query):
    n = len(train)
    df = Counter(t for d in train for t in set(d.tolist()))

    def vec(d):
        v = {t: c * (math.log((1 + n) / (1 + df[t])) + 1) for t, c in Counter(d.tolist()).items()
             if df[t]}
        norm = math.sqrt(sum(x * x for x in v.values()))
        return {t: x / norm for t, x in v.items()} if norm else {}

    tv, qv = [vec(d) for d in train], [vec(q) for q in query]
    return np.array([[sum(x * d.get(t, 0.0) for t, x in q.items()) for d in tv] for q in qv])


@pytest.mark.parametrize("k1, b", [(1.5, 0.75), (1.2, 0.0), (0.9, 1.0)])
def test_bm25_matches_reference(k1, b):
    train, query = _corpus()
    got = bm25_scores(train, query, k1=k1, b=b)
    assert got.dtype == np.float32 and got.shape == (4, 10)
    np.testing.assert_allclose(got, _bm25_reference(train, query, k1, b), rtol=1e-5, atol=1e-6)
    assert np.all(got[:, -1] == 0)


def test_tfidf_matches_reference_and_sklearn():
    train, query = _corpus()
    got = tfidf_scores(train, query)
    assert got.dtype == np.float32 and got.shape == (4, 10)
    np.testing.assert_allclose(got, _tfidf_reference(train, query), rtol=1e-5, atol=1e-6)
    vec = TfidfVectorizer(analyzer=lambda doc: [str(t) for t in doc])
    x_train = vec.fit_transform(train)
    want = (vec.transform(query) @ x_train.T).toarray()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scorer", [bm25_scores, tfidf_scores])
def test_rare_shared_tokens_rank_first(scorer):
    rng = np.random.default_rng(1)
    common = np.arange(5)
    train = [rng.choice(common, 20) for _ in range(30)]
    train[17] = np.concatenate([rng.choice(common, 20), [100, 101]])
    query = [np.concatenate([rng.choice(common, 10), [101, 100, 7]])]
    scores = scorer(train, query)
    assert scores.argmax(1)[0] == 17


def test_docs_from_rows_and_validation():
    ids = np.array([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = np.array([[1, 1, 1, 0], [0, 1, 0, 0]])
    docs = docs_from_rows(ids, mask)
    assert [d.tolist() for d in docs] == [[5, 6, 7], [9]]
    with pytest.raises(ValueError, match=r"\[n, L\]"):
        docs_from_rows(ids, mask[:, :3])
    with pytest.raises(ValueError, match=r"train_docs\[1\] must be a 1-D integer array"):
        bm25_scores([np.array([1, 2]), np.array([[1]])], [np.array([1])])
    with pytest.raises(ValueError, match="negative token ids"):
        tfidf_scores([np.array([1, -1])], [np.array([1])])
    with pytest.raises(ValueError, match="train_docs is empty"):
        bm25_scores([], [np.array([1])])


def test_cosine_scores_matches_numpy():
    rng = np.random.default_rng(2)
    fq, ft = rng.normal(size=(5, 16)), rng.normal(size=(23, 16))
    fq[1] = 0.0
    ft[4] = 0.0
    want = fq @ ft.T
    with np.errstate(invalid="ignore", divide="ignore"):
        want = want / np.linalg.norm(fq, axis=1)[:, None] / np.linalg.norm(ft, axis=1)[None]
    want = np.nan_to_num(want)
    for chunk in (1, 7, 8192):
        got = cosine_scores(fq, ft, chunk_size=chunk)
        assert got.dtype == np.float32 and not np.isnan(got).any()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="same D"):
        cosine_scores(fq, ft[:, :3])


def _toy_features(trace_counter: list[int] | None = None):
    def features(params, ids, mask):
        if trace_counter is not None:
            trace_counter.append(1)  # runs once per trace, not per call
        h = params["emb"][ids] * mask[..., None]
        return 2.0 * h[..., :3], jnp.tanh(h)
    return features


def test_pooled_features_matches_direct_and_batch_size():
    rng = np.random.default_rng(3)
    n, length, vocab, dim = 11, 6, 20, 8
    params = {"emb": jnp.asarray(rng.normal(size=(vocab, dim)), jnp.float32)}
    ids = rng.integers(0, vocab, (n, length))
    att = np.ones((n, length), np.int32)
    att[:3, 4:] = 0
    w = att * (rng.random((n, length)) < 0.7)
    w[5] = 0  # no selected positions: pools to zero
    h = np.asarray(params["emb"])[ids] * att[..., None]
    final = np.tanh(h)
    reader = 2.0 * h[..., :3]
    denom = np.maximum(w.sum(1, keepdims=True), 1)
    want_final = (w[..., None] * final).sum(1) / denom
    want_reader = (w[..., None] * reader).sum(1) / denom

    feats = _toy_features()
    for bs in (1, 4, 64):
        got = pooled_features(feats, params, ids, att, w, batch_size=bs)
        assert got.shape == (n, dim) and got.dtype == np.float32
        np.testing.assert_allclose(got, want_final, rtol=1e-5, atol=1e-6)
    got = pooled_features(feats, params, ids, att, w, batch_size=4, which="reader")
    np.testing.assert_allclose(got, want_reader, rtol=1e-5, atol=1e-6)
    assert np.all(got[5] == 0)

    traces: list[int] = []
    pooled_features(_toy_features(traces), params, ids, att, w, batch_size=4)  # 3 batches
    assert len(traces) == 1
    with pytest.raises(ValueError, match="which must be"):
        pooled_features(feats, params, ids, att, w, which="middle")
