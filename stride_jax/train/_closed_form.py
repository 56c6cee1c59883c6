"""STRIDE operators fitted in closed form, and the exact limit of their decoding.

The trained operators of :mod:`._train` are noisy: two trainings with different keys give
responses correlated only 0.6-0.75, and with ``K < n`` subsets the regression that decodes them
has fewer equations than unknowns. This module removes both limits by fitting every operator in
closed form and decoding exactly.

**One operator, one Newton step.** Operator ``k`` shifts the frozen model at its site by
``Delta_t = phi_t a_k`` with ``phi_t`` the RMS-normed reader activation (the identity basis,
``r = D``) and ``a_k`` a ``D x C`` matrix (``C = V`` at the ``logits`` site, ``C = d`` at
``final_hidden``). The logits are affine in ``a_k``, so the fidelity and stability losses of
:mod:`._train` are convex in ``a_k``; at ``a = 0`` the stability loss has zero gradient and both
have the Gauss-Newton (Fisher) curvature ``F = E_t[phi_t phi_t^T (x) Sigma_t]``, ``Sigma_t`` the
Fisher of the site (``diag p_t - p_t p_t^T`` at the logits, ``U^T (diag p_t - p_t p_t^T) U`` at
the final hidden state, ``U`` the unembedding). One Newton step from zero on subset ``k``'s
fidelity loss is ``a_k = -(w_f + w_s)^-1 F^-1 gbar_k`` with

.. math::  g_i = \\sum_t w_{i,t}\\, \\phi_{i,t} \\otimes \\partial \\ell_{i,t} / \\partial z_t,
           \\qquad \\bar g_k = \\frac{1}{|S_k|} \\sum_{i \\in S_k} g_i

the gradient of example ``i``'s mean token loss w.r.t. the operator (``w_{i,t}`` = 1 / its scored
tokens; at the logits ``dl/dz = p_t - e_{y_t}``). To first order the query's response is then

.. math::  y_{qk} = L_q(0) - L_q(a_k) \\approx \\frac{1}{|S_k|} \\sum_{i \\in S_k} s_{qi},
           \\qquad s_{qi} = g_q^T P g_i, \\quad P \\propto F^{-1}

exactly additive over the subset's members: the responses are ``y = M_norm s`` with no training
noise, and the regression over ``K`` subsets recovers ``s`` exactly once ``K >= n``. Its limit,
computed here directly, is ``scores[q, i] = s_qi``: positive when training on ``i`` lowers the
query's loss (a Newton step on ``i`` moves the operator along ``-P g_i``, which changes the query's
loss by ``-g_q^T P g_i``). No per-example gradient of the LLM is ever taken: ``phi_t`` and
``dl/dz_t`` come from one forward pass (at the ``final_hidden`` site, plus a product with the
unembedding), so the cost is about two forward passes over the training rows (one for the
factors, one for the scores) and one over the queries.

**The metric** (Kronecker-factored, as K-FAC; Martens and Grosse, ICML 2015):
``P = (A + lambda_A I)^-1 (x) (S + lambda_S I)^-1`` with ``A = E_t[phi_t phi_t^T]`` and
``S = E_t[Sigma_t]`` over the training set's scored tokens, dampings relative to each factor's
mean eigenvalue. ``P`` is applied symmetrically, ``s_qi = <g~_q, g~_i>`` with
``g~ = P^{1/2} g`` (each factor whitened in its eigenbasis), so a score is a dot product of two
whitened operator gradients. Measured (``benchmarks/results/closed_form_sweep.json``):

* the output side matters most on language models: whitening ``S`` (damping 0.1) raised LDS
  from 0.35 to 0.55 on ``pretrain`` and from 0.43 to 0.59 on ``finetune`` (it weighs a shared
  next token by how rare it is, as IDF does);
* the reader side splits the tasks: on the digits classifier (10 outputs) whitening ``A``
  (0.1) lifts LDS from 0.25 to 0.52, on the language models it lowers it (0.55 -> 0.41 on
  ``pretrain``). With a large output space the next-token side already tells examples apart and
  whitening the reader adds noise; with few outputs the reader is all there is. Hence
  ``reader_damping: auto``: the identity for ``C > 64`` outputs, 0.1 otherwise.

**Large output spaces.** ``S`` is ``C x C``: up to ``full_metric_limit`` it is the exact
Fisher, beyond it its diagonal (``p_bar - E[p^2]`` at the logits). The per-example gradient is
``D x C``; beyond ``max_dim`` numbers its output side is projected after whitening by a fixed
Gaussian ``C x k`` matrix (``k = max_dim // D``, Johnson-Lindenstrauss: dot products keep
``~1/sqrt(k)`` relative error), so a row costs ``T (C k + D k)`` multiply-adds on top of the
forward pass and the scores are a ``[Q, D k] x [D k, rows]`` product per chunk of rows.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax.config import check_ranges, option
from stride_jax.data import TokenizedSet
from stride_jax.errors import ConfigError, DataError
from stride_jax.steering import LMFunctions

log = logging.getLogger(__name__)

__all__ = ["ClosedFormConfig", "OperatorFactors", "closed_form_scores", "fit_factors",
           "operator_gradients", "query_losses", "reader_damping_of", "site_width",
           "token_scores"]


@dataclasses.dataclass(frozen=True)
class ClosedFormConfig:
    """STRIDE operators fitted in closed form (see :mod:`stride_jax.train._closed_form`)."""

    reader_damping: float | str = option(
        "auto", "damping of the reader-side factor A as a multiple of its mean eigenvalue; "
                "'none': no reader-side whitening (identity); 'auto': 'none' when the site has "
                "more than 64 outputs (language models), 0.1 otherwise (classifiers)")
    output_damping: float = option(
        0.1, "damping of the output-side (site Fisher) factor S as a multiple of its mean "
             "eigenvalue")
    full_metric_limit: int = option(
        4096, "largest site width C whose Fisher S is kept in full (C x C); wider sites use its "
              "diagonal")
    max_dim: int = option(
        1 << 18, "largest per-example operator gradient D x C kept exactly; beyond it the output "
                 "side is projected to max_dim // D dimensions (Gaussian, after whitening)")
    batch_size: int = option(32, "rows per forward pass (does not change the result)")
    checkpoint_rows: int = option(
        8192, "a pass over the training rows saves its progress every this many rows, so a "
              "killed run resumes there")

    def __post_init__(self) -> None:
        rd = self.reader_damping
        extra = []
        if (rd not in ("auto", "none") if isinstance(rd, str) else
                isinstance(rd, bool) or not (np.isfinite(rd) and rd > 0)):
            extra.append(("reader_damping", rd, "must be 'auto', 'none' or a positive number"))
        check_ranges(self, {"output_damping": "> 0", "full_metric_limit": ">= 1",
                            "max_dim": ">= 1", "batch_size": ">= 1", "checkpoint_rows": ">= 1"},
                     extra=extra)


# ----------------------------------------------------------------------------------------------
# Per-token terms from one forward pass
# ----------------------------------------------------------------------------------------------

def _rms(h: jax.Array) -> jax.Array:
    h = h.astype(jnp.float32)
    return h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + 1e-6)


def site_width(lm: LMFunctions, site: str) -> int:
    if site == "logits":
        return lm.vocab_size
    if site == "final_hidden":
        return lm.d_final
    raise ConfigError(f"closed-form operators need a site whose shift is linear in the logits "
                      f"('logits' or 'final_hidden'), not {site!r}; set steering.site, or "
                      f"operators=trained for the residual site")


def _terms(lm: LMFunctions, site: str, params, ids, mask, targets, loss_mask):
    """Per token: reader features phi [b, T, D], the loss gradient at the site dl/dz [b, T, C]
    weighted by 1 / (the row's scored tokens), the probabilities p [b, T, V] and the scored-token
    mask m [b, T]."""
    h_reader, h_final = lm.features(params, ids, mask)
    phi = _rms(h_reader)
    h_final = h_final.astype(jnp.float32)
    logits, head_vjp = jax.vjp(lambda h: lm.head(params, h).astype(jnp.float32), h_final)
    p = jax.nn.softmax(logits, axis=-1)
    m = loss_mask.astype(jnp.float32)
    w = m / jnp.maximum(m.sum(-1, keepdims=True), 1.0)
    r = (p - jax.nn.one_hot(targets, p.shape[-1], dtype=p.dtype)) * w[..., None]
    e = r if site == "logits" else head_vjp(r)[0]
    return phi, e, p, m


# ----------------------------------------------------------------------------------------------
# Factors
# ----------------------------------------------------------------------------------------------

class OperatorFactors(NamedTuple):
    """The fitted metric: reader-side transform ``t_phi [D, D]`` (``Q_A diag(d_A)^1/2``),
    output-side transform ``t_out [C, k]`` (whitening, then projection when ``k < C``), and
    the statistics they came from (eigenvalues, token count)."""

    t_phi: np.ndarray
    t_out: np.ndarray
    eig_a: np.ndarray
    eig_s: np.ndarray
    tokens: float
    site: str

    def save(self, path: str | Path) -> None:
        from stride_jax.io.atomic import atomic_path
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, t_phi=self.t_phi, t_out=self.t_out, eig_a=self.eig_a,
                         eig_s=self.eig_s, tokens=np.float64(self.tokens),
                         site=np.array(self.site))

    @classmethod
    def load(cls, path: str | Path) -> "OperatorFactors":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["t_phi"], z["t_out"], z["eig_a"], z["eig_s"], float(z["tokens"]),
                       str(z["site"]))

    @property
    def dim(self) -> int:
        """Length of a whitened (and projected) operator gradient, ``D k``."""
        return int(self.t_phi.shape[1] * self.t_out.shape[1])


def _unembedding(lm: LMFunctions) -> jax.Array:
    """``U [d, V]``: the head's linear part (the head is affine in the final hidden state)."""
    d = lm.d_final
    zero = lm.head(lm.params, jnp.zeros((1, 1, d), jnp.float32))[0, 0]
    return (lm.head(lm.params, jnp.eye(d, dtype=jnp.float32)[None])[0] - zero).astype(jnp.float32)


# Jitted kernels, one per model functions and site: built once, so a second run (or a second
# pass over other rows of the same shape) does not recompile.
_KERNELS: dict = {}


def _kernel(kind: str, lm: LMFunctions, site: str, *extra, build: Callable):
    key = (kind, lm.features, lm.head, lm.vocab_size, lm.d_reader, lm.d_final, site, *extra)
    if key not in _KERNELS:
        _KERNELS[key] = build()
    return _KERNELS[key]


def _stat_fn(lm: LMFunctions, site: str, full: bool):
    return _kernel("stats", lm, site, full, build=lambda: _build_stat_fn(lm, site, full))


def _build_stat_fn(lm: LMFunctions, site: str, full: bool):
    """Jitted per-batch sums of the factor statistics."""

    @jax.jit
    def stats(params, ids, mask, targets, loss_mask):
        phi, _, p, m = _terms(lm, site, params, ids, mask, targets, loss_mask)
        sum_a = jnp.einsum("bt,btd,bte->de", m, phi, phi)
        sum_p = jnp.einsum("bt,btv->v", m, p)
        if site == "logits":
            pp = (jnp.einsum("bt,btv,btw->vw", m, p, p) if full
                  else jnp.einsum("bt,btv->v", m, p * p))
        else:
            # U^T p per token; E[(U^T p)(U^T p)^T] is the second term of U^T Sigma U.
            u = jnp.einsum("btv,dv->btd", p, _unembedding(lm))
            pp = jnp.einsum("bt,btd,bte->de", m, u, u)
        return sum_a, sum_p, pp, m.sum()

    return stats


def _eigh(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e, v = np.linalg.eigh(np.asarray(m, np.float64))
    return np.maximum(e, 0.0), v


def _damped(e: np.ndarray, frac: float) -> np.ndarray:
    mean = float(e.mean()) if e.size else 0.0
    lam = frac * mean if mean > 0 else frac
    return 1.0 / (e + lam)


def reader_damping_of(cfg: ClosedFormConfig, width: int) -> float | None:
    """The reader-side damping this config gives a site of ``width`` outputs (None: identity)."""
    rd = cfg.reader_damping
    if rd == "auto":
        return None if width > 64 else 0.1
    return None if rd == "none" else float(rd)


def fit_factors(lm: LMFunctions, data: TokenizedSet, site: str, cfg: ClosedFormConfig, *,
                key: jax.Array, mesh=None, progress: bool = False,
                resume_path: str | Path | None = None) -> OperatorFactors:
    """One forward pass over ``data``: the factors A and S, their eigendecompositions and the
    whitening (and projection) transforms. ``resume_path``: partial sums saved every
    ``cfg.checkpoint_rows`` rows, resumed by a rerun."""
    C = site_width(lm, site)
    D = lm.d_reader
    full = C <= cfg.full_metric_limit
    stats = _stat_fn(lm, site, full)
    zeros = {"a": np.zeros((D, D)), "p": np.zeros(lm.vocab_size),
             "pp": np.zeros((C, C) if (full or site != "logits") else (C,)), "n": np.zeros(())}

    def step(acc, batch):
        out = stats(lm.params, *batch)
        for k_, v in zip(("a", "p", "pp", "n"), out):
            acc[k_] = acc[k_] + np.asarray(v, np.float64)
        return acc

    acc = row_pass(data, cfg, step, zeros, mesh=mesh, progress=progress, desc="fit operators",
                   resume_path=resume_path)
    n_tok = float(acc["n"])
    if n_tok <= 0:
        raise DataError("the training rows have no scored token: nothing to fit the "
                        "operators on (check the loss masks / completions)")
    A = acc["a"] / n_tok
    p_bar = acc["p"] / n_tok
    eig_a, q_a = _eigh(A)
    lam_a = reader_damping_of(cfg, C)
    if lam_a is None:
        t_phi = np.eye(D)
    else:
        t_phi = q_a * np.sqrt(_damped(eig_a, lam_a))[None, :]
    if site == "logits" and not full:
        s_diag = np.maximum(p_bar - acc["pp"] / n_tok, 0.0)
        eig_s = s_diag
        t_out = np.diag(np.sqrt(_damped(s_diag, cfg.output_damping)))
    else:
        if site == "logits":
            S = np.diag(p_bar) - acc["pp"] / n_tok
        else:
            U = np.asarray(_unembedding(lm), np.float64)
            S = (U * p_bar[None, :]) @ U.T - acc["pp"] / n_tok
        eig_s, q_s = _eigh(S)
        t_out = q_s * np.sqrt(_damped(eig_s, cfg.output_damping))[None, :]
    k = C if D * C <= cfg.max_dim else max(1, cfg.max_dim // D)
    if k < C:
        proj = np.asarray(jax.random.normal(key, (C, k), jnp.float32), np.float64) / np.sqrt(k)
        # A diagonal whitening is applied row-wise without forming a C x C matrix.
        t_out = (np.diag(t_out)[:, None] * proj) if (site == "logits" and not full) \
            else t_out @ proj
    return OperatorFactors(t_phi.astype(np.float32), np.asarray(t_out, np.float32),
                           eig_a, np.asarray(eig_s), n_tok, site)


# ----------------------------------------------------------------------------------------------
# Whitened operator gradients and scores
# ----------------------------------------------------------------------------------------------

def _grad_fn(lm: LMFunctions, site: str, per_token: bool = False):
    return _kernel("grads", lm, site, per_token,
                   build=lambda: _build_grad_fn(lm, site, per_token))


def _build_grad_fn(lm: LMFunctions, site: str, per_token: bool):
    @jax.jit
    def grads(params, t_phi, t_out, ids, mask, targets, loss_mask):
        phi, e, _, _ = _terms(lm, site, params, ids, mask, targets, loss_mask)
        phi_w = phi @ t_phi                                  # [b, T, D]
        e_w = e @ t_out                                      # [b, T, k]
        if per_token:
            return phi_w, e_w
        g = jnp.einsum("btd,btk->bdk", phi_w, e_w)
        return g.reshape(g.shape[0], -1)

    return grads


def operator_gradients(lm: LMFunctions, rows: TokenizedSet, factors: OperatorFactors,
                       cfg: ClosedFormConfig, *, mesh=None, progress: bool = False
                       ) -> np.ndarray:
    """``[rows, D k]`` whitened operator gradients ``g~ = P^{1/2} g`` (float32)."""
    grads = _grad_fn(lm, factors.site)
    t_phi, t_out = jnp.asarray(factors.t_phi), jnp.asarray(factors.t_out)
    out = np.empty((len(rows), factors.dim), np.float32)

    def step(acc, batch, lo, hi):
        acc[lo:hi] = np.asarray(grads(lm.params, t_phi, t_out, *batch))[: hi - lo]
        return acc

    return row_pass(rows, cfg, step, out, mesh=mesh, progress=progress, desc="query gradients",
                    with_range=True)


def closed_form_scores(lm: LMFunctions, train: TokenizedSet, factors: OperatorFactors,
                       gq: np.ndarray, cfg: ClosedFormConfig, *, mesh=None,
                       progress: bool = False, resume_path: str | Path | None = None,
                       acc: dict | None = None, update: Callable | None = None) -> dict:
    """Scores ``<g~_q, g~_i>`` of every query against every training row, the rows streamed in
    chunks (never more than one chunk's gradients in memory).

    By default returns ``{"s": [Q, n]}``. A caller that keeps less (e.g. each query's top
    scores) passes its own ``acc`` (a dict of arrays, saved for resuming) and
    ``update(acc, lo, hi, s_chunk [Q, hi - lo]) -> acc``.
    """
    grads = _grad_fn(lm, factors.site)
    t_phi, t_out = jnp.asarray(factors.t_phi), jnp.asarray(factors.t_out)
    gq_d = jnp.asarray(gq, jnp.float32)
    score = _SCORE
    if acc is None:
        acc = {"s": np.zeros((gq.shape[0], len(train)), np.float32)}

        def update(acc, lo, hi, s_chunk):
            acc["s"][:, lo:hi] = s_chunk
            return acc

    def step(acc, batch, lo, hi):
        g = grads(lm.params, t_phi, t_out, *batch)
        return update(acc, lo, hi, np.asarray(score(gq_d, g))[:, : hi - lo])

    return row_pass(train, cfg, step, acc, mesh=mesh, progress=progress, desc="scores",
                    with_range=True, resume_path=resume_path)


_SCORE = jax.jit(lambda q, g: q @ g.T)


def query_losses(lm: LMFunctions, rows: TokenizedSet, cfg: ClosedFormConfig) -> np.ndarray:
    """``[rows]`` the base model's mean loss over each row's scored tokens (nats per token)."""
    def build():
        @jax.jit
        def loss(params, ids, mask, targets, loss_mask):
            _, h_final = lm.features(params, ids, mask)
            logp = jax.nn.log_softmax(lm.head(params, h_final).astype(jnp.float32), axis=-1)
            nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
            return jnp.sum(nll * loss_mask, -1) / jnp.maximum(loss_mask.sum(-1), 1.0)
        return loss

    loss = _kernel("loss", lm, "", build=build)

    out = np.empty(len(rows), np.float32)

    def step(acc, batch, lo, hi):
        acc[lo:hi] = np.asarray(loss(lm.params, *batch))[: hi - lo]
        return acc

    return row_pass(rows, cfg, step, out, with_range=True)


def token_scores(lm: LMFunctions, queries: TokenizedSet, factors: OperatorFactors,
                 g_train: np.ndarray) -> np.ndarray:
    """``[Q, T, m]`` per-token shares of the scores of ``m`` training rows (their whitened
    gradients ``g_train [m, D k]``): ``scores[q, i] = sum_t out[q, t, i]`` exactly, the term of
    each scored query token in ``<g~_q, g~_i>``."""
    fn = _grad_fn(lm, factors.site, per_token=True)
    t_phi, t_out = jnp.asarray(factors.t_phi), jnp.asarray(factors.t_out)
    D, k = factors.t_phi.shape[1], factors.t_out.shape[1]
    g = jnp.asarray(g_train, jnp.float32).reshape(-1, D, k)
    phi_w, e_w = fn(lm.params, t_phi, t_out, *_batch_arrays(queries, np.arange(len(queries))))
    return np.asarray(jnp.einsum("qtd,qtk,mdk->qtm", phi_w, e_w, g))


# ----------------------------------------------------------------------------------------------
# A resumable pass over rows
# ----------------------------------------------------------------------------------------------

def _batch_arrays(rows: TokenizedSet, idx: np.ndarray, weight: np.ndarray | None = None):
    loss_mask = rows.loss_mask[idx].astype(np.float32)
    if weight is not None:
        loss_mask = loss_mask * weight[:, None]
    return (jnp.asarray(rows.input_ids[idx]), jnp.asarray(rows.attention_mask[idx]),
            jnp.asarray(rows.target_ids()[idx]) if rows.targets is not None
            else jnp.asarray(np.concatenate([rows.input_ids[idx][:, 1:],
                                             rows.input_ids[idx][:, :1]], axis=1)),
            jnp.asarray(loss_mask))


def row_pass(rows: TokenizedSet, cfg: ClosedFormConfig, step: Callable, acc: Any, *, mesh=None,
             progress: bool = False, desc: str = "rows", with_range: bool = False,
             resume_path: str | Path | None = None) -> Any:
    """Apply ``step`` to fixed-size batches of ``rows`` (the last padded by repeating rows with
    zero weight, so every batch compiles once), accumulating into ``acc`` (a dict of arrays or an
    array). With a ``mesh`` each batch is split over its devices. ``resume_path``: ``acc`` and
    the rows done are saved there every ``cfg.checkpoint_rows`` rows and resumed from."""
    from stride_jax.io.atomic import atomic_path
    n = len(rows)
    B = cfg.batch_size
    if mesh is not None:
        B = -(-B // mesh.size) * mesh.size
    start = 0
    if resume_path is not None and Path(resume_path).is_file():
        with np.load(resume_path, allow_pickle=False) as z:
            start = int(z["_rows_done"])
            acc = {k_: z[k_] for k_ in z.files if k_ != "_rows_done"} if isinstance(acc, dict) \
                else z["acc"]
        log.info("%s: resuming at row %d of %d", desc, start, n)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, initial=start, desc=desc, unit="row", dynamic_ncols=True)
    since = 0
    for lo in range(start, n, B):
        hi = min(lo + B, n)
        idx = np.arange(lo, lo + B) % n
        weight = (np.arange(lo, lo + B) < n).astype(np.float32)
        batch = _batch_arrays(rows, idx, weight)
        if mesh is not None:
            batch = mesh.shard(batch)
        acc = step(acc, batch, lo, hi) if with_range else step(acc, batch)
        since += hi - lo
        if resume_path is not None and (since >= cfg.checkpoint_rows) and hi < n:
            with atomic_path(resume_path) as tmp:
                with open(tmp, "wb") as f:
                    if isinstance(acc, dict):
                        np.savez(f, _rows_done=np.int64(hi), **acc)
                    else:
                        np.savez(f, _rows_done=np.int64(hi), acc=acc)
            since = 0
        if bar is not None:
            bar.update(hi - lo)
    if bar is not None:
        bar.close()
    return acc
