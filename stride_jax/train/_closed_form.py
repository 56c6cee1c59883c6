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

**Tempering rows the model already fits.** The scores are divided by a power of the training
row's whitened gradient norm, ``s_qi = <g~_q, g~_i> / |g~_i|^p`` with ``p = norm_power``
(default 0.5). The gradient is taken at the end of training: a row the model fits well has a
small one there although it pulled the weights all along, and a row it fits badly a large one.
On the digits classifier, where most rows are fitted (median norm 0.6 % of the RMS), ``p =
0.5`` raised LDS from 0.52 to 0.63; on the language models, whose norms spread little, it
changed LDS by less than 0.005 (``closed_form_sweep.json``). ``p = 1`` (cosine) lets the
direction of nearly-zero gradients decide and falls back to 0.51 on digits.

**The reader** (``reader``). The operators read the residual stream at the steering layer
(~2/3 depth) or the final hidden state, the head's input (``phi`` is then the final hidden
state, RMS-normed, and the operator gradient at the logits site is the gradient of the output
matrix). ``auto`` reads the final hidden state for sites of more than 64 outputs: on the
fine-tuned language model it raised LDS from 0.583 to 0.603 (paired +0.020, CI +0.011..+0.028),
on the pretrained one it changed it by -0.002 (CI -0.008..+0.004), and on the digits classifier
it lowered it from 0.632 to 0.596, hence the ~2/3-depth layer below 64 outputs.

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
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax.config import check_ranges, option
from stride_jax.data import TokenizedSet
from stride_jax.errors import ConfigError, DataError
from stride_jax.steering import LMFunctions

log = logging.getLogger(__name__)

__all__ = ["ClosedFormConfig", "OperatorFactors", "closed_form_scores", "compute_dtype",
           "fit_factors", "operator_gradients", "query_losses", "query_terms",
           "reader_damping_of", "reader_lm", "reader_of", "self_scores", "site_width",
           "token_scores"]


@dataclasses.dataclass(frozen=True)
class ClosedFormConfig:
    """STRIDE operators fitted in closed form (see :mod:`stride_jax.train._closed_form`)."""

    reader: Literal["auto", "layer", "final"] = option(
        "auto", "what the operators read: 'layer', the residual stream at the steering layer "
                "(~2/3 depth); 'final', the final hidden state the head reads; 'auto': 'final' "
                "when the site has more than 64 outputs (language models), 'layer' otherwise")
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
    norm_power: float = option(
        0.5, "scores are <g~_q, g~_i> / |g~_i|^norm_power: each training row's whitened "
             "gradient is divided by a power of its norm (0: the plain Newton-step scores; 1: "
             "cosine on the training side). Tempers rows the model already fits, whose gradient "
             "at the end of training understates their pull during it")
    batch_size: int = option(32, "rows per forward pass (does not change the result)")
    checkpoint_rows: int = option(
        8192, "a pass over the training rows saves its progress every this many rows, so a "
              "killed run resumes there")
    dtype: Literal["model", "bfloat16", "auto"] = option(
        "model", "compute dtype of the frozen model's layers and of the output-side projection "
                 "in every pass; the head, softmax, factors, gradients and scores accumulate in "
                 "float32 whatever it is. model: the model's own (float32 unless loaded "
                 "otherwise); bfloat16: faster on GPUs and TPUs (not on CPUs without bfloat16 "
                 "units); auto: bfloat16 on GPUs and TPUs, the model's own on CPUs")

    def __post_init__(self) -> None:
        rd = self.reader_damping
        extra = []
        if (rd not in ("auto", "none") if isinstance(rd, str) else
                isinstance(rd, bool) or not (np.isfinite(rd) and rd > 0)):
            extra.append(("reader_damping", rd, "must be 'auto', 'none' or a positive number"))
        if self.reader not in ("auto", "layer", "final"):
            extra.append(("reader", self.reader, "must be 'auto', 'layer' or 'final'"))
        if self.dtype not in ("model", "bfloat16", "auto"):
            extra.append(("dtype", self.dtype, "must be 'model', 'bfloat16' or 'auto'"))
        check_ranges(self, {"output_damping": "> 0", "norm_power": ">= 0",
                            "full_metric_limit": ">= 1",
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


def compute_dtype(cfg: ClosedFormConfig, platform: str | None = None) -> str:
    """The dtype ``cfg.dtype`` asks for on ``platform`` (default: JAX's default backend):
    ``"model"`` (the model's own) or ``"bfloat16"``."""
    if cfg.dtype != "auto":
        return cfg.dtype
    platform = platform or jax.default_backend()
    return "model" if platform == "cpu" else "bfloat16"


def _features(lm: LMFunctions, dtype: str) -> Callable:
    if dtype == "model":
        return lm.features
    if lm.features_as is None:
        raise ConfigError(f"closed_form.dtype={dtype} needs a model that can compute in another "
                         f"dtype (a stride-jax CausalLM); this LMFunctions has no features_as: "
                         f"set closed_form.dtype=model, or fill LMFunctions.features_as")
    return lm.features_as(dtype)


def _terms(lm: LMFunctions, site: str, params, ids, mask, targets, loss_mask,
           dtype: str = "model"):
    """Per token: reader features phi [b, T, D], the loss gradient at the site dl/dz [b, T, C]
    weighted by 1 / (the row's scored tokens), the probabilities p [b, T, V], the scored-token
    mask m [b, T] and each row's mean token loss [b]. The layers run in ``dtype``; the head,
    softmax and everything after it in float32."""
    h_reader, h_final = _features(lm, dtype)(params, ids, mask)
    phi = _rms(h_reader)
    h_final = h_final.astype(jnp.float32)
    logits, head_vjp = jax.vjp(lambda h: lm.head(params, h).astype(jnp.float32), h_final)
    logp = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(logp)
    m = loss_mask.astype(jnp.float32)
    count = m.sum(-1)
    w = m / jnp.maximum(count, 1.0)[:, None]
    # p - onehot(y) without a [b, T, V] one-hot in memory (XLA fuses the compare).
    hit = jnp.arange(p.shape[-1], dtype=targets.dtype) == targets[..., None]
    r = jnp.where(hit, p - 1.0, p) * w[..., None]
    e = r if site == "logits" else head_vjp(r)[0]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    loss = jnp.sum(nll * m, -1) / jnp.maximum(count, 1.0)
    return phi, e, p, m, loss


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


# Jitted kernels, one per model functions, site and dtype: built once, so a second run (or a
# second pass over other rows of the same shape) does not recompile. Each kernel compiles once
# per input shape (tests/test_closed_form_perf.py counts the traces).
_KERNELS: dict = {}


def _kernel(kind: str, lm: LMFunctions, site: str, *extra, build: Callable):
    key = (kind, lm.features, lm.head, lm.vocab_size, lm.d_reader, lm.d_final, site, *extra)
    if key not in _KERNELS:
        _KERNELS[key] = build()
    return _KERNELS[key]


def _stat_fn(lm: LMFunctions, site: str, full: bool, dtype: str = "model"):
    return _kernel("stats", lm, site, full, dtype,
                   build=lambda: _build_stat_fn(lm, site, full, dtype))


def _build_stat_fn(lm: LMFunctions, site: str, full: bool, dtype: str):
    """Jitted: the running factor sums ``acc`` (float32, on the device) plus one batch's."""

    def stats(acc, params, ids, mask, targets, loss_mask):
        phi, _, p, m, _ = _terms(lm, site, params, ids, mask, targets, loss_mask, dtype)
        sum_a = jnp.einsum("bt,btd,bte->de", m, phi, phi)
        sum_p = jnp.einsum("bt,btv->v", m, p)
        if site == "logits":
            pp = (jnp.einsum("bt,btv,btw->vw", m, p, p) if full
                  else jnp.einsum("bt,btv->v", m, p * p))
        else:
            # U^T p per token; E[(U^T p)(U^T p)^T] is the second term of U^T Sigma U.
            u = jnp.einsum("btv,dv->btd", p, _unembedding(lm))
            pp = jnp.einsum("bt,btd,bte->de", m, u, u)
        return {"a": acc["a"] + sum_a, "p": acc["p"] + sum_p, "pp": acc["pp"] + pp,
                "n": acc["n"] + m.sum()}

    return jax.jit(stats)


def _eigh(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e, v = np.linalg.eigh(np.asarray(m, np.float64))
    return np.maximum(e, 0.0), v


def _damped(e: np.ndarray, frac: float) -> np.ndarray:
    mean = float(e.mean()) if e.size else 0.0
    lam = frac * mean if mean > 0 else frac
    return 1.0 / (e + lam)


def reader_of(cfg: ClosedFormConfig, width: int) -> str:
    """The reader (``"layer"`` or ``"final"``) this config gives a site of ``width`` outputs."""
    if cfg.reader == "auto":
        return "final" if width > 64 else "layer"
    return cfg.reader


# The final-hidden-state readers made so far, one per model function, so kernels keyed by the
# function compile once per model however many Attributors use it.
_FINAL_READERS: dict = {}


def _final_features(features: Callable) -> Callable:
    if features not in _FINAL_READERS:
        def final(params, input_ids, attention_mask):
            _, h_final = features(params, input_ids, attention_mask)
            return h_final, h_final
        _FINAL_READERS[features] = final
    return _FINAL_READERS[features]


def reader_lm(lm: LMFunctions, cfg: ClosedFormConfig, site: str) -> LMFunctions:
    """``lm`` as the closed form reads it: unchanged for the ``layer`` reader; for ``final``,
    the final hidden state as the reader (``d_reader = d_final``, stamped as layer
    ``num_layers``). Every public function of this module applies it, so ``cfg.reader`` holds
    however they are called; applying it twice changes nothing."""
    if reader_of(cfg, site_width(lm, site)) == "layer" or lm.features in _FINAL_READERS.values():
        return lm       # the layer reader, or already the final-hidden-state reader
    features_as = lm.features_as
    if features_as is not None:
        base_as = features_as
        features_as = lambda dtype: _final_features(base_as(dtype))  # noqa: E731
    return dataclasses.replace(lm, features=_final_features(lm.features), features_as=features_as,
                               d_reader=lm.d_final, layer=lm.num_layers)


def reader_damping_of(cfg: ClosedFormConfig, width: int) -> float | None:
    """The reader-side damping this config gives a site of ``width`` outputs (None: identity)."""
    rd = cfg.reader_damping
    if rd == "auto":
        return None if width > 64 else 0.1
    return None if rd == "none" else float(rd)


# Device-side float32 sums are folded into the float64 host sums every this many batches, so
# float32 never adds up more than a few thousand rows.
_FOLD_BATCHES = 64


def fit_factors(lm: LMFunctions, data: TokenizedSet, site: str, cfg: ClosedFormConfig, *,
                key: jax.Array, mesh=None, progress: bool = False,
                resume_path: str | Path | None = None) -> OperatorFactors:
    """One forward pass over ``data``: the factors A and S, their eigendecompositions and the
    whitening (and projection) transforms. ``resume_path``: partial sums saved every
    ``cfg.checkpoint_rows`` rows, resumed by a rerun.

    The sums stay on the device between batches (no host round trip per batch) and are folded
    into float64 host sums every few dozen batches and at every progress mark."""
    lm = reader_lm(lm, cfg, site)
    C = site_width(lm, site)
    D = lm.d_reader
    full = C <= cfg.full_metric_limit
    stats = _stat_fn(lm, site, full, compute_dtype(cfg))
    shapes = {"a": (D, D), "p": (lm.vocab_size,),
              "pp": (C, C) if (full or site != "logits") else (C,), "n": ()}
    zeros = {k_: np.zeros(v) for k_, v in shapes.items()}
    pending: dict = {"sums": None, "batches": 0}

    def fold(acc):
        if pending["sums"] is not None:
            part = jax.device_get(pending["sums"])
            acc = {k_: acc[k_] + np.asarray(part[k_], np.float64) for k_ in acc}
            pending.update(sums=None, batches=0)
        return acc

    def step(acc, batch):
        if pending["sums"] is None:
            pending["sums"] = {k_: jnp.zeros(v, jnp.float32) for k_, v in shapes.items()}
        pending["sums"] = stats(pending["sums"], lm.params, *batch)
        pending["batches"] += 1
        return fold(acc) if pending["batches"] >= _FOLD_BATCHES else acc

    acc = row_pass(data, cfg, step, zeros, mesh=mesh, progress=progress, desc="fit operators",
                   resume_path=resume_path, flush=fold)
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
    diagonal = site == "logits" and not full
    if diagonal:
        # A diagonal whitening, kept as its C scales (a C x C matrix of them is 19 GB in
        # float64 at a 49k vocabulary).
        eig_s = np.maximum(p_bar - acc["pp"] / n_tok, 0.0)
        scale = np.sqrt(_damped(eig_s, cfg.output_damping))
        t_out = None
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
        if not diagonal:
            # The symmetric root (S + lambda)^-1/2 = Q_S D^1/2 Q_S^T before projecting: Q_S D^1/2
            # alone is defined only up to a rotation within near-equal eigenvalues, so the
            # slightest change of S (float rounding, bfloat16, other devices) would rotate it
            # and project by what is in effect another random matrix.
            t_out = t_out @ q_s.T
        # The diagonal whitening is applied row-wise.
        t_out = scale[:, None] * proj if diagonal else t_out @ proj
    elif diagonal:
        t_out = np.diag(scale)
    return OperatorFactors(t_phi.astype(np.float32), np.asarray(t_out, np.float32),
                           eig_a, np.asarray(eig_s), n_tok, site)


# ----------------------------------------------------------------------------------------------
# Whitened operator gradients and scores
# ----------------------------------------------------------------------------------------------

def _project(e: jax.Array, t_out: jax.Array, dtype: str) -> jax.Array:
    """``e @ t_out`` (``[b, T, C] x [C, k]``), in bfloat16 with float32 accumulation when asked:
    the largest matmul after the forward pass at a wide site."""
    if dtype == "bfloat16":
        return jnp.einsum("btc,ck->btk", e.astype(jnp.bfloat16), t_out.astype(jnp.bfloat16),
                          preferred_element_type=jnp.float32)
    return e @ t_out


def _grad_fn(lm: LMFunctions, site: str, per_token: bool = False, dtype: str = "model"):
    return _kernel("grads", lm, site, per_token, dtype,
                   build=lambda: _build_grad_fn(lm, site, per_token, dtype))


def _build_grad_fn(lm: LMFunctions, site: str, per_token: bool, dtype: str):
    @jax.jit
    def grads(params, t_phi, t_out, ids, mask, targets, loss_mask):
        phi, e, _, _, _ = _terms(lm, site, params, ids, mask, targets, loss_mask, dtype)
        phi_w = phi @ t_phi                                  # [b, T, D]
        e_w = _project(e, t_out, dtype)                      # [b, T, k]
        if per_token:
            return phi_w, e_w
        g = jnp.einsum("btd,btk->bdk", phi_w, e_w)
        return g.reshape(g.shape[0], -1)

    return grads


def _rows_fn(lm: LMFunctions, site: str, dtype: str = "model", norm_power: float = 0.0):
    return _kernel("rows", lm, site, dtype, float(norm_power),
                   build=lambda: _build_rows_fn(lm, site, dtype, float(norm_power)))


def norm_scale(sq_norm, power: float):
    """``|g|^-power`` from ``|g|^2`` (0 where ``g = 0``: such a row scores 0 anyway); numpy or
    jax arrays."""
    xp = jnp if isinstance(sq_norm, jax.Array) else np
    if power == 0:
        return xp.ones_like(sq_norm)
    pos = sq_norm > 0
    return xp.where(pos, xp.where(pos, sq_norm, 1.0) ** (-0.5 * power), 0.0)


def _build_rows_fn(lm: LMFunctions, site: str, dtype: str, norm_power: float):
    """Jitted, one program for the query pass and the score pass (same shapes, one compile):
    a batch's whitened gradients ``g [b, D k]``, their scores against the queries'
    ``s = g_q g^T / |g|^norm_power [Q, b]`` and the rows' mean token losses ``[b]``."""

    @jax.jit
    def rows(params, t_phi, t_out, g_q, ids, mask, targets, loss_mask):
        phi, e, _, _, loss = _terms(lm, site, params, ids, mask, targets, loss_mask, dtype)
        phi_w = phi @ t_phi
        e_w = _project(e, t_out, dtype)
        g = jnp.einsum("btd,btk->bdk", phi_w, e_w).reshape(phi.shape[0], -1)
        s = g_q @ g.T
        if norm_power:
            s = s * norm_scale(jnp.einsum("bd,bd->b", g, g), norm_power)[None, :]
        return g, s, loss

    return rows


# The device copies of the last factors' transforms: a pass (or a token report calling once per
# query) reuses them instead of copying [C, k] floats to the device again.
_TRANSFORMS: list = []


def _device_transforms(factors: OperatorFactors) -> tuple[jax.Array, jax.Array]:
    for t_phi, t_out, dev in _TRANSFORMS:
        if t_phi is factors.t_phi and t_out is factors.t_out:
            return dev
    dev = (jnp.asarray(factors.t_phi), jnp.asarray(factors.t_out))
    _TRANSFORMS[:] = [(factors.t_phi, factors.t_out, dev)] + _TRANSFORMS[:1]
    return dev


def _placed(x: jax.Array, mesh) -> jax.Array:
    return x if mesh is None else mesh.replicate(x)


def _gradient_pass(lm: LMFunctions, rows: TokenizedSet, factors: OperatorFactors,
                   cfg: ClosedFormConfig, *, num_queries: int, mesh=None, progress: bool = False,
                   desc: str = "query gradients") -> tuple[np.ndarray, np.ndarray]:
    """``[rows, D k]`` whitened gradients and ``[rows]`` mean losses, by the score pass's own
    program (zero queries of the score pass's shape: ``num_queries``)."""
    lm = reader_lm(lm, cfg, factors.site)
    fn = _rows_fn(lm, factors.site, compute_dtype(cfg), cfg.norm_power)
    t_phi, t_out = _device_transforms(factors)
    g0 = _placed(jnp.zeros((num_queries, factors.dim), jnp.float32), mesh)
    out = {"g": np.empty((len(rows), factors.dim), np.float32),
           "loss": np.empty(len(rows), np.float32)}
    pending: list = []

    def flush(acc):
        for (lo, hi), (g, loss) in zip([p[0] for p in pending],
                                       jax.device_get([p[1] for p in pending])):
            acc["g"][lo:hi] = g[: hi - lo]
            acc["loss"][lo:hi] = loss[: hi - lo]
        pending.clear()
        return acc

    def step(acc, batch, lo, hi):
        g, _, loss = fn(lm.params, t_phi, t_out, g0, *batch)
        pending.append(((lo, hi), (g, loss)))
        # Gradients are large ([b, D k]): a few batches in flight, not the whole pass.
        return flush(acc) if len(pending) >= 4 else acc

    acc = row_pass(rows, cfg, step, out, mesh=mesh, progress=progress, desc=desc,
                   with_range=True, flush=flush)
    return acc["g"], acc["loss"]


def query_terms(lm: LMFunctions, queries: TokenizedSet, factors: OperatorFactors,
                cfg: ClosedFormConfig, *, mesh=None, progress: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
    """The queries' whitened operator gradients ``[Q, D k]`` and base losses ``[Q]`` (nats per
    token) in one pass, compiled once with the score pass that follows."""
    return _gradient_pass(lm, queries, factors, cfg, num_queries=len(queries), mesh=mesh,
                          progress=progress)


def operator_gradients(lm: LMFunctions, rows: TokenizedSet, factors: OperatorFactors,
                       cfg: ClosedFormConfig, *, mesh=None, progress: bool = False
                       ) -> np.ndarray:
    """``[rows, D k]`` whitened operator gradients ``g~ = P^{1/2} g`` (float32)."""
    return _gradient_pass(lm, rows, factors, cfg, num_queries=1, mesh=mesh,
                          progress=progress)[0]


def query_losses(lm: LMFunctions, rows: TokenizedSet, cfg: ClosedFormConfig) -> np.ndarray:
    """``[rows]`` the base model's mean loss over each row's scored tokens (nats per token)."""
    def build():
        @jax.jit
        def loss(params, ids, mask, targets, loss_mask):
            return _terms(lm, "logits", params, ids, mask, targets, loss_mask,
                          compute_dtype(cfg))[-1]
        return loss

    loss = _kernel("loss", lm, "", compute_dtype(cfg), build=build)
    out = np.empty(len(rows), np.float32)

    def step(acc, batch, lo, hi):
        acc[lo:hi] = np.asarray(loss(lm.params, *batch))[: hi - lo]
        return acc

    return row_pass(rows, cfg, step, out, with_range=True)


def closed_form_scores(lm: LMFunctions, train: TokenizedSet, factors: OperatorFactors,
                       gq: np.ndarray, cfg: ClosedFormConfig, *, mesh=None,
                       progress: bool = False, resume_path: str | Path | None = None,
                       acc: dict | None = None, update: Callable | None = None,
                       topk: int | None = None) -> dict:
    """Scores ``<g~_q, g~_i> / |g~_i|^p`` (``p = cfg.norm_power``) of every query against every
    training row, the rows streamed in batches (never more than a few batches' gradients in
    memory).

    By default returns ``{"s": [Q, n]}``. ``topk``: instead each query's ``topk`` largest
    positive and most negative scores, kept and merged on the device (the arrays of
    :class:`~stride_jax.attributor.TopScores`: ``pro_index``, ``pro_score``, ``opp_index``,
    ``opp_score``, best first, index -1 and score 0 where a query has fewer). A caller that
    keeps something else passes its own ``acc`` (a dict of arrays, saved for resuming) and
    ``update(acc, lo, hi, s_chunk [Q, hi - lo]) -> acc`` (on the host: one round trip per
    batch).

    Nothing waits for the device between batches: scores stay there until a progress mark
    (``cfg.checkpoint_rows``), a few dozen batches, or the end.
    """
    lm = reader_lm(lm, cfg, factors.site)
    fn = _rows_fn(lm, factors.site, compute_dtype(cfg), cfg.norm_power)
    t_phi, t_out = _device_transforms(factors)
    Q = gq.shape[0]
    gq_d = _placed(jnp.asarray(gq, jnp.float32), mesh)
    pending: list = []

    if update is not None:
        def step(acc, batch, lo, hi):
            s = fn(lm.params, t_phi, t_out, gq_d, *batch)[1]
            return update(acc, lo, hi, np.asarray(s)[:, : hi - lo])
        flush = None
    elif topk is not None:
        if acc is None:
            acc = _empty_top(Q, topk)
        state: dict = {"dev": None}

        def step(acc, batch, lo, hi):
            if state["dev"] is None:    # the kept scores so far (a resumed pass: from its mark)
                state["dev"] = {k_: jnp.asarray(v, jnp.int32 if "index" in k_ else jnp.float32)
                                for k_, v in acc.items()}
            s = fn(lm.params, t_phi, t_out, gq_d, *batch)[1]
            state["dev"] = _merge_top_device(state["dev"], s, jnp.int32(lo), jnp.int32(hi))
            return acc

        def flush(acc):
            if state["dev"] is None:
                return acc
            host = jax.device_get(state["dev"])
            return {k_: np.asarray(v, np.int64 if "index" in k_ else np.float32)
                    for k_, v in host.items()}
    else:
        if acc is None:
            acc = {"s": np.zeros((Q, len(train)), np.float32)}

        def flush(acc):
            for (lo, hi), s in zip([p[0] for p in pending],
                                   jax.device_get([p[1] for p in pending])):
                acc["s"][:, lo:hi] = s[:, : hi - lo]
            pending.clear()
            return acc

        def step(acc, batch, lo, hi):
            pending.append(((lo, hi), fn(lm.params, t_phi, t_out, gq_d, *batch)[1]))
            return flush(acc) if len(pending) >= _FOLD_BATCHES else acc

    return row_pass(train, cfg, step, acc, mesh=mesh, progress=progress, desc="scores",
                    with_range=True, resume_path=resume_path, flush=flush)


def _empty_top(num_queries: int, k: int) -> dict:
    return {"pro_index": np.full((num_queries, k), -1, np.int64),
            "pro_score": np.zeros((num_queries, k), np.float32),
            "opp_index": np.full((num_queries, k), -1, np.int64),
            "opp_score": np.zeros((num_queries, k), np.float32)}


@jax.jit
def _merge_top_device(acc: dict, s_qb: jax.Array, lo: jax.Array, hi: jax.Array) -> dict:
    """Fold the scores of training rows ``lo .. lo + b`` (those below ``hi`` are real) into each
    query's kept top scores, in the order of ``TopScores.from_dense``: by score, ties by the
    lower index; proponents strictly positive, opponents strictly negative."""
    Q, b = s_qb.shape
    idx = jnp.broadcast_to(lo + jnp.arange(b, dtype=jnp.int32), (Q, b))
    real = idx < hi
    out = {}
    for side, sign in (("pro", 1.0), ("opp", -1.0)):
        kept_i, kept_s = acc[f"{side}_index"], acc[f"{side}_score"]
        k = kept_i.shape[1]
        cand_i = jnp.concatenate([kept_i, idx], axis=1)
        cand_s = jnp.concatenate([kept_s, s_qb.astype(jnp.float32)], axis=1)
        ok = jnp.concatenate([kept_i >= 0, real], axis=1) & (sign * cand_s > 0)
        neg_key = jnp.where(ok, -sign * cand_s, jnp.inf)
        tie = jnp.where(ok, cand_i, jnp.iinfo(jnp.int32).max)
        _, take_i, take_s, take_ok = jax.lax.sort((neg_key, tie, cand_s, ok), dimension=1,
                                                  num_keys=2)
        out[f"{side}_index"] = jnp.where(take_ok[:, :k], take_i[:, :k], -1)
        out[f"{side}_score"] = jnp.where(take_ok[:, :k], take_s[:, :k], 0.0)
    return out


def self_scores(lm: LMFunctions, rows: TokenizedSet, factors: OperatorFactors,
                cfg: ClosedFormConfig, *, mesh=None, progress: bool = False) -> np.ndarray:
    """``[rows]`` each row's ``|g~_i|^2`` (its closed-form self-influence), streamed: never the
    ``[rows, D k]`` gradients at once."""
    lm = reader_lm(lm, cfg, factors.site)
    def build():
        rows_fn = _rows_fn(lm, factors.site, compute_dtype(cfg), cfg.norm_power)

        @jax.jit
        def norms(params, t_phi, t_out, g0, *batch):
            g = rows_fn(params, t_phi, t_out, g0, *batch)[0]
            return jnp.einsum("bd,bd->b", g, g)
        return norms

    fn = _kernel("norms", lm, factors.site, compute_dtype(cfg), build=build)
    t_phi, t_out = _device_transforms(factors)
    g0 = _placed(jnp.zeros((1, factors.dim), jnp.float32), mesh)
    out = np.empty(len(rows), np.float32)

    def step(acc, batch, lo, hi):
        acc[lo:hi] = np.asarray(fn(lm.params, t_phi, t_out, g0, *batch))[: hi - lo]
        return acc

    return row_pass(rows, cfg, step, out, mesh=mesh, progress=progress, desc="self-influence",
                    with_range=True)


def token_scores(lm: LMFunctions, queries: TokenizedSet, factors: OperatorFactors,
                 g_train: np.ndarray, cfg: ClosedFormConfig | None = None) -> np.ndarray:
    """``[Q, T, m]`` per-token shares of the scores of ``m`` training rows (their whitened
    gradients ``g_train [m, D k]``): ``scores[q, i] = sum_t out[q, t, i]`` exactly, the term of
    each scored query token in ``<g~_q, g~_i> / |g~_i|^p``."""
    cfg = cfg or ClosedFormConfig()
    lm = reader_lm(lm, cfg, factors.site)
    fn = _grad_fn(lm, factors.site, True, compute_dtype(cfg))
    t_phi, t_out = _device_transforms(factors)
    D, k = factors.t_phi.shape[1], factors.t_out.shape[1]
    g_train = np.asarray(g_train, np.float32)
    scale = norm_scale(np.einsum("md,md->m", g_train, g_train, dtype=np.float64), cfg.norm_power)
    g = jnp.asarray(g_train * scale[:, None].astype(np.float32), jnp.float32).reshape(-1, D, k)
    phi_w, e_w = fn(lm.params, t_phi, t_out, *_batch_arrays(queries, np.arange(len(queries))))
    return np.asarray(jnp.einsum("qtd,qtk,mdk->qtm", phi_w, e_w, g))


# ----------------------------------------------------------------------------------------------
# A resumable pass over rows
# ----------------------------------------------------------------------------------------------

def _batch_arrays(rows: TokenizedSet, idx: np.ndarray, weight: np.ndarray | None = None):
    """One batch's host arrays: input ids, attention mask, targets and the (weighted) loss
    mask. Only the batch's rows are read (a memory-mapped set is never read whole)."""
    ids = np.asarray(rows.input_ids[idx])
    loss_mask = rows.loss_mask[idx].astype(np.float32)
    if weight is not None:
        loss_mask = loss_mask * weight[:, None]
    targets = (np.asarray(rows.targets[idx]) if rows.targets is not None
               else np.concatenate([ids[:, 1:], ids[:, :1]], axis=1))
    return ids, np.asarray(rows.attention_mask[idx]), targets, loss_mask


def row_pass(rows: TokenizedSet, cfg: ClosedFormConfig, step: Callable, acc: Any, *, mesh=None,
             progress: bool = False, desc: str = "rows", with_range: bool = False,
             resume_path: str | Path | None = None, flush: Callable | None = None) -> Any:
    """Apply ``step`` to fixed-size batches of ``rows`` (the last padded by repeating rows with
    zero weight, so every batch compiles once), accumulating into ``acc`` (a dict of arrays or an
    array). With a ``mesh`` each batch is split over its devices. ``resume_path``: ``acc`` and
    the rows done are saved there every ``cfg.checkpoint_rows`` rows and resumed from.

    ``flush(acc) -> acc``: a step may keep its results on the device (so no batch waits for the
    host); ``flush`` brings them into ``acc`` and is called before every save and at the end.
    Each batch goes to the device(s) in one transfer."""
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
        batch = jax.device_put(batch) if mesh is None else mesh.shard(batch)
        acc = step(acc, batch, lo, hi) if with_range else step(acc, batch)
        since += hi - lo
        if resume_path is not None and (since >= cfg.checkpoint_rows) and hi < n:
            if flush is not None:
                acc = flush(acc)
            with atomic_path(resume_path) as tmp:
                with open(tmp, "wb") as f:
                    if isinstance(acc, dict):
                        np.savez(f, _rows_done=np.int64(hi), **acc)
                    else:
                        np.savez(f, _rows_done=np.int64(hi), acc=acc)
            since = 0
        if bar is not None:
            bar.update(hi - lo)
    if flush is not None:
        acc = flush(acc)
    if bar is not None:
        bar.close()
    return acc
