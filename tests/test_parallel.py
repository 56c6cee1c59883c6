"""8 fake CPU devices == 1 device: operator training, measurement and recovery sharded over the
subset axis give the same operators, responses and scores, and the arrays really are sharded.

The device count is fixed when JAX starts, so the comparison runs in a fresh interpreter with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (tests/_parallel_worker.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_parallel_worker.py")


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", STRIDE_JAX_CACHE="off")
    proc = subprocess.run([sys.executable, str(WORKER), "logits", "residual"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


@pytest.mark.parametrize("site", ["logits", "residual"])
def test_eight_devices_equal_one(report, site):
    r = report[site]
    assert r["devices"] == 8
    # Sharded as intended: K=32 operators split 4 per device along the subset axis.
    assert r["coef_sharding_8"] == "P('subsets',)" and r["coef_devices_8"] == 8
    assert r["coef_shard_shape"][0] == 4
    assert r["coef_devices_1"] == 1
    # Only the order of float32 reductions differs (the basis gradient is summed across
    # devices), so operators and responses agree to ~1e-4 relative; the recovery (ridge with a
    # refined cross-validated alpha) is continuous in the responses, hence 1e-3 relative on the
    # scores.
    assert r["coef_max_abs_diff"] <= 1e-4 * r["coef_max_abs"]
    assert r["y_max_abs_diff"] <= 1e-4 * r["y_max_abs"]
    assert r["scores_max_abs_diff"] <= 1e-3 * r["scores_max_abs"]
    assert r["scores_nonzero"] > 0


def test_closed_form_on_eight_devices_equals_one(report):
    # The default path: each batch of rows split over the devices, the factor sums reduced by
    # XLA; only the order of float32 sums differs, and the scores are continuous in them.
    r = report["logits"]
    assert r["cf_scores_max_abs"] > 0
    assert r["cf_scores_max_abs_diff"] <= 1e-4 * r["cf_scores_max_abs"]


def test_device_count_must_divide_the_subset_axis(report):
    msg = report["logits"]["indivisible_error"]
    assert msg is not None and "train.subsets_per_step=12 not divisible by the 8 devices" in msg
    assert "use a multiple of 8" in msg
    msg = report["logits"]["too_many_error"]
    assert msg is not None and "parallel.devices=16 but this process sees 8" in msg
    assert "xla_force_host_platform_device_count=16" in msg


def test_solver_splits_queries_over_devices(report):
    r = report["logits"]
    # Each chunk of queries is split over the 8 devices along the query axis.
    assert r["query_spec"] == "P(None, 'queries')" and r["query_devices"] == 8
    # Same estimator per query and the same scores, lambda chosen by cross-validation included.
    assert r["solver_estimators_equal"]
    assert r["solver_max_abs_diff"] <= 1e-3 * r["solver_max_abs"]


def test_fsdp_splits_the_base_model_and_changes_nothing(report):
    r = report["logits"]
    # The 96 x 32 embedding is split 8 ways along its vocabulary axis: 12 rows per device.
    assert r["fsdp_weight_spec"] == "P('subsets', None)" and r["fsdp_shard_shape"] == [12, 32]
    # Under FSDP every matmul of the base forward is partitioned, so far more reductions change
    # order than with a replicated model; Adam's per-coordinate normalisation turns such
    # differences on near-zero gradients into coefficient differences up to ~lr per step, hence
    # 1e-3 relative on the coefficients. What the operators are for, their responses and the
    # scores, keeps the replicated bounds.
    assert r["fsdp_coef_max_abs_diff"] <= 1e-3 * r["coef_max_abs"]
    assert r["fsdp_y_max_abs_diff"] <= 1e-4 * r["y_max_abs"]
    assert r["fsdp_scores_max_abs_diff"] <= 1e-3 * r["scores_max_abs"]


def test_unknown_model_placement_is_refused():
    from stride_jax.parallel import ParallelConfig
    with pytest.raises(ValueError, match="parallel.model must be 'auto', 'replicate' or 'fsdp'"):
        ParallelConfig(model="shard")
