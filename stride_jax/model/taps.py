r"""Named dense-layer taps: read a dense layer's input and perturb its output, without copying it.

Curvature methods (K-FAC, EK-FAC) need, for every dense layer ``y = x W (+ b)`` and every token,
the layer input ``x`` and the gradient of the loss with respect to the output ``y``. Both come
from one forward and one backward pass by the *perturbation trick*: the forward pass adds a zero
"probe" ``p`` to each tapped output, ``y' = y + p``, and returns the inputs ``x`` as an auxiliary
output; then

.. math::

    \frac{\partial L}{\partial p} = \frac{\partial L}{\partial y}

evaluated at ``p = 0`` is exactly the output gradient, per token, for the whole batch at once
(no per-example loop, no per-example parameter gradient). The per-example weight gradient is
then ``G_i = sum_t g_{it} x_{it}^T``.

A tap is a named hook point in the forward pass (like the steering sites of
:mod:`stride_jax.model.transformer`): stride-jax's :class:`~stride_jax.model._layers.Dense` calls
:func:`tap` on every call, and a model written by hand marks its dense layers with
:func:`dense`. With no :class:`Recorder` active (always, outside curvature methods) a tap returns
``y`` unchanged, so the model computes bit for bit what it computes without taps. The active
recorder lives in a context variable for the duration of one traced call (:func:`recording`), so
it never outlives the trace that created it.

Names: :func:`dense` takes its name; a ``Dense`` module is named by its attribute path in the
model (``layers.0.attn.q_proj``), which :func:`module_names` computes from the merged module.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax

from stride_jax.errors import ModelError

__all__ = ["LayerShape", "Recorder", "dense", "module_names", "name_modules", "recording", "tap",
           "trace_shapes"]


class LayerShape(NamedTuple):
    """A tapped dense layer: input and output widths, and whether it adds a bias."""

    d_in: int
    d_out: int
    bias: bool


_ACTIVE: contextvars.ContextVar["Recorder | None"] = contextvars.ContextVar(
    "stride_jax_dense_recorder", default=None)


class Recorder:
    """Collects tapped layers during one traced forward pass.

    Args:
      probes: layer name -> zero array shaped like that layer's output, added to it (the
        gradient of the loss with respect to a probe is the output gradient); layers without a
        probe are recorded (shape) but not perturbed, and their inputs are not kept.
      names: ``id(module) -> name`` for modules that tap themselves (:func:`module_names`).
    """

    def __init__(self, probes: Mapping[str, jax.Array] | None = None,
                 names: Mapping[int, str] | None = None):
        self.probes = dict(probes or {})
        self.names = dict(names or {})
        self.inputs: dict[str, jax.Array] = {}
        self.shapes: dict[str, LayerShape] = {}
        self.out_shapes: dict[str, tuple[int, ...]] = {}

    def __call__(self, owner: Any, x: jax.Array, y: jax.Array, bias: bool) -> jax.Array:
        name = owner if isinstance(owner, str) else self.names.get(id(owner))
        if name is None:
            return y
        if name in self.shapes:
            raise ModelError(f"dense layer {name!r} ran twice in one forward pass; curvature "
                             f"factors need each tapped layer used once (shared weights are "
                             f"not supported): leave it out of the covered layers")
        self.shapes[name] = LayerShape(int(x.shape[-1]), int(y.shape[-1]), bool(bias))
        self.out_shapes[name] = tuple(int(d) for d in y.shape)
        probe = self.probes.get(name)
        if probe is None:
            return y
        if probe.shape != y.shape:
            raise ModelError(f"probe for {name!r} has shape {probe.shape}, the layer's output "
                             f"{y.shape}")
        self.inputs[name] = x
        return y + probe.astype(y.dtype)


def tap(owner: Any, x: jax.Array, y: jax.Array, bias: bool = False) -> jax.Array:
    """The hook point of one dense layer: ``y`` itself unless a :class:`Recorder` is active.

    ``owner`` is the layer's name (a string) or the module object (named through the recorder's
    ``names``); ``bias`` says whether ``y`` includes a bias (then curvature methods append a
    constant 1 to the input).
    """
    rec = _ACTIVE.get()
    return y if rec is None else rec(owner, x, y, bias)


def dense(name: str, x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """``x @ kernel (+ bias)`` as a named, tapped dense layer (for hand-written models).

    ``kernel`` is ``[d_in, d_out]``; ``x`` any ``[..., d_in]``.
    """
    y = x @ kernel
    if bias is not None:
        y = y + bias
    return tap(name, x, y, bias is not None)


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[Recorder]:
    """Make ``recorder`` the active one for the calls inside the ``with`` block."""
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)


def module_names(module: Any, kind: type | None = None) -> dict[int, str]:
    """``id(submodule) -> dotted attribute path`` for every submodule of type ``kind`` (default:
    the modules that tap themselves, whose class sets ``taps_itself = True``, as stride-jax's
    ``Dense``) of an ``nnx`` module, e.g. ``layers.0.mlp.down_proj``."""
    from flax import nnx

    def wanted(m: Any) -> bool:
        # A class attribute, not an import of the layers: they import this module.
        return isinstance(m, kind) if kind is not None else getattr(type(m), "taps_itself", False)

    return {id(m): ".".join(str(p) for p in path) for path, m in nnx.iter_graph(module)
            if wanted(m)}


def name_modules(module: Any) -> None:
    """Name ``module``'s ``Dense`` submodules in the active recorder (no-op without one); call it
    on the merged module inside the traced forward pass, before running it."""
    rec = _ACTIVE.get()
    if rec is not None:
        rec.names.update(module_names(module))


def trace_shapes(fn: Callable[..., Any], *args: Any) -> tuple[dict[str, LayerShape],
                                                              dict[str, tuple]]:
    """The tapped layers a forward pass runs, in call order: ``(name -> LayerShape, name ->
    output shape)``, by abstract evaluation of ``fn(*args)`` (no computation; ``args`` may be
    ``jax.ShapeDtypeStruct``) under a recorder without probes."""
    rec = Recorder()

    def run(*a):
        with recording(rec):
            return fn(*a)

    jax.eval_shape(run, *args)
    return dict(rec.shapes), dict(rec.out_shapes)

