r"""K-FAC and EK-FAC influence functions in JAX, for any model whose dense layers are tapped.

Influence of training example ``i`` on query ``q`` (Grosse et al. 2023, "Studying Large Language
Model Generalization with Influence Functions"; the algorithm as kronfluence implements it):

.. math::

    s_{qi} = \nabla \ell_q^T \, (\hat F + \lambda I)^{-1} \, \nabla L_i ,

with ``l_q`` the query's mean per-token loss (nats per token), ``L_i`` the *summed* token loss of
training example ``i`` (true labels), and ``F`` the Fisher of the per-token training loss
restricted to the covered dense layers and approximated block-diagonally, one block per layer.

**Sign and units** (the project's convention): ``s_qi > 0`` means training on ``i`` lowers the
query's loss. Adding example ``i`` to a training objective that averages ``N`` token losses moves
the parameters by ``-(1/N) F^{-1} grad L_i``, so to first order the query's mean loss changes by
``-s_qi / N`` nats per token.

**Factors** of a dense layer ``y = x W (+ b)`` (bias as an extra input column of ones), from the
layer inputs ``a_t`` and output gradients ``g_t`` of every token of the training set:

.. math::

    A = \frac{1}{T} \sum_t a_t a_t^T, \qquad S = \frac{1}{T} \sum_t g_t g_t^T, \qquad
    A = Q_A \, \mathrm{diag}(e_A) \, Q_A^T, \quad S = Q_S \, \mathrm{diag}(e_S) \, Q_S^T,

(``T`` the number of real tokens, padding excluded from ``A``), with the output gradients of the
loss at labels *sampled from the model's own predictive distribution* (the true Fisher;
``fisher="empirical"`` uses the data labels). K-FAC preconditions a layer's gradient matrix
``G [out, in]`` in the Kronecker eigenbasis with the eigenvalue products:

.. math::

    \tilde G = Q_S^T G Q_A, \qquad P = Q_S \big(\tilde G \oslash (\Lambda + \lambda)\big) Q_A^T,
    \qquad \Lambda_{oi} = e_{S,o} \, e_{A,i} \quad \text{(K-FAC)}.

EK-FAC (George et al. 2018) replaces ``Lambda`` by the second moment of the per-example
gradients in that basis, ``Lambda_oi = (1/n) sum_i (Q_S^T G_i Q_A)_oi^2``, from a second pass
over the training set (sampled labels again). Damping ``lambda`` defaults to ``0.1 x mean(Lambda)``
per layer. Since ``Q_S`` and ``Q_A`` are orthogonal, the score never leaves the eigenbasis:

.. math::

    s_{qi} = \sum_{\text{layers}} \big\langle \tilde G_q \oslash (\Lambda + \lambda),\,
    \tilde G_i \big\rangle, \qquad \tilde G_i = \sum_t (Q_S^T g_{it}) (Q_A^T a_{it})^T .

**How it runs.** A model is a :class:`TokenModel`: parameters and a forward pass to per-position
logits whose dense layers are tapped (:mod:`stride_jax.model.taps`: stride-jax's ``Dense`` layers
are, hand-written models call ``taps.dense``). Each pass over the data takes one forward and one
backward per chunk of ``batch_size`` rows, by the perturbation trick (a zero probe added to every
covered layer's output; the gradient with respect to it is the per-token output gradient),
jitted once per pass; no per-example loop, no per-example parameter gradient outside the covered
layers. The last chunk is filled by wrapping around, with weight 0 on the filler rows. Label
draws use ``fold_in(key, row)``, so they do not depend on the chunking. Sums are accumulated in
float64 on the host; eigendecompositions are float64. The fitting passes are resumable: given a
``directory`` they save their running sums atomically every ``checkpoint_every`` chunks and a
rerun continues from the last save, with bitwise the same result.

Covered layers (``layers``): ``"blocks"`` (default; every dense layer inside a numbered block,
``layers.<i>.``, as the kronfluence peer runs: attention q/k/v/o and the MLP; a model without
numbered blocks: every tapped layer), ``"all"`` (adds e.g. an untied ``lm_head``), ``"mlp"``,
``"attn"``, or a regular expression searched in the layer names.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax.errors import ConfigError, DataError, ModelError, NonFiniteError
from stride_jax.model.taps import LayerShape, Recorder, recording, trace_shapes

__all__ = ["Factors", "TokenModel", "causal_lm_token_model", "fit_factors", "layer_names",
           "precondition_scale", "scores", "select_layers"]

log = logging.getLogger(__name__)

Strategy = Literal["ekfac", "kfac"]
_HIGHEST = jax.lax.Precision.HIGHEST
_BLOCK = re.compile(r"(^|\.)(layers|h|blocks)\.\d+\.")


class TokenModel(NamedTuple):
    """What K-FAC / EK-FAC need of a model.

    Attributes:
      params: the parameter pytree (the covered layers' weights among them).
      logits: ``(params, batch) -> [B, T, V]`` per-position logits (any float dtype), with the
        dense layers tapped; ``batch`` is a dict of ``[B, ...]`` arrays from :attr:`prepare`.
      prepare: ``examples -> batch dict`` of numpy arrays with a leading example axis, holding
        what ``logits`` reads plus ``"targets"`` (int ``[n, T]``: the label scored at each
        position), ``"loss_mask"`` (``[n, T]``: which positions are scored) and ``"token_mask"``
        (``[n, T]``: real tokens, for the input covariance).
    """

    params: Any
    logits: Callable[[Any, Mapping[str, jax.Array]], jax.Array]
    prepare: Callable[[Any], dict[str, np.ndarray]]


def causal_lm_token_model(model: Any) -> TokenModel:
    """A stride-jax :class:`~stride_jax.model.CausalLM` (Llama, Qwen2, GPT-2 families) as a
    :class:`TokenModel`; examples are ``{"input_ids", "attention_mask", "loss_mask"}`` (and
    optionally ``"targets"``) ``[n, L]`` arrays, e.g. ``baselines.gradient.rows_as_examples``.
    Position ``t`` predicts ``input_ids[t + 1]`` unless targets are given."""
    from flax import nnx

    from stride_jax.model.taps import name_modules
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def logits(p, batch):
        m = nnx.merge(graphdef, p, rest)
        name_modules(m)
        return m(batch["input_ids"], batch["attention_mask"])

    def prepare(ex):
        # No copies of int32 (possibly memory-mapped) rows: chunks are gathered from them; only
        # the shifted targets are a new [n, L] array.
        ids = np.asarray(ex["input_ids"], np.int32)
        att = np.asarray(ex["attention_mask"], np.int32)
        if "targets" in ex:
            targets = np.asarray(ex["targets"], np.int32)
        else:
            targets = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)
        return {"input_ids": ids, "attention_mask": att, "targets": targets,
                "loss_mask": np.asarray(ex["loss_mask"], np.int32), "token_mask": att}

    return TokenModel(params, logits, prepare)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------
def _first_batch(batch: Mapping[str, np.ndarray], size: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct((size,) + v.shape[1:], v.dtype) for k, v in batch.items()}


def layer_names(tm: TokenModel, batch: Mapping[str, np.ndarray], size: int = 1
                ) -> tuple[dict[str, LayerShape], dict[str, tuple]]:
    """Every tapped dense layer of the model's forward pass, in call order, with its shape and
    its output shape for a chunk of ``size`` rows (abstract evaluation, no computation)."""
    spec = _first_batch(batch, size)
    return trace_shapes(lambda b: tm.logits(tm.params, b), spec)


def select_layers(names: Sequence[str], spec: str) -> list[str]:
    """The covered layers among ``names`` (in their order) for ``spec`` (module docstring)."""
    names = list(names)
    if not names:
        raise ModelError("the model has no tapped dense layers: K-FAC/EK-FAC need dense layers "
                         "marked with stride_jax.model.taps (stride-jax's Dense layers are)")
    blocks = [n for n in names if _BLOCK.search(n)]
    if spec == "all":
        chosen = names
    elif spec == "blocks":
        chosen = blocks or names
    elif spec in ("mlp", "attn"):
        chosen = [n for n in blocks if f".{spec}." in f".{n}."]
    else:
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise ConfigError(f"layers={spec!r} is neither blocks, all, mlp, attn nor a valid "
                             f"regular expression ({e})") from None
        chosen = [n for n in names if pattern.search(n)]
    if not chosen:
        shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
        raise ConfigError(f"layers={spec!r} matches none of the model's {len(names)} dense layers "
                         f"({shown}); use blocks, all, mlp, attn or a regular expression")
    return chosen


# ---------------------------------------------------------------------------------------------
# Factors
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Factors:
    """Per covered layer: the eigenbases ``q_a [I, I]``, ``q_s [O, O]`` (``I`` counts the bias
    column), their eigenvalues ``e_a [I]``, ``e_s [O]`` (float64), and for EK-FAC the corrected
    eigenvalues ``lam [O, I]`` (None until the second pass). ``tokens`` and ``rows`` count the
    data the factors were fitted on."""

    layers: tuple[str, ...]
    q_a: dict[str, np.ndarray]
    q_s: dict[str, np.ndarray]
    e_a: dict[str, np.ndarray]
    e_s: dict[str, np.ndarray]
    lam: dict[str, np.ndarray] | None
    tokens: float
    rows: int

    def save(self, path: str | Path) -> None:
        """One safetensors file (``q_a/<layer>``, ``q_s/..``, ``e_a/..``, ``e_s/..``, ``lam/..``)."""
        from stride_jax.io.safetensors import save_file
        tensors = {}
        for part in ("q_a", "q_s", "e_a", "e_s") + (("lam",) if self.lam is not None else ()):
            for name, arr in getattr(self, part).items():
                tensors[f"{part}/{name}"] = np.asarray(arr, np.float64)
        save_file(tensors, path, metadata={"layers": "\n".join(self.layers),
                                           "tokens": repr(float(self.tokens)),
                                           "rows": str(int(self.rows))})

    @classmethod
    def load(cls, path: str | Path) -> "Factors":
        from stride_jax.io.safetensors import load_file, read_header
        _, meta = read_header(path)
        tensors = load_file(path)
        layers = tuple(meta["layers"].split("\n"))
        parts = {p: {n: tensors[f"{p}/{n}"] for n in layers if f"{p}/{n}" in tensors}
                 for p in ("q_a", "q_s", "e_a", "e_s", "lam")}
        return cls(layers, parts["q_a"], parts["q_s"], parts["e_a"], parts["e_s"],
                   parts["lam"] or None, float(meta["tokens"]), int(meta["rows"]))


def precondition_scale(factors: Factors, strategy: Strategy, *, damping: float | None = None,
                       damping_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """``1 / (Lambda + lambda)`` per layer, ``[O, I]`` float64; ``Lambda`` is the EK-FAC corrected
    eigenvalues or the K-FAC products ``e_S e_A^T``; ``lambda = damping`` or, when None,
    ``damping_fraction * mean(Lambda)`` per layer."""
    if strategy not in ("ekfac", "kfac"):
        raise ConfigError(f"strategy must be 'ekfac' or 'kfac', got {strategy!r}")
    if strategy == "ekfac" and factors.lam is None:
        raise ConfigError("EK-FAC needs the corrected eigenvalues (fit_factors(strategy='ekfac'))")
    if damping is not None and not (math.isfinite(damping) and damping >= 0):
        raise ConfigError(f"damping must be a finite number >= 0 or null, got {damping!r}")
    if not (math.isfinite(damping_fraction) and damping_fraction > 0):
        raise ConfigError(f"damping_fraction must be a finite number > 0, got {damping_fraction!r}")
    out = {}
    for name in factors.layers:
        lam = (factors.lam[name] if strategy == "ekfac"
               else np.outer(factors.e_s[name], factors.e_a[name]))
        d = damping if damping is not None else damping_fraction * float(np.mean(lam))
        denom = lam + d
        if not (np.isfinite(denom).all() and (denom > 0).all()):
            raise ConfigError(f"layer {name}: the damped curvature is not positive (damping "
                             f"{d:.3g}); pass a larger damping")
        out[name] = 1.0 / denom
    return out


# ---------------------------------------------------------------------------------------------
# One pass: forward + backward with probes, per chunk
# ---------------------------------------------------------------------------------------------
def _sample_labels(key: jax.Array, rows: jax.Array, logp_btv: jax.Array) -> jax.Array:
    """One label per position drawn from ``softmax(logits)`` by inverting the CDF with one
    uniform per position, from ``fold_in(key, row)`` (independent of the chunking). One uniform
    per position instead of the ``V`` Gumbel draws of ``jax.random.categorical``: on a CPU the
    random bits, not the model, would otherwise dominate the pass."""
    u_bt = jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(key, r),
                                                 logp_btv.shape[1:2]))(rows)
    cdf = jnp.cumsum(jnp.exp(logp_btv), axis=-1)
    below = (cdf < u_bt[..., None] * cdf[..., -1:]).sum(-1)   # scaled: the CDF may end at 1 - eps
    return jnp.minimum(below, logp_btv.shape[-1] - 1).astype(jnp.int32)


class _Pass:
    """Jitted chunk functions over the covered layers of one model.

    One compiled forward + backward (:meth:`_capture`) serves every pass: whether labels are
    sampled and whether a row's loss is averaged are traced flags, not static arguments, so the
    model's graph compiles once per chunk shape; the reductions of each pass (covariances,
    eigenbasis second moments, preconditioning, score contraction) are small separate jits.
    """

    def __init__(self, tm: TokenModel, layers: Sequence[str], shapes: Mapping[str, LayerShape]):
        self.tm, self.layers, self.shapes = tm, list(layers), dict(shapes)
        self.capture = jax.jit(self._capture)
        self.covariances = jax.jit(self._covariances)
        self.second_moments = jax.jit(lambda a, g, qa, qs: {
            n: jnp.square(r).sum(0) for n, r in self._rot(a, g, qa, qs).items()})
        self.preconditioned = jax.jit(lambda a, g, qa, qs, scale: {
            n: r * scale[n] for n, r in self._rot(a, g, qa, qs).items()})
        self.contract = jax.jit(lambda a, g, qa, qs, pq: sum(
            jnp.einsum("qoi,boi->qb", pq[n], r, precision=_HIGHEST)
            for n, r in self._rot(a, g, qa, qs).items()))

    def run(self, params, batch, valid, rows, key, *, sample: bool, mean: bool):
        """``(a, g, masks)`` of a chunk (see :meth:`_capture`)."""
        return self.capture(params, batch, valid, rows, key, jnp.asarray(sample),
                            jnp.asarray(mean))

    def _capture(self, params, batch, valid, rows, key, sample, mean):
        """Per covered layer: inputs ``a [B, M, I']`` (bias column appended), output gradients
        ``g [B, M, O]`` and the mask ``[B, M]`` of real tokens in real rows, from one forward and
        one backward pass (zero probes on the outputs, see :mod:`stride_jax.model.taps`). The
        loss of a row is its summed token loss at sampled labels (``sample``: the true Fisher)
        or at the data's, divided by its scored positions when ``mean``."""
        tm = self.tm
        bsz = valid.shape[0]
        _, out_shapes = trace_shapes(lambda b: tm.logits(params, b), batch)
        probes = {n: jnp.zeros(out_shapes[n], jnp.float32) for n in self.layers}

        def loss(probes):
            rec = Recorder(probes)
            with recording(rec):
                logits = tm.logits(params, batch)
            logits = logits.astype(jnp.float32)
            if logits.ndim != 3:
                raise ModelError(f"the model's logits have shape {logits.shape}; K-FAC needs "
                                 f"[batch, positions, classes]")
            logp = jax.nn.log_softmax(logits, axis=-1)
            drawn = _sample_labels(key, rows, jax.lax.stop_gradient(logp))
            targets = jnp.where(sample, drawn, batch["targets"].astype(jnp.int32))
            nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
            w = batch["loss_mask"].astype(jnp.float32) * valid[:, None]
            per_row = (nll * w).sum(1)
            per_row = jnp.where(mean, per_row / jnp.maximum(w.sum(1), 1.0), per_row)
            return per_row.sum(), rec.inputs

        g, inputs = jax.grad(loss, has_aux=True)(probes)
        token_mask = batch["token_mask"].astype(jnp.float32)
        a_out, g_out, masks = {}, {}, {}
        for n in self.layers:
            a = inputs[n].astype(jnp.float32)
            a = a.reshape(bsz, -1, a.shape[-1])
            if self.shapes[n].bias:
                a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)
            positions = a.shape[1]
            if positions == token_mask.shape[1]:
                masks[n] = token_mask * valid[:, None]
            elif positions == 1:     # one vector per row (e.g. an MLP on a feature vector)
                masks[n] = valid[:, None]
            else:
                raise ModelError(f"layer {n}: {positions} positions per row, but the rows have "
                                 f"{token_mask.shape[1]} tokens")
            a_out[n] = a
            g_out[n] = g[n].astype(jnp.float32).reshape(bsz, -1, g[n].shape[-1])
        return a_out, g_out, masks

    def _covariances(self, a, g, masks):
        out = {}
        for n in self.layers:
            am = a[n] * masks[n][..., None]
            out["a/" + n] = jnp.einsum("bti,btj->ij", am, am, precision=_HIGHEST)
            out["s/" + n] = jnp.einsum("bto,btp->op", g[n], g[n], precision=_HIGHEST)
            out["tokens/" + n] = masks[n].sum()
        return out

    def _rot(self, a, g, qa, qs):
        """Per-example gradients in the Kronecker eigenbasis, ``[B, O, I]`` per layer."""
        out = {}
        for n in self.layers:
            ar = jnp.einsum("bti,ij->btj", a[n], qa[n], precision=_HIGHEST)
            gr = jnp.einsum("bto,op->btp", g[n], qs[n], precision=_HIGHEST)
            out[n] = jnp.einsum("bto,bti->boi", gr, ar, precision=_HIGHEST)
        return out


def _chunks(batch: Mapping[str, np.ndarray], n: int, size: int, start: int = 0
            ) -> Iterator[tuple[int, int, dict[str, jax.Array], jax.Array, jax.Array]]:
    """``(start, real rows, chunk, valid [size], row indices [size])`` of chunks of exactly
    ``size`` rows (one compiled shape); a short chunk is filled by wrapping around, the filler
    rows weighted 0."""
    for s in range(start, n, size):
        idx = np.arange(s, s + size) % n
        real = min(size, n - s)
        valid = (np.arange(size) < real).astype(np.float32)
        yield (s, real, {k: jnp.asarray(v[idx]) for k, v in batch.items()},
               jnp.asarray(valid), jnp.asarray(idx.astype(np.int32)))


def _check_batch(batch: Mapping[str, np.ndarray], what: str) -> int:
    for key in ("targets", "loss_mask", "token_mask"):
        if key not in batch:
            raise ModelError(f"the {what} batch lacks {key!r}; TokenModel.prepare must add it")
    sizes = {int(np.shape(v)[0]) for v in batch.values()}
    if len(sizes) != 1:
        raise DataError(f"the {what} arrays disagree on the number of rows: {sorted(sizes)}")
    n = sizes.pop()
    if n == 0:
        raise DataError(f"the {what} set is empty")
    return n


def _finite(arrays: Mapping[str, np.ndarray], what: str, start: int) -> None:
    for name, arr in arrays.items():
        if not np.isfinite(arr).all():
            raise NonFiniteError(
                f"non-finite values in {what} ({name}) in the chunk starting at row {start}; check "
                f"those rows and the model (NaN/inf weights or inputs, log(0))")


# ---------------------------------------------------------------------------------------------
# Resumable accumulation
# ---------------------------------------------------------------------------------------------
def _load_partial(path: Path | None) -> tuple[int, dict[str, np.ndarray]] | None:
    if path is None or not path.is_file():
        return None
    from stride_jax.io.safetensors import load_file, read_header
    _, meta = read_header(path)
    return int(meta["rows_done"]), load_file(path)


def _save_partial(path: Path, rows_done: int, sums: Mapping[str, np.ndarray]) -> None:
    from stride_jax.io.safetensors import save_file
    save_file(dict(sums), path, metadata={"rows_done": str(rows_done)})


def _accumulate(step: Callable, batch: Mapping[str, np.ndarray], n: int, size: int, *,
                partial: Path | None, checkpoint_every: int, progress: bool, desc: str,
                what: str) -> dict[str, np.ndarray]:
    """Sum ``step(chunk, valid, rows)`` (a dict of arrays) over the data in float64, resuming
    from and saving to ``partial``."""
    got = _load_partial(partial)
    rows_done, sums = (0, {}) if got is None else got
    if got is not None:
        log.info("%s: resuming at row %d of %d from %s", desc, rows_done, n, partial)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, initial=rows_done, desc=desc, unit="row", dynamic_ncols=True)
    since = 0
    try:
        for start, real, chunk, valid, rows in _chunks(batch, n, size, rows_done):
            out = {k: np.asarray(v, np.float64) for k, v in step(chunk, valid, rows).items()}
            _finite(out, what, start)
            for k, v in out.items():
                sums[k] = sums[k] + v if k in sums else v
            rows_done = start + real
            since += 1
            if bar is not None:
                bar.update(real)
            if partial is not None and since >= checkpoint_every and rows_done < n:
                _save_partial(partial, rows_done, sums)
                since = 0
    finally:
        if bar is not None:
            bar.close()
    return sums


def fit_factors(tm: TokenModel, examples: Any, *, strategy: Strategy = "ekfac",
                layers: str = "blocks", fisher: Literal["true", "empirical"] = "true",
                batch_size: int = 16, key: jax.Array, directory: str | Path | None = None,
                checkpoint_every: int = 64, progress: bool = False,
                covariance: Factors | None = None) -> Factors:
    """Fit the K-FAC factors (and, for EK-FAC, the corrected eigenvalues) on ``examples``.

    Two passes for EK-FAC (covariances, then eigenvalue correction), one for K-FAC; each takes
    one forward + backward per chunk of ``batch_size`` rows. Labels are drawn from the model
    (``fisher="true"``, keys ``fold_in(fold_in(key, pass), row)``) or taken from the data
    (``"empirical"``). With a ``directory``, each pass saves its running float64 sums there
    atomically every ``checkpoint_every`` chunks (``covariance.partial.safetensors``,
    ``lambda.partial.safetensors``) and resumes from them; the finished eigendecomposition is
    ``eigen.safetensors``, the finished EK-FAC factors ``factors.safetensors``. ``covariance``
    reuses a finished K-FAC fit (skips the first pass).
    """
    if strategy not in ("ekfac", "kfac"):
        raise ConfigError(f"strategy must be 'ekfac' or 'kfac', got {strategy!r}")
    if fisher not in ("true", "empirical"):
        raise ConfigError(f"fisher must be 'true' or 'empirical', got {fisher!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    batch = tm.prepare(examples)
    n = _check_batch(batch, "training")
    size = min(int(batch_size), n)
    shapes, _ = layer_names(tm, batch, size)
    chosen = select_layers(list(shapes), layers)
    engine = _Pass(tm, chosen, shapes)
    sample = fisher == "true"
    directory = Path(directory) if directory is not None else None
    eigen_path = directory / "eigen.safetensors" if directory is not None else None
    if covariance is None and eigen_path is not None and eigen_path.is_file():
        covariance = Factors.load(eigen_path)
    if covariance is None:
        log.info("K-FAC factors over %d dense layers (%s): %s", len(chosen), layers,
                 ", ".join(chosen[:6]) + (" ..." if len(chosen) > 6 else ""))
        k_cov = jax.random.fold_in(key, 0)
        sums = _accumulate(
            lambda c, v, r: engine.covariances(
                *engine.run(tm.params, c, v, r, k_cov, sample=sample, mean=False)),
            batch, n, size,
            partial=None if directory is None else directory / "covariance.partial.safetensors",
            checkpoint_every=checkpoint_every, progress=progress, desc="K-FAC covariances",
            what="the layer covariances")
        covariance = _eigendecompose(chosen, sums, n)
        if eigen_path is not None:
            covariance.save(eigen_path)
            (directory / "covariance.partial.safetensors").unlink(missing_ok=True)
    if strategy == "kfac":
        return covariance
    qa = {k: jnp.asarray(v, jnp.float32) for k, v in covariance.q_a.items()}
    qs = {k: jnp.asarray(v, jnp.float32) for k, v in covariance.q_s.items()}
    k_lam = jax.random.fold_in(key, 1)
    sums = _accumulate(
        lambda c, v, r: engine.second_moments(
            *engine.run(tm.params, c, v, r, k_lam, sample=sample, mean=False)[:2], qa, qs),
        batch, n, size,
        partial=None if directory is None else directory / "lambda.partial.safetensors",
        checkpoint_every=checkpoint_every, progress=progress, desc="EK-FAC eigenvalues",
        what="the per-example gradients")
    lam = {name: sums[name] / n for name in chosen}
    out = dataclasses.replace(covariance, lam=lam)
    if directory is not None:
        out.save(directory / "factors.safetensors")
        (directory / "lambda.partial.safetensors").unlink(missing_ok=True)
    return out


def _eigendecompose(layers: Sequence[str], sums: Mapping[str, np.ndarray], rows: int) -> Factors:
    q_a, q_s, e_a, e_s = {}, {}, {}, {}
    tokens = 0.0
    for name in layers:
        count = float(sums["tokens/" + name])
        if count <= 0:
            raise DataError(f"layer {name}: no real tokens in the training data (all "
                             f"token_mask/attention_mask zero)")
        tokens = count
        for part, q, e in (("a/", q_a, e_a), ("s/", q_s, e_s)):
            cov = sums[part + name] / count
            cov = 0.5 * (cov + cov.T)     # exact symmetry for eigh
            e[name], q[name] = np.linalg.eigh(cov)
    return Factors(tuple(layers), q_a, q_s, e_a, e_s, None, tokens, rows)


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------
def scores(tm: TokenModel, factors: Factors, train: Any, queries: Any, *,
           strategy: Strategy = "ekfac", damping: float | None = None,
           damping_fraction: float = 0.1, batch_size: int = 16, query_chunk: int | None = None,
           progress: bool = False) -> Iterator[tuple[int, np.ndarray]]:
    """Influence scores, one block of queries at a time: yields ``(q_start, scores [Qc, n])``
    float32 (module docstring for the formula, sign and units).

    Each block preconditions ``query_chunk`` query gradients (default: all queries) in the
    eigenbasis, then streams the training rows in chunks of ``batch_size``: per chunk one
    forward + backward and a contraction with the preconditioned block, so memory is
    ``O(query_chunk x covered parameters)`` beyond the model.
    """
    train_b = tm.prepare(train)
    query_b = tm.prepare(queries)
    n = _check_batch(train_b, "training")
    q = _check_batch(query_b, "query")
    size = min(int(batch_size), n)
    qc = q if query_chunk is None else max(1, min(int(query_chunk), q))
    shapes, _ = layer_names(tm, train_b, size)
    missing = [name for name in factors.layers if name not in shapes]
    if missing:
        raise ModelError(f"the factors cover layers {missing} that this model does not have; "
                         f"fit the factors on this model")
    scale = precondition_scale(factors, strategy, damping=damping,
                               damping_fraction=damping_fraction)
    engine = _Pass(tm, factors.layers, shapes)
    qa = {k: jnp.asarray(v, jnp.float32) for k, v in factors.q_a.items()}
    qs = {k: jnp.asarray(v, jnp.float32) for k, v in factors.q_s.items()}
    sc = {k: jnp.asarray(v, jnp.float32) for k, v in scale.items()}
    key = jax.random.key(0)       # unused: scores take the data's labels
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=-(-q // qc) * n, desc=f"{strategy} scores", unit="row",
                   dynamic_ncols=True)
    try:
        for q0 in range(0, q, qc):
            q_idx = np.arange(q0, min(q0 + qc, q))
            block = {k: v[q_idx] for k, v in query_b.items()}
            pieces = []
            # Chunks of the training chunk's shape: one compiled forward + backward for all.
            for start, real, chunk, valid, rows in _chunks(block, len(q_idx), size):
                a, g, _ = engine.run(tm.params, chunk, valid, rows, key, sample=False, mean=True)
                pq = engine.preconditioned(a, g, qa, qs, sc)
                pieces.append({k: v[:real] for k, v in pq.items()})
            pq = {k: jnp.concatenate([p[k] for p in pieces]) for k in factors.layers}
            _finite({k: np.asarray(v) for k, v in pq.items()}, "the query gradients", q0)
            out = np.empty((len(q_idx), n), np.float32)
            for start, real, chunk, valid, rows in _chunks(train_b, n, size):
                a, g, _ = engine.run(tm.params, chunk, valid, rows, key, sample=False,
                                     mean=False)
                s_qb = np.asarray(engine.contract(a, g, qa, qs, pq))
                if not np.isfinite(s_qb).all():
                    raise NonFiniteError(
                        f"non-finite scores for training rows {start}..{start + real - 1}; "
                        f"check those rows and the model (NaN/inf weights or inputs)")
                out[:, start:start + real] = s_qb[:, :real]
                if bar is not None:
                    bar.update(real)
            yield q0, out
    finally:
        if bar is not None:
            bar.close()
