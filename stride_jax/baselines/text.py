"""Lexical baselines: BM25 and TF-IDF similarity between queries and training rows, on token ids.

Documents are 1-D integer arrays of token ids (:func:`docs_from_rows` picks the real tokens of a
padded batch), so no tokenizer or text normalisation is involved: two documents match where they
share token ids. Term counts are ``scipy.sparse`` CSR matrices, so memory is O(number of
distinct (document, token) pairs), never O(documents x vocabulary). Scores are ``[Q, n]``
float32, larger meaning more similar (a proxy for "helps the query").
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp

from stride_jax.errors import DataError

__all__ = ["bm25_scores", "docs_from_rows", "tfidf_scores"]


def docs_from_rows(input_ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """The tokens of each row of ``input_ids [n, L]`` where ``mask [n, L]`` is nonzero."""
    input_ids, mask = np.asarray(input_ids), np.asarray(mask)
    if input_ids.ndim != 2 or input_ids.shape != mask.shape:
        raise DataError(f"input_ids and mask must both be [n, L]; got {input_ids.shape} and "
                        f"{mask.shape}")
    keep = mask.astype(bool)
    return [row[k] for row, k in zip(input_ids, keep)]


def _check_docs(docs: Sequence[np.ndarray], name: str) -> list[np.ndarray]:
    out = []
    for i, d in enumerate(docs):
        d = np.asarray(d)
        if d.ndim != 1 or not (np.issubdtype(d.dtype, np.integer) or d.size == 0):
            raise DataError(f"{name}[{i}] must be a 1-D integer array of token ids; got dtype "
                            f"{d.dtype} and shape {d.shape} (see docs_from_rows)")
        if d.size and d.min() < 0:
            raise DataError(f"{name}[{i}] has negative token ids; drop padding with "
                            f"docs_from_rows(input_ids, mask)")
        out.append(d.astype(np.int64))
    return out


def _counts(docs: list[np.ndarray], vocab: int) -> sp.csr_matrix:
    """Term-count matrix [len(docs), vocab] (duplicate (row, token) entries are summed)."""
    lengths = np.fromiter((d.size for d in docs), np.int64, len(docs))
    rows = np.repeat(np.arange(len(docs)), lengths)
    cols = np.concatenate(docs) if docs else np.zeros(0, np.int64)
    m = sp.csr_matrix((np.ones(cols.size), (rows, cols)), shape=(len(docs), vocab))
    m.sum_duplicates()
    return m


def _count_pair(train_docs, query_docs) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    train = _check_docs(train_docs, "train_docs")
    query = _check_docs(query_docs, "query_docs")
    if not train:
        raise DataError("train_docs is empty; there is nothing to score against")
    vocab = 1 + max((int(d.max()) for d in train + query if d.size), default=0)
    return _counts(train, vocab), _counts(query, vocab)


def _row_of_nnz(m: sp.csr_matrix) -> np.ndarray:
    return np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))


def bm25_scores(train_docs: Sequence[np.ndarray], query_docs: Sequence[np.ndarray], *,
                k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """Okapi BM25 score of every training document for every query, ``[Q, n]`` float32.

        score(q, d) = sum_t qtf(t, q) idf(t) f(t, d) (k1 + 1) / (f(t, d) + k1 (1 - b + b |d|/avgdl))
        idf(t)      = log(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

    with ``f(t, d)`` the count of token ``t`` in ``d``, ``|d|`` its length in tokens, ``avgdl``
    the mean length over the ``N`` training documents, ``df(t)`` the number of them containing
    ``t``, and ``qtf(t, q)`` the count of ``t`` in the query (a repeated query token counts each
    time, as in Lucene and ``rank_bm25``). This idf (Lucene's) is always positive.
    Reference: Robertson & Zaragoza 2009, "The Probabilistic Relevance Framework: BM25 and Beyond".
    """
    if k1 < 0 or not 0.0 <= b <= 1.0:
        raise DataError(f"need k1 >= 0 and 0 <= b <= 1; got k1={k1}, b={b}")
    tf_nv, qtf_qv = _count_pair(train_docs, query_docs)
    n = tf_nv.shape[0]
    df_v = np.bincount(tf_nv.indices, minlength=tf_nv.shape[1])
    idf_v = np.log1p((n - df_v + 0.5) / (df_v + 0.5))
    length_n = np.asarray(tf_nv.sum(1)).ravel()
    # Only stored (nonzero) entries are touched, so an all-empty corpus (avgdl 0) never divides.
    avgdl = max(length_n.mean(), 1e-12)
    f = tf_nv.data
    norm = k1 * (1.0 - b + b * length_n[_row_of_nnz(tf_nv)] / avgdl)
    w_nv = tf_nv.copy()
    w_nv.data = idf_v[tf_nv.indices] * f * (k1 + 1.0) / (f + norm)
    return np.asarray((qtf_qv @ w_nv.T).toarray(), np.float32)


def tfidf_scores(train_docs: Sequence[np.ndarray], query_docs: Sequence[np.ndarray]) -> np.ndarray:
    """Cosine similarity of l2-normalised TF-IDF vectors, ``[Q, n]`` float32.

        x_d(t) = f(t, d) idf(t),   idf(t) = ln((1 + N) / (1 + df(t))) + 1,
        score(q, d) = <x_q, x_d> / (||x_q|| ||x_d||)        (0 where a vector is zero)

    with ``f``, ``df`` and ``N`` as in :func:`bm25_scores`, idf fitted on the training documents
    only. These are scikit-learn's ``TfidfVectorizer`` defaults (raw counts, ``smooth_idf``,
    ``norm="l2"``); like it, query tokens absent from the training documents are dropped (they
    match nothing, and keeping them would only shrink the query's normalised vector).
    """
    tf_nv, tf_qv = _count_pair(train_docs, query_docs)
    n = tf_nv.shape[0]
    df_v = np.bincount(tf_nv.indices, minlength=tf_nv.shape[1])
    idf_v = np.where(df_v > 0, np.log((1.0 + n) / (1.0 + df_v)) + 1.0, 0.0)

    def normalised(m: sp.csr_matrix) -> sp.csr_matrix:
        x = m.multiply(idf_v[None, :]).tocsr()
        norm = np.sqrt(np.asarray(x.multiply(x).sum(1)).ravel())
        return sp.diags(np.where(norm > 0, 1.0 / np.where(norm > 0, norm, 1.0), 0.0)) @ x

    return np.asarray((normalised(tf_qv) @ normalised(tf_nv).T).toarray(), np.float32)
