"""Joint training of the steering operators with the base model frozen.

Objective (averaged over the subsets ``k`` of a step's chunk):

.. math::
    \\mathcal{L} = \\frac{1}{|S|}\\sum_{k \\in S} \\Big[ w_f\\, \\underbrace{\\mathbb{E}_{i \\in k,\\,t}
        \\big(-\\Delta_k \\log p(x_{i,t+1})\\big)}_{\\text{fidelity}}
      + w_s\\, \\underbrace{\\mathbb{E}_{j \\notin k,\\,t}\\, \\mathrm{KL}(p \\,\\|\\, p_k)}_{\\text{stability}}
      \\Big] + w_l\\, \\mathcal{L}_{\\text{lin}}

* fidelity: the steered model's cross-entropy on the subset's own rows, written as the change
  from the base cross-entropy (a constant), so its value reads directly as "nats gained";
* stability: KL(base || steered) on rows outside the subset, which stops an operator from learning
  a global, subset-independent shift (the prototype's LDS fell from .44 to .03 without it);
* linearity: on a fixed probe batch, the chunk's responses ``y[p, k]`` should be explained by an
  additive model over examples; with the design sketched by a random projection ``Ms = (M R)[S]``
  the penalty is the normalised ridge residual ``||(I - P) y_p||^2 / ||y_p - mean||^2``,
  ``P = Ms (Ms^T Ms + gamma I)^-1 Ms^T``. Off by default (neutral or harmful in the prototype).

Each step visits a chunk of subsets; an *epoch* visits every subset once (a permutation of the K
subsets per epoch, ``fold_in(key, epoch)``). Per step and subset, ``rows_per_subset`` member rows
are drawn with ``fold_in(fold_in(key, step), subset_id)``, so samples do not depend on the chunk
size or the device count. The basis is updated by Adam every step; each subset's coefficients by
a per-subset ("lazy") Adam only when the subset is visited, so an operator's trajectory depends
only on its own visits. Scored positions are subsampled (``tokens_per_row``) because the cost is
dominated by the vocabulary-sized softmax at every (subset, row, position).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stride_jax.config import check_ranges, option
from stride_jax.data import TokenizedSet
from stride_jax.errors import ConfigError, DataError, NonFiniteOperatorLossError
from stride_jax.steering import (LMFunctions, SteeringConfig, basis_features,
                                 delta_logprob_and_kl, init_steering, logit_shift, shift)
from stride_jax.train._cache import ActivationCache

if TYPE_CHECKING:
    from stride_jax.parallel import SubsetMesh

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OperatorTrainConfig:
    """How the operators are trained (see the module docstring for the objective)."""

    epochs: int = option(20, "visits per subset")
    subsets_per_step: int = option(64, "subsets whose operators are updated per step")
    rows_per_subset: int = option(8, "member rows drawn per subset per step (fidelity)")
    stability_rows: int = option(8, "rows drawn per step for the stability loss, shared by the "
                                     "step's subsets (a subset's own members are masked out)")
    tokens_per_row: int = option(16, "scored positions sampled per row (0: all positions)")
    learning_rate: float = option(1e-2, "Adam learning rate of the per-subset coefficients")
    basis_learning_rate: float = option(1e-3, "Adam learning rate of the shared basis")
    b1: float = option(0.9, "Adam beta1")
    b2: float = option(0.99, "Adam beta2")
    eps: float = option(1e-8, "Adam epsilon")
    weight_fidelity: float = option(1.0, "weight of the fidelity loss")
    weight_stability: float = option(3.0, "weight of the stability loss (essential; 3 measured "
                                          "best of 0.3/1/3/10)")
    weight_linearity: float = option(0.0, "weight of the linearity loss (0: off)")
    linearity_probe_rows: int = option(16, "probe rows of the linearity loss")
    linearity_sketch_dim: int = option(64, "random-projection dimension q of the design sketch")
    linearity_ridge: float = option(1e-2, "ridge gamma of the linearity projection")
    max_loss: float = option(1e4, "stop when the step loss (nats) exceeds this: training has "
                                  "diverged even if the loss is still finite")
    checkpoint_every: int = option(100, "steps between operator checkpoints (0: only at the end)")
    log_every: int = option(10, "steps between logged loss values")

    def __post_init__(self) -> None:
        check_ranges(self, {
            "epochs": ">= 1", "subsets_per_step": ">= 1", "rows_per_subset": ">= 1",
            "stability_rows": ">= 1", "tokens_per_row": ">= 0", "learning_rate": "> 0",
            "basis_learning_rate": "> 0", "b1": "in [0, 1)", "b2": "in [0, 1)", "eps": "> 0",
            "weight_fidelity": ">= 0", "weight_stability": ">= 0", "weight_linearity": ">= 0",
            "linearity_probe_rows": ">= 1", "linearity_sketch_dim": ">= 1",
            "linearity_ridge": "> 0", "max_loss": "> 0", "checkpoint_every": ">= 0",
            "log_every": ">= 1"},
            fixes={"tokens_per_row": "0 scores all positions",
                   "checkpoint_every": "0 checkpoints only at the end"})


class OperatorState(NamedTuple):
    """Everything training updates; a plain pytree (checkpointed by orbax)."""

    basis: dict
    coef: jax.Array          # [K, r, C]
    basis_opt: Any
    coef_m: jax.Array        # Adam first moment, [K, r, C]
    coef_v: jax.Array        # Adam second moment, [K, r, C]
    coef_count: jax.Array    # Adam step count per subset, [K]
    step: jax.Array          # scalar int32


def validate(cfg: OperatorTrainConfig) -> None:
    """Check ``cfg`` (the checks run when a config is made; kept for callers)."""
    cfg.__post_init__()


# ----------------------------------------------------------------------------------------------
# Schedules and sampling
# ----------------------------------------------------------------------------------------------

def subset_schedule(num_subsets: int, chunk: int, epochs: int, *, key: jax.Array) -> np.ndarray:
    """``[steps, chunk]`` subset ids; each epoch is a permutation of all subsets.

    The last chunk of an epoch is topped up from the start of the same permutation, so no chunk
    repeats a subset (the per-subset optimiser update is a scatter).
    """
    chunk = min(chunk, num_subsets)
    per_epoch = math.ceil(num_subsets / chunk)
    out = []
    for e in range(epochs):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, e), num_subsets))
        padded = np.concatenate([perm, perm[: per_epoch * chunk - num_subsets]])
        out.append(padded.reshape(per_epoch, chunk))
    return np.concatenate(out).astype(np.int32)


def padded_members(design) -> tuple[np.ndarray, np.ndarray]:
    """``members [K, max_size]`` (padded with -1) and ``sizes [K]`` of a design."""
    sizes = np.diff(design.indptr).astype(np.int32)
    if (sizes == 0).any():
        k = int(np.flatnonzero(sizes == 0)[0])
        raise ConfigError(f"subset {k} of the design is empty; lower K or raise d")
    members = np.full((design.num_subsets, int(sizes.max())), -1, np.int32)
    for k in range(design.num_subsets):
        m = design.cols[design.indptr[k]:design.indptr[k + 1]]
        members[k, : len(m)] = m
    return members, sizes


def _sample_positions(key, loss_mask_rt: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """``count`` distinct scored positions per row (fewer valid ones when a row has fewer)."""
    noise = jax.random.uniform(key, loss_mask_rt.shape)
    noise = jnp.where(loss_mask_rt > 0, noise, -1.0)
    vals, pos = jax.lax.top_k(noise, count)
    return pos.astype(jnp.int32), (vals >= 0).astype(jnp.float32)


class Indices(NamedTuple):
    fid_rows: jax.Array      # [S, b]
    fid_pos: jax.Array       # [S, b, T']
    fid_valid: jax.Array     # [S, b, T']
    stab_rows: jax.Array     # [Bs]
    stab_pos: jax.Array      # [Bs, T']
    stab_valid: jax.Array    # [Bs, T']
    stab_member: jax.Array   # [S, Bs]: row j is a member of subset s (masked out of stability)


def make_sampler(members: np.ndarray, sizes: np.ndarray, loss_mask: np.ndarray,
                 cfg: OperatorTrainConfig, *, key: jax.Array):
    """A jitted ``(step, chunk_ids) -> Indices``; per-subset draws use ``fold_in(step_key, k)``."""
    members_d, sizes_d = jnp.asarray(members), jnp.asarray(sizes)
    mask_d = jnp.asarray(loss_mask)
    n, seq = loss_mask.shape
    tokens = seq if cfg.tokens_per_row <= 0 else min(cfg.tokens_per_row, seq)
    b, bs = cfg.rows_per_subset, cfg.stability_rows

    key_fid, key_stab = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)

    @jax.jit
    def sample(step, chunk_ids):
        step_key = jax.random.fold_in(key_fid, step)

        def one(k):
            kk = jax.random.fold_in(step_key, k)
            slots = jax.random.randint(jax.random.fold_in(kk, 0), (b,), 0, sizes_d[k])
            rows = members_d[k, slots]
            pos, valid = _sample_positions(jax.random.fold_in(kk, 1), mask_d[rows], tokens)
            return rows, pos, valid

        fid_rows, fid_pos, fid_valid = jax.vmap(one)(chunk_ids)
        # Stability rows depend on the step only (one draw, shared by the chunk).
        sk = jax.random.fold_in(key_stab, step)
        stab_rows = jax.random.randint(jax.random.fold_in(sk, 0), (bs,), 0, n)
        stab_pos, stab_valid = _sample_positions(jax.random.fold_in(sk, 1), mask_d[stab_rows], tokens)
        stab_member = jnp.any(members_d[chunk_ids][:, :, None] == stab_rows[None, None, :], axis=1)
        return Indices(fid_rows, fid_pos, fid_valid, stab_rows, stab_pos, stab_valid,
                       stab_member.astype(jnp.float32))

    return sample


# ----------------------------------------------------------------------------------------------
# Per-subset responses at each site
# ----------------------------------------------------------------------------------------------

def _take_positions(x_rtd: jax.Array, pos_rp: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x_rtd, pos_rp[..., None], axis=-2)


class Rows(NamedTuple):
    """Gathered training rows for one group (a subset's fidelity rows, or the stability rows)."""

    reader: jax.Array    # [R, T', D] (linear sites) or [R, T, D] (residual)
    final: jax.Array     # [R, T', d] at the sampled positions
    target: jax.Array    # [R, T']
    valid: jax.Array     # [R, T']
    pos: jax.Array       # [R, T']
    ids: jax.Array       # [R, T] (residual site only; else [R, 0])
    mask: jax.Array      # [R, T] (residual site only; else [R, 0])


def gather_rows(cache: dict[str, jax.Array], data: dict[str, jax.Array], rows, pos, valid,
                site: str) -> Rows:
    """Gather cached activations (and, for the residual site, whole rows) at sampled positions."""
    final = jnp.take(cache["final"], rows, axis=0)
    reader_full = jnp.take(cache["reader"], rows, axis=0)
    target = jnp.take_along_axis(jnp.take(data["targets"], rows, axis=0), pos, axis=-1)
    if site == "residual":
        reader = reader_full
        row_ids = jnp.take(data["input_ids"], rows, axis=0)
        row_mask = jnp.take(data["attention_mask"], rows, axis=0)
    else:
        reader = _take_positions(reader_full, pos)
        row_ids = row_mask = jnp.zeros(rows.shape + (0,), jnp.int32)
    return Rows(reader, _take_positions(final, pos), target, valid, pos, row_ids, row_mask)


def _fast_delta_logprob_and_kl(base_logp, delta, target):
    """Training-time form of :func:`delta_logprob_and_kl`: a max-shifted logsumexp.

    ``log E_p[e^delta] = logsumexp(log p + delta)`` needs no subtraction of two large numbers, so
    its float32 error is ~1e-7 absolute, harmless for a loss (measurement uses the exact form), and
    it costs fewer passes over the vocabulary than the series form.
    """
    delta = delta.astype(jnp.float32)
    lse = jax.nn.logsumexp(base_logp + delta, axis=-1)
    dy = jnp.take_along_axis(delta, target[..., None], axis=-1)[..., 0]
    kl = lse - jnp.sum(jnp.exp(base_logp) * delta, axis=-1)
    return dy - lse, kl


def responses(lm: LMFunctions, site: str, basis: dict, coef_rc: jax.Array, rows: Rows,
              base_logp: jax.Array | None = None, feats: jax.Array | None = None, *,
              exact: bool = True) -> tuple[jax.Array, jax.Array]:
    """Per position: change of the target log-prob and KL(base || steered), each ``[R, T']``.

    ``exact=True`` uses the cancellation-free closed form (measurement); ``exact=False`` a cheaper
    logsumexp form accurate to ~1e-7 absolute (training losses).
    """
    if base_logp is None:
        base_logp = jax.nn.log_softmax(lm.head(lm.params, rows.final).astype(jnp.float32), axis=-1)
    if feats is None:
        feats = basis_features(basis, rows.reader)
    if site in ("logits", "final_hidden"):
        delta = logit_shift(lm, site, shift(feats, coef_rc))
        fn = delta_logprob_and_kl if exact else _fast_delta_logprob_and_kl
        return fn(base_logp, delta, rows.target)
    # residual: add the shift at the reader layer and run the frozen upper layers.
    h = rows.reader.astype(jnp.float32) + shift(feats, coef_rc)
    steered_final = lm.upper(lm.params, h.astype(rows.reader.dtype), rows.ids, rows.mask)
    logits = lm.head(lm.params, _take_positions(steered_final, rows.pos))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    dlogp = (jnp.take_along_axis(logp, rows.target[..., None], axis=-1)[..., 0] -
             jnp.take_along_axis(base_logp, rows.target[..., None], axis=-1)[..., 0])
    kl = jnp.sum(jnp.exp(base_logp) * (base_logp - logp), axis=-1)
    return dlogp, kl


def _weighted_mean(x, w):
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def _place_state(state: OperatorState, mesh: "SubsetMesh") -> OperatorState:
    """Operators and their Adam moments split over the subset axis; the basis replicated."""
    return OperatorState(mesh.replicate(state.basis), mesh.shard(state.coef),
                         mesh.replicate(state.basis_opt), mesh.shard(state.coef_m),
                         mesh.shard(state.coef_v), mesh.shard(state.coef_count),
                         mesh.replicate(state.step))


def _memory_analysis(fn, *args) -> dict:
    """XLA's byte counts for ``fn`` compiled on ``args`` (an extra AOT compile)."""
    m = fn.lower(*args).compile().memory_analysis()
    return {"temp": int(m.temp_size_in_bytes), "argument": int(m.argument_size_in_bytes),
            "output": int(m.output_size_in_bytes)}


class TrainOutput(NamedTuple):
    state: OperatorState
    history: list[dict[str, float]]


def train_operators(lm: LMFunctions, cache: ActivationCache, data: TokenizedSet, design,
                    steering: SteeringConfig, cfg: OperatorTrainConfig, *, key: jax.Array,
                    checkpoint_dir: str | Path | None = None, fingerprint: str = "",
                    progress: bool = True,
                    on_step: Callable[[int], None] | None = None,
                    mesh: "SubsetMesh | None" = None,
                    compiled_memory: dict | None = None, stream: bool = False) -> TrainOutput:
    """Train the basis and all K coefficient matrices; resumable from ``checkpoint_dir``.

    Args:
      lm: the frozen model as functions (:func:`stride_jax.steering.from_causal_lm`).
      cache: reader/final activations of ``data`` (:func:`build_cache`).
      data: the training rows (targets and loss masks).
      design: the subset design (``num_subsets``, ``indptr``, ``cols``).
      key: PRNG key; split into named keys for the init, subset order and row draws.
      checkpoint_dir: orbax checkpoints of :class:`OperatorState`; an existing one made with the
        same ``fingerprint`` is resumed, one made with another is refused.
      on_step: called with the step index after each step (tests use it to interrupt a run).
      mesh: split the subset axis over devices (:mod:`stride_jax.parallel`): each device holds
        ``K / D`` operators with their Adam moments and computes the losses of its share of each
        step's chunk; None (one device) adds no sharding annotations.
      stream: keep the activation cache on the host (e.g. memory-mapped from disk) and send each
        step only its own rows, instead of putting the whole cache on the device; same result.
      compiled_memory: if a dict, filled with XLA's memory analysis of the compiled training step
        (``temp``, ``argument``, ``output`` bytes), which calibrates
        :mod:`stride_jax.parallel.memory`.
    """
    from stride_jax.train._checkpoint import OperatorCheckpointer

    validate(cfg)
    site = steering.site
    if site == "residual" and lm.upper is None:
        raise DataError("the residual site needs the model's upper layers (LMFunctions.upper)")
    if cache.num_rows != len(data):
        raise DataError(f"cache has {cache.num_rows} rows but the training set has {len(data)}")
    if design.num_examples != len(data):
        raise DataError(f"design is over {design.num_examples} examples but the training set has "
                        f"{len(data)} rows")
    k_init, k_order, k_rows, k_probe, k_sketch = (jax.random.fold_in(key, i) for i in range(5))
    K = design.num_subsets
    d_out = lm.vocab_size if site == "logits" else lm.d_final
    params = init_steering(steering, d_reader=lm.d_reader, d_out=d_out, num_subsets=K, key=k_init)
    basis_tx = optax.adam(cfg.basis_learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    state = OperatorState(params["basis"], params["coef"], basis_tx.init(params["basis"]),
                          jnp.zeros_like(params["coef"]), jnp.zeros_like(params["coef"]),
                          jnp.zeros((K,), jnp.int32), jnp.zeros((), jnp.int32))

    members, sizes = padded_members(design)
    schedule = subset_schedule(K, cfg.subsets_per_step, cfg.epochs, key=k_order)
    if mesh is not None:
        mesh.check_divides(**{"design.num_subsets": K,
                              "train.subsets_per_step": int(schedule.shape[1])})
        state = _place_state(state, mesh)
    sampler = make_sampler(members, sizes, data.loss_mask, cfg, key=k_rows)
    targets_h = data.target_ids()
    if stream:
        # Only each step's rows go to the device (gathered on the host, e.g. from a memory-mapped
        # on-disk cache), so device memory does not grow with n.
        cache_d = data_d = None
    else:
        cache_d = {"reader": jnp.asarray(cache.reader), "final": jnp.asarray(cache.final)}
        data_d = {"input_ids": jnp.asarray(data.input_ids),
                  "attention_mask": jnp.asarray(data.attention_mask),
                  "targets": jnp.asarray(targets_h)}
        if mesh is not None:
            cache_d, data_d = mesh.replicate(cache_d), mesh.replicate(data_d)
    by_subset = mesh.constrain if mesh is not None else (lambda x: x)

    # Linearity: a fixed probe batch and the sketched design M R (K x q).
    lin_on = cfg.weight_linearity > 0
    if lin_on:
        q = min(cfg.linearity_sketch_dim, K)
        R = jax.random.normal(k_sketch, (design.num_examples, q)) / math.sqrt(q)
        MR = jax.ops.segment_sum(R[jnp.asarray(design.cols)], jnp.asarray(design.rows),
                                 num_segments=K)
        probe_rows = jax.random.choice(k_probe, design.num_examples,
                                       (min(cfg.linearity_probe_rows, design.num_examples),),
                                       replace=False)
        tokens = data.seq_len if cfg.tokens_per_row <= 0 else min(cfg.tokens_per_row, data.seq_len)
        ppos, pvalid = _sample_positions(jax.random.fold_in(k_probe, 1),
                                         jnp.asarray(data.loss_mask)[probe_rows], tokens)
    else:
        MR = probe_rows = ppos = pvalid = None
    probe_h = None if probe_rows is None else np.asarray(probe_rows)
    if stream and lin_on:
        # The probe rows ride along at the end of every step's gathered batch.
        n_fid = schedule.shape[1] * cfg.rows_per_subset
        probe_rows = jnp.arange(n_fid + cfg.stability_rows,
                                n_fid + cfg.stability_rows + len(probe_h), dtype=jnp.int32)

    def step_rows(idx: Indices):
        """Streaming: gather this step's rows on the host; indices become local positions."""
        fid = np.asarray(idx.fid_rows)
        stab = np.asarray(idx.stab_rows)
        rows = np.concatenate([fid.ravel(), stab] + ([probe_h] if lin_on else []))
        local_c = {"reader": jnp.asarray(cache.reader[rows]),
                   "final": jnp.asarray(cache.final[rows])}
        local_d = {"input_ids": jnp.asarray(data.input_ids[rows]),
                   "attention_mask": jnp.asarray(data.attention_mask[rows]),
                   "targets": jnp.asarray(targets_h[rows])}
        if mesh is not None:
            local_c, local_d = mesh.replicate(local_c), mesh.replicate(local_d)
        idx = idx._replace(
            fid_rows=jnp.arange(fid.size, dtype=jnp.int32).reshape(fid.shape),
            stab_rows=jnp.arange(fid.size, fid.size + stab.size, dtype=jnp.int32))
        return idx, local_c, local_d

    def loss_fn(basis, coef_s, chunk_ids, idx: Indices, cache_d, data_d):
        fid = jax.vmap(lambda r, p, v: gather_rows(cache_d, data_d, r, p, v, site))(
            idx.fid_rows, idx.fid_pos, idx.fid_valid)
        stab = gather_rows(cache_d, data_d, idx.stab_rows, idx.stab_pos, idx.stab_valid, site)
        stab_logp = jax.nn.log_softmax(lm.head(lm.params, stab.final).astype(jnp.float32), axis=-1)
        stab_feats = basis_features(basis, stab.reader)

        def per_subset(coef_rc, fid_rows: Rows, member_j):
            dlogp, _ = responses(lm, site, basis, coef_rc, fid_rows, exact=False)
            fidelity = -_weighted_mean(dlogp, fid_rows.valid)
            _, kl = responses(lm, site, basis, coef_rc, stab, stab_logp, stab_feats, exact=False)
            stability = _weighted_mean(kl, stab.valid * (1.0 - member_j)[:, None])
            return fidelity, stability

        fidelity, stability = jax.vmap(per_subset)(coef_s, fid, idx.stab_member)
        total = cfg.weight_fidelity * fidelity + cfg.weight_stability * stability
        linearity = jnp.zeros(())
        if lin_on:
            probe = gather_rows(cache_d, data_d, probe_rows, ppos, pvalid, site)

            def probe_response(coef_rc):
                dlogp, _ = responses(lm, site, basis, coef_rc, probe, exact=False)
                return jnp.sum(dlogp * probe.valid, -1) / jnp.maximum(probe.valid.sum(-1), 1.0)

            y_ps = jax.vmap(probe_response, out_axes=1)(coef_s)      # [P, S]
            ms = MR[chunk_ids]                                          # [S, q]
            gram = ms.T @ ms + cfg.linearity_ridge * jnp.eye(ms.shape[1])
            fitted = ms @ jnp.linalg.solve(gram, ms.T @ y_ps.T)        # [S, P]
            resid = y_ps.T - fitted
            centred = y_ps.T - y_ps.T.mean(0, keepdims=True)
            linearity = jnp.mean(jnp.sum(resid ** 2, 0) / (jnp.sum(centred ** 2, 0) + 1e-12))
        loss = jnp.mean(total) + cfg.weight_linearity * linearity
        return loss, (fidelity, stability, linearity, total)

    b1, b2, eps, lr = cfg.b1, cfg.b2, cfg.eps, cfg.learning_rate

    # Donating the state lets XLA update the [K, r, C] buffers in place.
    @functools.partial(jax.jit, donate_argnums=(0,))
    def train_step(state: OperatorState, chunk_ids, idx: Indices, cache_d, data_d):
        # With a mesh, each device takes its share of the chunk's subsets (rows, positions and
        # coefficients); the basis gradient is summed across devices by XLA.
        idx = idx._replace(fid_rows=by_subset(idx.fid_rows), fid_pos=by_subset(idx.fid_pos),
                           fid_valid=by_subset(idx.fid_valid),
                           stab_member=by_subset(idx.stab_member))
        coef_s = by_subset(state.coef[chunk_ids])
        (loss, aux), (g_basis, g_coef) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            state.basis, coef_s, chunk_ids, idx, cache_d, data_d)
        upd, basis_opt = basis_tx.update(g_basis, state.basis_opt, state.basis)
        basis = optax.apply_updates(state.basis, upd)
        # Per-subset ("lazy") Adam on the visited coefficients only.
        count = state.coef_count[chunk_ids] + 1
        m = b1 * state.coef_m[chunk_ids] + (1 - b1) * g_coef
        v = b2 * state.coef_v[chunk_ids] + (1 - b2) * g_coef ** 2
        bc1 = (1 - b1 ** count.astype(jnp.float32))[:, None, None]
        bc2 = (1 - b2 ** count.astype(jnp.float32))[:, None, None]
        new_coef = coef_s - lr * (m / bc1) / (jnp.sqrt(v / bc2) + eps)
        state = OperatorState(basis, by_subset(state.coef.at[chunk_ids].set(new_coef)), basis_opt,
                              by_subset(state.coef_m.at[chunk_ids].set(m)),
                              by_subset(state.coef_v.at[chunk_ids].set(v)),
                              by_subset(state.coef_count.at[chunk_ids].set(count)), state.step + 1)
        return state, loss, aux

    ckpt = OperatorCheckpointer(checkpoint_dir, fingerprint) if checkpoint_dir else None
    start = 0
    if ckpt is not None:
        restored = ckpt.restore(state)
        if restored is not None:
            state = restored if mesh is None else _place_state(restored, mesh)
            start = int(state.step)
            log.info("resuming operator training at step %d of %d", start, len(schedule))

    history: list[dict[str, float]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(schedule), initial=start, desc="train operators", unit="step",
                   dynamic_ncols=True)
    t0 = time.perf_counter()
    compile_s = None
    steady_t0, steady_steps = None, 0
    step = start
    try:
        for step in range(start, len(schedule)):
            chunk_ids = jnp.asarray(schedule[step])
            idx = sampler(jnp.int32(step), chunk_ids)
            step_cache, step_data = cache_d, data_d
            if stream:
                idx, step_cache, step_data = step_rows(idx)
            if compiled_memory is not None and step == start:
                compiled_memory.update(_memory_analysis(train_step, state, chunk_ids, idx,
                                                        step_cache, step_data))
            new_state, loss, (fid, stab, lin, total) = train_step(state, chunk_ids, idx, step_cache,
                                                                  step_data)
            loss_f = float(loss)
            if compile_s is None:
                compile_s = time.perf_counter() - t0
                steady_t0 = time.perf_counter()
            else:
                steady_steps += 1
            if not (math.isfinite(loss_f) and abs(loss_f) <= cfg.max_loss):
                per_subset = np.asarray(total)
                bad = np.flatnonzero(~(np.isfinite(per_subset)
                                       & (np.abs(per_subset) <= cfg.max_loss)))
                which = int(schedule[step][bad[0]]) if len(bad) else -1
                where = f" (first bad subset: {which})" if which >= 0 else ""
                what = "is not finite" if not math.isfinite(loss_f) else \
                    f"exceeds train.max_loss={cfg.max_loss:g} (diverged)"
                last = ckpt.latest_step() if ckpt is not None else None
                kept = (f"; the last good checkpoint (after {last} steps) in {checkpoint_dir} is "
                        f"kept" if last is not None else "; no checkpoint was written yet")
                raise NonFiniteOperatorLossError(
                    f"operator training loss {loss_f:g} {what} at step {step + 1} of "
                    f"{len(schedule)}{where}; lower train.learning_rate (now "
                    f"{cfg.learning_rate:g}) and rerun with --overwrite, or check the cached "
                    f"activations for NaN/inf{kept}")
            state = new_state
            done = step + 1
            if ckpt is not None and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
                                     or done == len(schedule)):
                ckpt.save(done, state)
            if step % cfg.log_every == 0 or done == len(schedule):
                rate = (steady_steps * schedule.shape[1] / (time.perf_counter() - steady_t0)
                        if steady_steps else 0.0)
                point = {"step": step, "loss": loss_f, "fidelity": float(jnp.mean(fid)),
                         "stability": float(jnp.mean(stab)), "linearity": float(lin),
                         "subsets_per_s": rate, "compile_s": compile_s}
                history.append(point)
                if bar is not None:
                    bar.set_postfix(fid=f"{point['fidelity']:.4f}",
                                    stab=f"{point['stability']:.4f}",
                                    lin=f"{point['linearity']:.3f}", subsets_s=f"{rate:.0f}")
            if bar is not None:
                bar.update(1)
            if on_step is not None:
                on_step(step)
    except KeyboardInterrupt:
        # Ctrl-C: say where training stood and where a rerun picks up (its last checkpoint).
        if bar is not None:
            bar.close()
        last = ckpt.latest_step() if ckpt is not None else None
        if ckpt is not None:
            ckpt.close()
        resume = (f"; a rerun resumes from step {last}, its last checkpoint" if last
                  else "; no checkpoint yet, so a rerun starts training again")
        raise KeyboardInterrupt(f"at operator training step {step + 1} of {len(schedule)}"
                                f"{resume}") from None
    if bar is not None:
        bar.close()
    if ckpt is not None:
        ckpt.close()
    return TrainOutput(state, history)
