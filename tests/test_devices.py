"""Device-aware defaults (issue 16): all devices by default, every automatic subset-axis size a
multiple of the device count, every such size checked before any work.

The real multi-device runs are in tests/test_parallel.py (8 fake CPU devices in a subprocess);
here the device count the checks see is substituted, so they run in this process in
milliseconds.
"""

from __future__ import annotations

import dataclasses

import pytest

import stride_jax.attributor as attributor
from stride_jax.attributor import AttributeConfig, DesignConfig, check_run
from stride_jax.config import ConfigError
from stride_jax.measure import MeasureConfig
from stride_jax.parallel import ParallelConfig, make_mesh, subset_devices
from stride_jax.parallel.memory import Shapes, plan_memory
from stride_jax.train import OperatorTrainConfig

TRAINED = AttributeConfig(operators="trained")


def test_all_devices_by_default_and_one_cpu_is_the_unsharded_path():
    assert ParallelConfig().devices == 0
    assert subset_devices(ParallelConfig()) == 1          # this process: one CPU device
    assert make_mesh(ParallelConfig()) is None             # no sharding annotations at all


@pytest.fixture
def eight(monkeypatch):
    monkeypatch.setattr(attributor, "subset_devices", lambda cfg: 8)


def test_automatic_k_rounds_to_the_devices_before_any_work(eight):
    # The case: 300 rows, d = 40 gave K = 375, refused only after the activation cache.
    assert check_run(TRAINED, 300) == 376
    small = dataclasses.replace(TRAINED, design=DesignConfig(per_example=4))
    assert check_run(small, 96) == 16                      # 12 -> 16


def test_set_sizes_the_devices_cannot_split_are_refused_by_check_run(eight):
    fixed = dataclasses.replace(TRAINED, design=DesignConfig(num_subsets=375))
    with pytest.raises(ConfigError, match=r"design.num_subsets.*375.*not divisible by the 8 "
                                          r"devices"):
        check_run(fixed, 300)
    steps = dataclasses.replace(TRAINED, train=OperatorTrainConfig(subsets_per_step=12))
    with pytest.raises(ConfigError, match=r"train.subsets_per_step.*12.*not divisible"):
        check_run(steps, 300)
    # Result-neutral: a measurement chunk the devices cannot split is rounded up, not refused.
    chunk = dataclasses.replace(TRAINED, measure=MeasureConfig(subset_chunk=12))
    assert check_run(chunk, 300) == 376


def test_closed_form_needs_no_subset_axis(eight):
    assert check_run(AttributeConfig(), 3) == 0


def test_memory_plan_uses_the_rounded_sizes():
    s = Shapes(n=300, seq_len=32, num_queries=4, d_reader=32, d_final=32, vocab=256)
    st = {x.stage: x for x in plan_memory(TRAINED, s, devices=8).stages}
    assert "K=376" in st["design"].detail
    chunk = dataclasses.replace(TRAINED, measure=MeasureConfig(subset_chunk=12))
    st = {x.stage: x for x in plan_memory(chunk, s, devices=8).stages}
    assert "subset_chunk=16" in st["measure"].detail
