"""Measurement: the response of every query to every subset's operator.

.. math::  y[q, k] = \\mathcal{L}_{\\text{base}}(q) - \\mathcal{L}_k(q)
           = \\frac{1}{|T_q|} \\sum_{t \\in T_q} \\big(\\log p_k(x_{t+1}) - \\log p(x_{t+1})\\big)

the query's mean per-token loss change over its scored tokens ``T_q`` (completion tokens only when
the query has a prompt). Positive: subset k's operator lowers the query's loss. The base model
runs once per query batch; the K operators are then applied to the cached activations in chunks
of subsets. For the ``logits`` and ``final_hidden`` sites the per-token change is computed in the
closed form of :func:`stride_jax.steering.delta_logprob_and_kl`, exact for tiny responses. Every
query's row is computed independently, so results do not depend on the query batch size.

That mean is the default *measurement*; a :class:`Measurement` (a margin, a completion's sequence
log-probability, ...) replaces it at the ``logits`` and ``final_hidden`` sites, with the contract
in :mod:`stride_jax.measure._measurement`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax.config import check_ranges, option
from stride_jax.data import TokenizedSet
from stride_jax.errors import ConfigError, DataError
from stride_jax.measure._measurement import (Measurement, MeasureInputs, as_measurement,
                                             mean_logprob_change, sum_logprob_change)
from stride_jax.steering import LMFunctions, basis_features, delta_logprob, logit_shift, shift
from stride_jax.train import Rows, check_rows_fit, responses
from stride_jax.parallel import to_host

if TYPE_CHECKING:
    from stride_jax.parallel import SubsetMesh


@dataclasses.dataclass(frozen=True)
class MeasureConfig:
    """Batching of the measurement (does not change the result)."""

    query_batch: int = option(16, "queries per base-model forward pass")
    subset_chunk: int = option(64, "operators applied at once")

    def __post_init__(self) -> None:
        check_ranges(self, {"query_batch": ">= 1", "subset_chunk": ">= 1"})


class Responses(NamedTuple):
    y_qk: np.ndarray          # [Q, K] float32
    base_loss_q: np.ndarray   # [Q] mean per-token loss of the base model
    y_qtk: np.ndarray | None = None        # [Q, T, K] per-position responses (per_token=True)
    base_logprob_qt: np.ndarray | None = None   # [Q, T] base log-prob of each target


def measure_responses(lm: LMFunctions, site: str, basis: dict, coef_krc: jax.Array,
                      queries: TokenizedSet, cfg: MeasureConfig = MeasureConfig(), *,
                      progress: bool = False, mesh: "SubsetMesh | None" = None,
                      per_token: bool = False, compiled_memory: dict | None = None,
                      measurement: Measurement | Callable | None = None) -> Responses:
    """``y[q, k]`` for every query and subset (see the module docstring).

    ``measurement`` replaces the mean per-token log-probability change by the user's own
    response (a :class:`Measurement`; ``logits`` and ``final_hidden`` sites only, not with
    ``per_token``); see :mod:`stride_jax.measure._measurement`.

    With a ``mesh`` each chunk of ``subset_chunk`` operators is split over the devices (the
    query batch's activations are replicated), so ``subset_chunk`` must be a multiple of the
    device count. ``per_token=True`` also returns ``y_qtk`` [Q, T, K], the per-position change
    of the target log-probability (0 at unscored positions), whose masked mean over ``t`` is
    ``y_qk``; it costs Q x T x K floats of host memory, so use it for a few queries.
    """
    measurement = as_measurement(measurement)
    if measurement is not None and (site == "residual" or per_token):
        raise ConfigError("a custom measurement needs the logits or final_hidden site and no "
                          "per-token responses (the residual site and tokens.json use the "
                          "default mean log-probability change)")
    check_rows_fit(lm, queries, "query")
    counts = queries.loss_mask.sum(1)
    if len(queries) == 0:
        raise DataError("no queries to measure")
    if (counts == 0).any():
        bad = queries.ids[int(np.flatnonzero(counts == 0)[0])]
        raise DataError(f"query {bad!r} has no scored token (empty completion?); give it a "
                        f"non-empty text/completion")
    if cfg.query_batch < 1 or cfg.subset_chunk < 1:
        raise ConfigError("measure.query_batch and measure.subset_chunk must be >= 1")
    K = coef_krc.shape[0]
    Q, T = queries.input_ids.shape
    cfg = dataclasses.replace(cfg, query_batch=min(cfg.query_batch, Q))
    S = min(cfg.subset_chunk, K)
    if mesh is not None:
        mesh.check_divides(**{"measure.subset_chunk (or K when smaller)": S})
    n_chunks = -(-K // S)
    coef_pad = jnp.concatenate([coef_krc, jnp.zeros((n_chunks * S - K,) + coef_krc.shape[1:],
                                                    coef_krc.dtype)])
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (cfg.query_batch, T))

    @jax.jit
    def base(ids, mask, targets, loss_mask):
        reader, final = lm.features(lm.params, ids, mask)
        rows = Rows(reader, final, targets, loss_mask, pos, ids, mask)
        logp = jax.nn.log_softmax(lm.head(lm.params, final).astype(jnp.float32), axis=-1)
        tgt = jnp.take_along_axis(logp, rows.target[..., None], axis=-1)[..., 0]
        base_loss = -jnp.sum(tgt * loss_mask, 1) / jnp.maximum(loss_mask.sum(1), 1.0)
        return rows, logp, base_loss, tgt * loss_mask

    @jax.jit
    def chunk_response(rows: Rows, logp, coef_src):
        w = rows.valid
        feats = basis_features(basis, rows.reader)

        def one(coef_rc):
            if site == "residual":
                dlogp, _ = responses(lm, site, basis, coef_rc, rows, logp, feats)
            else:
                delta = logit_shift(lm, site, shift(feats, coef_rc))
                dlogp = delta_logprob(logp, delta, rows.target)
            if measurement is not None:
                y_b = jax.vmap(lambda *a: measurement(MeasureInputs(*a)))(
                    dlogp, w, rows.target, logp, delta)
                return y_b.astype(jnp.float32).reshape(dlogp.shape[0]), None
            mean = jnp.sum(dlogp * w, 1) / jnp.maximum(w.sum(1), 1.0)
            return (mean, dlogp * w) if per_token else (mean, None)

        return jax.vmap(one, out_axes=(1, 2))(coef_src)   # [B, S], [B, T, S]

    targets = queries.target_ids()
    y = np.zeros((Q, K), np.float32)
    base_loss = np.zeros((Q,), np.float32)
    y_tok = np.zeros((Q, T, K), np.float32) if per_token else None
    base_lp = np.zeros((Q, T), np.float32) if per_token else None
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=-(-Q // cfg.query_batch) * n_chunks, desc="measure", unit="chunk",
                   dynamic_ncols=True)
    for start in range(0, Q, cfg.query_batch):
        stop = min(start + cfg.query_batch, Q)
        idx = np.arange(start, start + cfg.query_batch) % Q   # fixed shape: wrap the last batch
        rows, logp, bl, blp = base(jnp.asarray(queries.input_ids[idx]),
                              jnp.asarray(queries.attention_mask[idx]),
                              jnp.asarray(targets[idx]),
                              jnp.asarray(queries.loss_mask[idx], jnp.float32))
        base_loss[start:stop] = to_host(bl)[: stop - start]
        if per_token:
            base_lp[start:stop] = to_host(blp)[: stop - start]
        for c in range(n_chunks):
            coef_c = coef_pad[c * S:(c + 1) * S]
            if mesh is not None:
                coef_c = mesh.shard(coef_c)
            if compiled_memory is not None and start == 0 and c == 0:
                from stride_jax.train._train import _memory_analysis
                compiled_memory.update(_memory_analysis(chunk_response, rows, logp, coef_c))
            out, out_tok = chunk_response(rows, logp, coef_c)
            lo, hi = c * S, min((c + 1) * S, K)
            y[start:stop, lo:hi] = to_host(out)[: stop - start, : hi - lo]
            if per_token:
                y_tok[start:stop, :, lo:hi] = to_host(out_tok)[: stop - start, :, : hi - lo]
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return Responses(y, base_loss, y_tok, base_lp)


def implausible_base_loss(base_loss_q: np.ndarray, vocab_size: int, *,
                          ratio: float = 0.9) -> str | None:
    """A warning when the base model barely predicts the queries, else None.

    A model that knows nothing scores ``ln V`` nats per token (a uniform guess over its ``V``-token
    vocabulary). A mean base loss of at least ``ratio * ln V`` means the model does not model the
    queries: a tokenizer from another model (its ids mean other tokens to this one), or text
    far from what the model was trained on. Attribution of a loss the model cannot lower is
    noise, so this is worth a warning even when every file is well formed.
    """
    loss = float(np.mean(base_loss_q))
    uniform = float(np.log(max(vocab_size, 2)))
    if not loss >= ratio * uniform:
        return None
    return (f"the base model's mean loss on the queries is {loss:.2f} nats per token, "
            f"{'above' if loss > uniform else 'close to'} ln(V) = {uniform:.2f} of a uniform guess "
            f"over its {vocab_size}-token vocabulary: the model barely predicts these queries. "
            f"Check that the tokenizer is the model's own and that the queries are text like "
            f"its training data; attribution of a loss the model cannot lower is noise")


__all__ = ["MeasureConfig", "MeasureInputs", "Measurement", "Responses", "as_measurement",
           "implausible_base_loss", "mean_logprob_change", "measure_responses",
           "sum_logprob_change"]
