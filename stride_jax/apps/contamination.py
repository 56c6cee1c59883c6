"""Contamination audit: plant replicas of some queries in the training data, then ask the scores
to find them.

Pure NumPy functions (no JAX); the task that trains a model on the contaminated data is
:mod:`stride_jax.tasks.contamination`.

**Injection** (:func:`inject`). Each leaked query ``q`` is copied ``copies[q]`` times into the
training rows, at uniformly random positions, each copy with a fresh id (exact copies, or
near-duplicates with a fraction ``noise`` of their tokens replaced). ``replica_map[q]`` is
the sorted array of training indices (in the contaminated set) that are copies of query ``q``;
``R_q = len(replica_map[q])``.

**Scores.** ``scores_qn[q, i]`` is a method's score of training example ``i`` for query ``q``,
larger meaning a stronger proponent (the library's sign convention: positive = training on ``i``
lowers ``q``'s loss). A replica of ``q`` should be among ``q``'s *largest* scores, so every
ranking below is by the score itself (``by="score"``); ``by="abs"`` ranks by ``|score|`` instead
(the most extreme scores of either sign).

**Ties.** Scores may tie (a sparse Lasso gives many exact zeros). Every top-``k`` metric is the
*expectation under a uniformly random order of tied scores*, so a method that ties everything
scores exactly chance, never better or worse by the index order.

Metrics (``L`` = leaked queries, ``n`` training examples, ``Q`` queries):

* **replica recall** (:func:`replica_recall`): per leaked query, the fraction of its ``R_q``
  replicas among its top-``R_q`` scores (chance ``R_q / n``); their mean over ``L``; and the
  **pooled** recall: of all ``T = sum_q R_q`` (query, replica) pairs, the fraction among the
  top-``T`` of all ``Q x n`` (query, example) scores, clean queries included (chance
  ``T / (Q n)``). The pooled version also asks whether scores are comparable across queries.
* **detection** (:func:`detection`): a per-query statistic (:func:`query_statistic`: ``max``,
  the largest score; ``max_z``, the largest z-score of the query's scores,
  ``max_i (s_qi - mean_q) / std_q``) separates leaked from clean queries; reported as ROC-AUC
  (:func:`roc_auc`, the Mann-Whitney probability that a leaked query's statistic exceeds a clean
  one's, ties counting 1/2; chance 0.5) and PR-AUC (:func:`average_precision`, precision averaged
  over the recall steps at each distinct threshold, as scikit-learn's
  ``average_precision_score``; chance = the fraction of leaked queries).
* **hit@k** (:func:`hit_at_k`): per leaked query, the probability that at least one of its
  replicas is among its top-``k`` scores; averaged over ``L`` (chance
  ``1 - C(n - R_q, k) / C(n, k)``). Also the **first rank**: the expected rank of the
  best-ranked replica (1 = top).

**Combination** (:func:`combine`): per query, each method's scores are mapped to a common scale
(``rank``: average rank divided by ``n``, in ``(0, 1]``, 1 = largest; ``zscore``: centred and
divided by the standard deviation; ``rrf``: reciprocal rank fusion ``1 / (60 + rank)``, rank 1 =
largest), then summed with weights.
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import numpy as np

from stride_jax.data import TokenizedSet
from stride_jax.errors import ConfigError, DataError

__all__ = ["inject", "replica_recall", "hit_at_k", "detection", "query_statistic", "roc_auc",
           "average_precision", "combine", "audit_scores", "format_table"]

By = Literal["score", "abs"]
ReplicaMap = Mapping[int, np.ndarray]


# ----------------------------------------------------------------------------------------------
# Injection
# ----------------------------------------------------------------------------------------------
def _copies_of(copies, leaked: np.ndarray, num_queries: int) -> np.ndarray:
    """``copies`` as an int array indexed by query (0 for queries that do not leak)."""
    out = np.zeros(num_queries, np.int64)
    if isinstance(copies, (int, np.integer)):
        out[leaked] = int(copies)
    elif isinstance(copies, Mapping):
        for q in leaked:
            if int(q) not in copies:
                raise ConfigError(f"copies has no entry for leaked query {int(q)}")
            out[q] = int(copies[int(q)])
    else:
        arr = np.asarray(copies, np.int64)
        if arr.shape != (num_queries,):
            raise ConfigError(f"copies must be an int, a mapping query -> copies, or a sequence "
                              f"indexed by query of length {num_queries}; got shape {arr.shape}")
        out[leaked] = arr[leaked]
    if (out[leaked] < 1).any():
        bad = int(leaked[np.argmin(out[leaked])])
        raise ConfigError(f"leaked query {bad} has {int(out[bad])} copies; each leaked query needs "
                          f"at least 1")
    return out


def inject(train_rows: TokenizedSet, query_rows: TokenizedSet, leaked, copies,
           seed: int = 0, *, noise: float = 0.0,
           id_prefix: str = "replica:") -> tuple[TokenizedSet, dict[int, np.ndarray]]:
    """Insert ``copies[q]`` exact copies of each leaked query into the training rows.

    Args:
      train_rows, query_rows: rows of the same ``seq_len`` (and both with or without
        ``targets``).
      leaked: the leaked query indices (a sequence of ints, or a boolean mask over queries).
      copies: copies per leaked query: one int for all, a mapping ``q -> copies``, or a sequence
        indexed by query (entries of clean queries are ignored). Each leaked query needs >= 1.
      seed: where the copies go: the ``R = sum copies`` replica rows take ``R`` positions drawn
        uniformly without replacement among the ``n + R`` rows of the result, in random order;
        the original rows keep their relative order in the remaining positions.
      noise: near-duplicates instead of exact copies: in each copy, ``round(noise * m)`` of its
        ``m`` scored tokens (positions ``t`` with ``loss_mask[t - 1] = 1``) are replaced, at
        positions drawn independently per copy, by other tokens drawn from the unigram
        distribution of the training rows' scored tokens (0: exact copies; the default).
      id_prefix: replica ``j`` of query ``q`` gets id ``f"{id_prefix}{query_id}:{j}"`` and source
        id ``f"{id_prefix}{query_source_id}"``; a clash with an existing training id is an error.

    Returns:
      ``(contaminated rows, replica_map)``, ``replica_map[q]`` the sorted indices of query
      ``q``'s replicas in the contaminated rows (leaked queries only, in increasing ``q``).
    """
    Q, n = len(query_rows), len(train_rows)
    if query_rows.seq_len != train_rows.seq_len:
        raise ConfigError(f"queries have seq_len {query_rows.seq_len} but training rows "
                          f"{train_rows.seq_len}; a replica must be a training row")
    if (query_rows.targets is None) != (train_rows.targets is None):
        raise ConfigError("queries and training rows must both have targets or both not")
    lk = np.asarray(leaked)
    if lk.dtype == bool:
        if lk.shape != (Q,):
            raise ConfigError(f"a boolean leaked mask needs {Q} entries; got {lk.shape}")
        lk = np.flatnonzero(lk)
    lk = np.unique(lk.astype(np.int64))
    if lk.size and (lk.min() < 0 or lk.max() >= Q):
        raise ConfigError(f"leaked query indices must lie in [0, {Q})")
    cnt = _copies_of(copies, lk, Q)
    src_q = np.repeat(lk, cnt[lk])                   # query of each replica, grouped by query
    rep_j = np.concatenate([np.arange(c) for c in cnt[lk]]) if lk.size else np.zeros(0, np.int64)
    R = int(src_q.size)
    rng = np.random.default_rng(seed)
    total = n + R
    is_rep = np.zeros(total, bool)
    rep_pos = rng.choice(total, R, replace=False) if R else np.zeros(0, np.int64)
    is_rep[rep_pos] = True
    perm = rng.permutation(R)                        # replica r goes to rep_pos[perm[r]]
    where = rep_pos[perm].astype(np.int64)
    # Row sources: >= 0 original training row, < 0 replica (-1 - r).
    source = np.empty(total, np.int64)
    source[~is_rep] = np.arange(n)
    source[where] = -1 - np.arange(R)
    ids, src_ids = list(train_rows.ids), list(train_rows.source_ids)
    taken = set(ids)
    new_ids = [f"{id_prefix}{query_rows.ids[q]}:{j}" for q, j in zip(src_q, rep_j)]
    clash = [i for i in new_ids if i in taken]
    if clash or len(set(new_ids)) != len(new_ids):
        raise ConfigError(f"replica id {clash[0] if clash else new_ids[0]!r} clashes with another "
                          f"row id; pass another id_prefix")
    out_ids = [ids[s] if s >= 0 else new_ids[-1 - s] for s in source]
    out_src = [src_ids[s] if s >= 0 else f"{id_prefix}{query_rows.source_ids[src_q[-1 - s]]}"
               for s in source]

    def gather(a_train, a_query):
        out = np.empty((total,) + a_train.shape[1:], a_train.dtype)
        out[~is_rep] = a_train
        out[where] = a_query[src_q]
        return out

    input_ids = gather(train_rows.input_ids, query_rows.input_ids)
    loss_mask = gather(train_rows.loss_mask, query_rows.loss_mask)
    if noise:
        if train_rows.targets is not None:
            raise ConfigError("noise perturbs token rows; rows with explicit targets (a "
                              "classifier's) take exact copies only")
        _perturb(input_ids, loss_mask, where, train_rows, rng, noise)
    rows = TokenizedSet(
        ids=out_ids,
        input_ids=input_ids,
        attention_mask=gather(train_rows.attention_mask, query_rows.attention_mask),
        loss_mask=loss_mask,
        source_ids=out_src,
        targets=None if train_rows.targets is None else gather(train_rows.targets,
                                                               query_rows.targets))
    replica_map = {int(q): np.sort(where[src_q == q]) for q in lk}
    return rows, replica_map


def _scored_positions(loss_mask_t: np.ndarray) -> np.ndarray:
    """Token positions ``t`` that are scored targets (``loss_mask[t - 1] = 1``)."""
    return np.flatnonzero(loss_mask_t[:-1] > 0) + 1


def _perturb(input_ids: np.ndarray, loss_mask: np.ndarray, rows_at: np.ndarray,
             train_rows: TokenizedSet, rng: np.random.Generator, noise: float) -> None:
    """Replace ``round(noise * m)`` scored tokens of each row in ``rows_at`` (in place)."""
    if not 0.0 <= noise <= 1.0:
        raise ConfigError(f"noise={noise} must lie in [0, 1]")
    tgt = train_rows.input_ids[:, 1:][train_rows.loss_mask[:, :-1] > 0]
    vocab, counts = np.unique(tgt, return_counts=True)
    if vocab.size < 2:
        raise ConfigError("the training rows hold fewer than 2 distinct tokens; cannot add noise")
    p = counts / counts.sum()
    for r in rows_at:
        pos = _scored_positions(loss_mask[r])
        m = int(round(noise * pos.size))
        if m == 0:
            continue
        at = rng.choice(pos, m, replace=False)
        new = rng.choice(vocab, m, p=p)
        same = new == input_ids[r, at]
        while same.any():                       # a replacement must change the token
            new[same] = rng.choice(vocab, int(same.sum()), p=p)
            same = new == input_ids[r, at]
        input_ids[r, at] = new


# ----------------------------------------------------------------------------------------------
# Ranking helpers (ties: expectation under a uniformly random order of tied values)
# ----------------------------------------------------------------------------------------------
def _check_scores(scores_qn) -> np.ndarray:
    s = np.asarray(scores_qn, np.float64)
    if s.ndim != 2:
        raise DataError(f"scores must be [queries, examples]; got shape {s.shape}")
    if not np.isfinite(s).all():
        raise DataError("scores hold NaN or inf values")
    return s


def _check_map(replica_map: ReplicaMap, Q: int, n: int) -> dict[int, np.ndarray]:
    out = {}
    for q, idx in replica_map.items():
        idx = np.unique(np.asarray(idx, np.int64))
        if not 0 <= int(q) < Q:
            raise ConfigError(f"replica_map names query {q}, outside [0, {Q})")
        if idx.size == 0:
            raise ConfigError(f"query {q} has no replicas in replica_map")
        if idx.min() < 0 or idx.max() >= n:
            raise ConfigError(f"replica indices of query {q} must lie in [0, {n})")
        out[int(q)] = idx
    if not out:
        raise ConfigError("replica_map is empty: no leaked query to evaluate")
    return dict(sorted(out.items()))


def _key(s: np.ndarray, by: By) -> np.ndarray:
    if by == "score":
        return s
    if by == "abs":
        return np.abs(s)
    raise ConfigError(f"by={by!r}; use 'score' or 'abs'")


def _top_split(s: np.ndarray, k: int):
    """For the top-``k`` of ``s``: (strictly above the k-th value, tied with it, free slots)."""
    v = np.partition(s, len(s) - k)[len(s) - k]
    above, tied = s > v, s == v
    return above, tied, k - int(above.sum())


def expected_hits(s: np.ndarray, pos: np.ndarray, k: int) -> float:
    """Expected number of positives among the top-``k`` of ``s`` (random order of ties)."""
    k = min(int(k), len(s))
    if k <= 0:
        return 0.0
    above, tied, slots = _top_split(s, k)
    return float(pos[above].sum() + slots * pos[tied].sum() / tied.sum())


def prob_any_hit(s: np.ndarray, pos: np.ndarray, k: int) -> float:
    """Probability that at least one positive is among the top-``k`` of ``s`` (random ties)."""
    k = min(int(k), len(s))
    if k <= 0:
        return 0.0
    above, tied, slots = _top_split(s, k)
    if pos[above].any():
        return 1.0
    t, r = int(tied.sum()), int(pos[tied].sum())
    p_none = 1.0
    for j in range(slots):                  # draw `slots` of the t tied values, none positive
        p_none *= max(t - r - j, 0) / (t - j)
    return 1.0 - p_none


def first_rank(s: np.ndarray, pos: np.ndarray) -> float:
    """Expected rank (1 = top) of the best-ranked positive (random order of ties)."""
    best = s[pos].max()
    ahead = int(((s > best) & ~pos).sum())
    tied_neg, tied_pos = int(((s == best) & ~pos).sum()), int(((s == best) & pos).sum())
    return 1.0 + ahead + tied_neg / (tied_pos + 1.0)


def _chance_any(n: int, r: int, k: int) -> float:
    p_none = 1.0
    for j in range(min(k, n)):
        p_none *= max(n - r - j, 0) / (n - j)
    return 1.0 - p_none


def _by_copies(values: dict[int, float], replica_map: dict[int, np.ndarray]) -> dict[int, float]:
    groups: dict[int, list[float]] = {}
    for q, v in values.items():
        groups.setdefault(len(replica_map[q]), []).append(v)
    return {c: float(np.mean(v)) for c, v in sorted(groups.items())}


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
def replica_recall(scores_qn, replica_map: ReplicaMap, *, by: By = "score") -> dict:
    """Recall of the planted replicas among the top scores (module docstring).

    Returns a dict: ``per_query`` (``{q: recall}`` over leaked queries, recall = replicas among
    the top-``R_q`` / ``R_q``), ``mean`` (over leaked queries), ``by_copies`` (mean per ``R_q``),
    ``pooled`` (replica pairs among the top-``T`` of all ``Q x n`` scores / ``T``), and the chance
    levels ``chance_mean`` (mean of ``R_q / n``) and ``chance_pooled`` (``T / (Q n)``).
    """
    s = _key(_check_scores(scores_qn), by)
    Q, n = s.shape
    rmap = _check_map(replica_map, Q, n)
    per = {}
    pos_all = np.zeros((Q, n), bool)
    for q, idx in rmap.items():
        pos = np.zeros(n, bool)
        pos[idx] = True
        pos_all[q] = pos
        per[q] = expected_hits(s[q], pos, len(idx)) / len(idx)
    T = int(pos_all.sum())
    return {"per_query": per, "mean": float(np.mean(list(per.values()))),
            "by_copies": _by_copies(per, rmap),
            "pooled": expected_hits(s.ravel(), pos_all.ravel(), T) / T,
            "chance_mean": float(np.mean([len(i) / n for i in rmap.values()])),
            "chance_pooled": T / (Q * n)}


def hit_at_k(scores_qn, replica_map: ReplicaMap, k: int = 10, *, by: By = "score") -> dict:
    """Retrieval of an exact replica: is one among the query's top-``k`` scores?

    Returns a dict: ``per_query`` (``{q: P(a replica is in the top-k)}``), ``mean``,
    ``by_copies``, ``first_rank`` (``{q: expected rank of the best replica}``),
    ``median_first_rank``, ``mrr`` (mean of 1 / first rank) and ``chance`` (mean over leaked
    queries of ``1 - C(n - R_q, k) / C(n, k)``).
    """
    if k < 1:
        raise ConfigError(f"k={k} must be >= 1")
    s = _key(_check_scores(scores_qn), by)
    Q, n = s.shape
    rmap = _check_map(replica_map, Q, n)
    per, ranks = {}, {}
    for q, idx in rmap.items():
        pos = np.zeros(n, bool)
        pos[idx] = True
        per[q] = prob_any_hit(s[q], pos, k)
        ranks[q] = first_rank(s[q], pos)
    r = np.array(list(ranks.values()))
    return {"k": int(k), "per_query": per, "mean": float(np.mean(list(per.values()))),
            "by_copies": _by_copies(per, rmap), "first_rank": ranks,
            "median_first_rank": float(np.median(r)), "mrr": float(np.mean(1.0 / r)),
            "chance": float(np.mean([_chance_any(n, len(i), k) for i in rmap.values()]))}


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ascending ranks of a 1-D array, tied values sharing their average rank."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + 1 + ends) / 2.0
    out = np.empty(len(x), np.float64)
    out[order] = avg[np.cumsum(new) - 1]
    return out


def _labels(labels) -> np.ndarray:
    y = np.asarray(labels)
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ConfigError("labels must be boolean or 0/1")
        y = y.astype(bool)
    return y


def roc_auc(labels, score) -> float:
    """ROC-AUC = P(score of a positive > score of a negative) + P(tie) / 2 (Mann-Whitney U).

    ``nan`` when there are no positives or no negatives.
    """
    y, s = _labels(labels), np.asarray(score, np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ConfigError(f"labels {y.shape} and scores {s.shape} must be equal-length vectors")
    P, N = int(y.sum()), int((~y).sum())
    if P == 0 or N == 0:
        return float("nan")
    r = _midranks(s)
    return float((r[y].sum() - P * (P + 1) / 2.0) / (P * N))


def average_precision(labels, score) -> float:
    """PR-AUC as average precision: ``sum_t (R_t - R_{t-1}) P_t`` over the distinct thresholds
    ``t`` in decreasing order (tied scores enter together), as scikit-learn's
    ``average_precision_score``. ``nan`` without positives."""
    y, s = _labels(labels), np.asarray(score, np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ConfigError(f"labels {y.shape} and scores {s.shape} must be equal-length vectors")
    P = int(y.sum())
    if P == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    ys, ss = y[order], s[order]
    last = np.r_[ss[1:] != ss[:-1], True]            # last element of each group of ties
    tp = np.cumsum(ys)[last]
    seen = (np.flatnonzero(last) + 1).astype(np.float64)
    precision, recall = tp / seen, tp / P
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def query_statistic(scores_qn, stat: str = "max_z") -> np.ndarray:
    """Per-query evidence of a leak ``[Q]``: ``max`` (largest score) or ``max_z`` (largest
    z-score ``(s_qi - mean_q) / std_q``; 0 for a constant row)."""
    s = _check_scores(scores_qn)
    if stat == "max":
        return s.max(1)
    if stat == "max_z":
        sd = s.std(1)
        z = (s.max(1) - s.mean(1)) / np.where(sd > 0, sd, 1.0)
        return np.where(sd > 0, z, 0.0)
    raise ConfigError(f"unknown detection statistic {stat!r}; use 'max' or 'max_z'")


def detection(scores_qn, leaked_mask, *, stat: str = "max_z") -> dict:
    """Query-level detection of leaked queries from :func:`query_statistic`.

    Returns ``roc_auc``, ``pr_auc`` (average precision), ``stat``, the counts and the chance
    levels (``0.5`` and the leaked fraction).
    """
    y = _labels(leaked_mask)
    v = query_statistic(scores_qn, stat)
    if y.shape != v.shape:
        raise ConfigError(f"leaked_mask has {y.shape[0]} entries for {v.shape[0]} queries")
    return {"stat": stat, "roc_auc": roc_auc(y, v), "pr_auc": average_precision(y, v),
            "num_leaked": int(y.sum()), "num_clean": int((~y).sum()),
            "chance_roc_auc": 0.5, "chance_pr_auc": float(y.mean())}


# ----------------------------------------------------------------------------------------------
# Combination
# ----------------------------------------------------------------------------------------------
def _normalise(s: np.ndarray, how: str) -> np.ndarray:
    if how == "rank":
        return np.stack([_midranks(row) for row in s]) / s.shape[1]
    if how == "zscore":
        sd = s.std(1, keepdims=True)
        return np.where(sd > 0, (s - s.mean(1, keepdims=True)) / np.where(sd > 0, sd, 1.0), 0.0)
    if how == "rrf":
        desc = s.shape[1] + 1 - np.stack([_midranks(row) for row in s])    # 1 = largest
        return 1.0 / (60.0 + desc)
    raise ConfigError(f"unknown combination {how!r}; use 'rank', 'zscore' or 'rrf'")


def combine(scores_list: Sequence[np.ndarray], how: str = "rank",
            weights: Sequence[float] | None = None) -> np.ndarray:
    """Mix several methods' ``[Q, n]`` scores into one (module docstring), ``[Q, n]`` float64.

    Each method's scores are normalised per query (``rank``: average rank / n, tied scores
    sharing their rank; ``zscore``: (s - mean) / std, 0 for a constant row; ``rrf``:
    1 / (60 + descending rank)), then summed with ``weights`` (default: all 1).
    """
    if not scores_list:
        raise ConfigError("nothing to combine")
    mats = [_check_scores(s) for s in scores_list]
    if any(m.shape != mats[0].shape for m in mats):
        raise DataError(f"scores to combine differ in shape: {[m.shape for m in mats]}")
    w = np.ones(len(mats)) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (len(mats),):
        raise ConfigError(f"{len(w)} weights for {len(mats)} score matrices")
    return sum(wi * _normalise(m, how) for wi, m in zip(w, mats))


# ----------------------------------------------------------------------------------------------
# All metrics of one score matrix, and a table
# ----------------------------------------------------------------------------------------------
def audit_scores(scores_qn, replica_map: ReplicaMap, leaked_mask, *, k: int = 10,
                 stat: str = "max_z", by: By = "score") -> dict:
    """(i) replica recall, (ii) detection and (iii) hit@k of one score matrix, JSON-ready."""
    rec = replica_recall(scores_qn, replica_map, by=by)
    hit = hit_at_k(scores_qn, replica_map, k, by=by)
    det = detection(scores_qn, leaked_mask, stat=stat)

    def keys_str(d):
        return {str(a): b for a, b in d.items()}

    return {
        "recall": rec["mean"], "recall_pooled": rec["pooled"],
        "recall_by_copies": keys_str(rec["by_copies"]),
        f"hit@{k}": hit["mean"], f"hit@{k}_by_copies": keys_str(hit["by_copies"]),
        "median_first_rank": hit["median_first_rank"], "mrr": hit["mrr"],
        "roc_auc": det["roc_auc"], "pr_auc": det["pr_auc"],
        "per_query": {str(q): {"recall": rec["per_query"][q], "hit": hit["per_query"][q],
                               "first_rank": hit["first_rank"][q]} for q in rec["per_query"]},
        "chance": {"recall": rec["chance_mean"], "recall_pooled": rec["chance_pooled"],
                   f"hit@{k}": hit["chance"], "roc_auc": 0.5, "pr_auc": det["chance_pr_auc"]},
    }


def format_table(rows: Sequence[dict], *, k: int = 10, copies: Sequence[int] = ()) -> str:
    """A plain-text table of :func:`audit_scores` results, one row per ``{"method": ..., **r}``
    (missing values print as ``-``; e.g. a row ``{"method": "chance", **chance}``), with one
    hit@k column per copy count in ``copies``."""
    cols = ["method", "recall", "pooled", f"hit@{k}"] + [f"hit@{k}|{c}x" for c in copies] + \
        ["MRR", "ROC-AUC", "PR-AUC", "sec"]

    def fmt(v, digits=3):
        if v is None or (isinstance(v, float) and v != v):
            return "-"
        if isinstance(v, str):
            return v
        return f"{v:.{digits}f}" if abs(v) < 100 else f"{v:.0f}"

    lines = []
    for r in rows:
        by = r.get(f"hit@{k}_by_copies", {})
        vals = [r["method"], fmt(r.get("recall")), fmt(r.get("recall_pooled")),
                fmt(r.get(f"hit@{k}"))] + [fmt(by.get(str(c))) for c in copies] + \
            [fmt(r.get("mrr")), fmt(r.get("roc_auc")), fmt(r.get("pr_auc")),
             fmt(r.get("seconds"), 1)]
        lines.append(vals)
    widths = [max(len(c), *(len(v[i]) for v in lines)) for i, c in enumerate(cols)]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                     enumerate(zip(cols, widths))),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in
                      enumerate(zip(vals, widths))) for vals in lines]
    return "\n".join(out)
