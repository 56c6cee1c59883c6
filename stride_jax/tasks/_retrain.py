"""One training recipe for the attributed model and for all its ground-truth retrains.

The LDS compares attribution scores with models retrained on subsets "with the same recipe and
initialisation". The surest way to keep the two identical is to run them through the same code:
:class:`Trainer` trains a pytree of parameters from a fixed initialisation on a list of training
indices, with the data order ``batch_schedule(m, optim, key)`` (positions inside the subset), the
optimiser :func:`stride_jax.recipes.pretrain.make_optimizer`, and the steps inside ``lax.scan``.
The attributed model is ``train(arange(n))``; retrains vmap the same function over ``[p, m]``
subsets with the initial parameters broadcast, so ``p`` retrains share one compile.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stride_jax.recipes.pretrain import OptimConfig, batch_schedule, lr_schedule, make_optimizer

LossFn = Callable[[Any, Any], jax.Array]     # (params, batch pytree) -> scalar
EvalFn = Callable[[Any], jax.Array]          # params -> query losses [Q]


class Trainer:
    """Train ``init_params`` on rows of ``data`` (a pytree of arrays with a leading row axis).

    Args:
      loss_fn: mean loss of a batch (``batch`` = ``data`` gathered at the batch's rows).
      init_params: the fixed initialisation (pretraining: ``init(seed)``; fine-tuning: the base).
      data: the whole training set; it is put on the device once.
      optim: batch size, epochs and optimiser; steps = ceil(epochs * m / batch_size).
      key: the data-order key (the attributed model's own).
      eval_fn: the query losses ``[Q]`` of a parameter pytree.
    """

    def __init__(self, loss_fn: LossFn, init_params: Any, data: Any, optim: OptimConfig, *,
                 key: jax.Array, eval_fn: EvalFn):
        self.loss_fn, self.init_params, self.optim, self.key = loss_fn, init_params, optim, key
        self.data = jax.tree.map(jnp.asarray, data)
        self.n = int(jax.tree.leaves(self.data)[0].shape[0])
        self.eval_fn = eval_fn
        self._retrain: dict[tuple[int, int], Callable] = {}

    def schedule(self, m: int) -> np.ndarray:
        """``[steps, batch]`` positions inside a subset of ``m`` rows."""
        return batch_schedule(m, self.optim, key=self.key)

    def _scan(self, params, opt_state, subset_m, schedule_sb, tx):
        def step(carry, pos_b):
            p, s = carry
            batch = jax.tree.map(lambda a: a[subset_m[pos_b]], self.data)
            loss, grads = jax.value_and_grad(self.loss_fn)(p, batch)
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), loss

        return jax.lax.scan(step, (params, opt_state), schedule_sb)

    def train(self, subset: np.ndarray | None = None, *, checkpoints: int = 1):
        """Train on ``subset`` (default: all rows).

        Returns ``(params, losses [steps], ckpts, lrs)``: ``ckpts`` are ``checkpoints`` evenly
        spaced parameter pytrees (the last is ``params``) and ``lrs`` the learning rate at each,
        for TracIn. Segments share one scan body, so the result equals a single scan.
        """
        subset = np.arange(self.n) if subset is None else np.asarray(subset)
        sched = self.schedule(len(subset))
        steps = len(sched)
        tx = make_optimizer(self.optim, steps)
        sub = jnp.asarray(subset, jnp.int32)
        segment = jax.jit(lambda p, s, sch: self._scan(p, s, sub, sch, tx))
        bounds = np.linspace(0, steps, max(1, checkpoints) + 1).round().astype(int)
        lr = lr_schedule(self.optim, steps)
        params, opt_state = self.init_params, tx.init(self.init_params)
        ckpts, lrs, losses = [], [], []
        for a, b in zip(bounds[:-1], bounds[1:]):
            (params, opt_state), seg_loss = segment(params, opt_state, jnp.asarray(sched[a:b]))
            losses.append(np.asarray(seg_loss))
            ckpts.append(params)
            lrs.append(float(lr(max(int(b) - 1, 0))))
        return params, np.concatenate(losses), ckpts, lrs

    def retrain_losses(self, subsets_pm: np.ndarray) -> np.ndarray:
        """Query losses ``[p, Q]`` of ``p`` models retrained on the rows of each subset."""
        subsets_pm = np.asarray(subsets_pm, np.int32)
        shape = subsets_pm.shape
        if shape not in self._retrain:
            sched = jnp.asarray(self.schedule(shape[1]))
            tx = make_optimizer(self.optim, len(sched))

            def one(sub):
                (params, _), _ = self._scan(self.init_params, tx.init(self.init_params), sub,
                                            sched, tx)
                return self.eval_fn(params)

            self._retrain[shape] = jax.jit(jax.vmap(one))
        return np.asarray(self._retrain[shape](jnp.asarray(subsets_pm)), np.float64)
