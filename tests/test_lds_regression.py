"""LDS regression on task (c), the digits MLP: STRIDE with its default configuration stays faithful.

The floor is set from measurement, not tuned: on this task (n = 1000, 100 queries) STRIDE's
default (closed-form operators with the training-side norm power 0.5, deterministic: no
operator seed to vary it) measured LDS 0.627 against the 128 retrains used here (95% CI
0.598-0.658) and 0.632 against 256 (benchmarks/results/closed_form_sweep.json); without the
norm power it measured 0.517 here (CI 0.483-0.550), the trained operators it replaced 0.461. The
test fails if the LDS drops below 0.59 (just under the lower end of that CI: float rounding on
another CPU moves it by far less; the previous default's 0.517 fails it), or below the
representation-similarity baseline (0.16 here).
"""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")

from stride_jax.eval.groundtruth import GroundTruthConfig, run_groundtruth  # noqa: E402
from stride_jax.eval.metrics import lds  # noqa: E402
from stride_jax.eval.suite import TaskConfig, build_task, run_method  # noqa: E402

LDS_FLOOR = 0.59


def test_stride_lds_on_digits_is_above_the_floor_and_repsim():
    cfg = TaskConfig(kind="digits")
    task = build_task(cfg)
    gt = run_groundtruth(task.retrain, n=task.n, num_queries=task.num_queries, progress=False,
                         cfg=GroundTruthConfig(num_subsets=128, alpha=0.3, parallel=64))
    stride = lds(run_method("stride", task, cfg).scores_qn, gt.masks_sn, gt.losses_sq)
    repsim = lds(run_method("repsim", task, cfg).scores_qn, gt.masks_sn, gt.losses_sq)
    print(f"STRIDE {stride}; repsim {repsim}")
    assert stride.mean >= LDS_FLOOR, stride.format()
    assert stride.mean > repsim.mean, (stride.format(), repsim.format())
