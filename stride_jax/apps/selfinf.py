"""Self-influence (memorisation) of each training example, from the trained operators.

Feldman and Zhang's memorisation estimate of example ``i`` is the gain in performance on ``i``
of models trained on random subsets that contain ``i`` over those that do not. STRIDE's
operators are exactly such subset-trained surrogates, so, with ``y[i, k]`` the response of row
``i`` itself (its mean per-token log-probability gain under operator ``k``):

.. math::
    \\mathrm{mem}(i) = \\frac{1}{|K_i|} \\sum_{k \\in K_i} y[i, k]
                     - \\frac{1}{|R_i|} \\sum_{k \\in R_i} y[i, k]

where ``K_i`` are the ``d`` subsets holding ``i`` and ``R_i`` is a random sample of subsets that
do not (``num_outside``, default ``d``, drawn with ``fold_in(key, i)``). A large value means the
operators learned something specific to ``i`` (a memorised or atypical example; duplicates of
it elsewhere in the data lower it). Cost: ``|K_i| + |R_i|`` operator applications per row instead
of ``K``, i.e. about ``2 d / K`` of measuring every row as a query.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax.data import TokenizedSet
from stride_jax.errors import DataError
from stride_jax.steering import LMFunctions
from stride_jax.subsets import Design
from stride_jax.train import Rows, check_rows_fit, responses

__all__ = ["SelfInfluence", "self_influence"]


class SelfInfluence(NamedTuple):
    score_n: np.ndarray      # [n] mem(i) in nats per token; higher = more memorised
    inside_n: np.ndarray     # [n] mean response over the subsets holding i
    outside_n: np.ndarray    # [n] mean response over the sampled subsets without i


def _operator_sets(design: Design, m_out: int, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Per example, ``d_max`` member subsets then ``m_out`` non-member ones, and a weight mask."""
    n, K = design.num_examples, design.num_subsets
    inside = [design.subsets_of(i) for i in range(n)]
    d_max = max(len(s) for s in inside)
    ids = np.zeros((n, d_max + m_out), np.int32)
    kind = np.zeros((n, d_max + m_out), np.int8)      # 1 inside, -1 outside, 0 padding
    for i, s in enumerate(inside):
        ids[i, :len(s)] = s
        kind[i, :len(s)] = 1
        pool = np.setdiff1d(np.arange(K), s)
        take = min(m_out, len(pool))
        pick = np.asarray(jax.random.choice(jax.random.fold_in(key, i), len(pool), (take,),
                                            replace=False))
        ids[i, d_max:d_max + take] = pool[pick]
        kind[i, d_max:d_max + take] = -1
    return ids, kind


def self_influence(lm: LMFunctions, site: str, basis: dict, coef_krc: jax.Array, design: Design,
                   rows: TokenizedSet, *, key: jax.Array, num_outside: int | None = None,
                   batch: int = 8, progress: bool = False) -> SelfInfluence:
    """mem(i) for every training row (see the module docstring)."""
    n = len(rows)
    if design.num_examples != n:
        raise DataError(f"the design is over {design.num_examples} examples but {n} training "
                        f"rows were given; pass the rows the operators were trained on")
    if coef_krc.shape[0] != design.num_subsets:
        raise DataError(f"{coef_krc.shape[0]} operators for a design of {design.num_subsets} "
                        f"subsets")
    check_rows_fit(lm, rows, "training")
    counts = design.example_counts
    m_out = int(num_outside) if num_outside is not None else int(counts.max())
    if m_out < 1 or m_out > design.num_subsets - int(counts.max()):
        raise DataError(f"num_outside={m_out} must lie in [1, K - d] = "
                        f"[1, {design.num_subsets - int(counts.max())}]")
    ids_nm, kind_nm = _operator_sets(design, m_out, key)
    T = rows.seq_len
    batch = max(1, min(batch, n))
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (1, T))
    targets = rows.target_ids()

    @jax.jit
    def run(ids, mask, tgt, loss_mask, op_ids):
        def one_row(ids_t, mask_t, tgt_t, lm_t, ops_m):
            reader, final = lm.features(lm.params, ids_t[None], mask_t[None])
            r = Rows(reader, final, tgt_t[None], lm_t[None], pos, ids_t[None], mask_t[None])
            logp = jax.nn.log_softmax(lm.head(lm.params, final).astype(jnp.float32), axis=-1)

            def resp(k):
                dlogp, _ = responses(lm, site, basis, coef_krc[k], r, logp)
                return jnp.sum(dlogp[0] * lm_t) / jnp.maximum(lm_t.sum(), 1.0)

            return jax.vmap(resp)(ops_m)

        return jax.vmap(one_row)(ids, mask, tgt, loss_mask, op_ids)   # [B, m]

    y_nm = np.zeros(ids_nm.shape, np.float32)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc="self-influence", unit="row", dynamic_ncols=True)
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        idx = np.arange(start, start + batch) % n       # fixed shape: wrap the last batch
        out = run(jnp.asarray(rows.input_ids[idx]), jnp.asarray(rows.attention_mask[idx]),
                  jnp.asarray(targets[idx]), jnp.asarray(rows.loss_mask[idx], jnp.float32),
                  jnp.asarray(ids_nm[idx]))
        y_nm[start:stop] = np.asarray(out)[: stop - start]
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    inside = np.where(kind_nm == 1, y_nm, 0).sum(1) / np.maximum((kind_nm == 1).sum(1), 1)
    outside = np.where(kind_nm == -1, y_nm, 0).sum(1) / np.maximum((kind_nm == -1).sum(1), 1)
    return SelfInfluence((inside - outside).astype(np.float32), inside.astype(np.float32),
                         outside.astype(np.float32))
