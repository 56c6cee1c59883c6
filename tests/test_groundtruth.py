"""Retraining ground truth: exact subset sizes, resume without recomputation, stamps, recipe."""

from __future__ import annotations

import numpy as np
import pytest

from stride_jax.eval.groundtruth import (GroundTruthConfig, load_groundtruth, run_groundtruth,
                                         validate)
from stride_jax.io.stamps import StaleArtifactError
from stride_jax.recipes.pretrain import OptimConfig


class _Counting:
    """A deterministic stand-in retrain: loss_q = -sum_{i in S} w[q, i] (a linear datamodel)."""

    def __init__(self, n: int, q: int):
        self.w = np.random.default_rng(0).normal(size=(q, n))
        self.calls: list[np.ndarray] = []

    def __call__(self, subsets_pm):
        self.calls.append(np.array(subsets_pm))
        return np.stack([-self.w[:, s].sum(1) for s in subsets_pm])


def test_subsets_have_exact_size_and_do_not_depend_on_parallel():
    f1, f2 = _Counting(50, 3), _Counting(50, 3)
    a = run_groundtruth(f1, n=50, num_queries=3, progress=False,
                        cfg=GroundTruthConfig(num_subsets=10, alpha=0.3, parallel=4))
    b = run_groundtruth(f2, n=50, num_queries=3, progress=False,
                        cfg=GroundTruthConfig(num_subsets=10, alpha=0.3, parallel=3))
    assert (a.masks_sn.sum(1) == 15).all()
    np.testing.assert_array_equal(a.masks_sn, b.masks_sn)
    np.testing.assert_array_equal(a.losses_sq, b.losses_sq)
    assert all(c.shape == (4, 15) for c in f1.calls)   # the last chunk is padded to shape


def test_resume_skips_finished_chunks_and_gives_the_same_result(tmp_path):
    cfg = GroundTruthConfig(num_subsets=12, alpha=0.3, parallel=4)
    whole = run_groundtruth(_Counting(40, 5), n=40, num_queries=5, cfg=cfg, progress=False)

    class Kill(Exception):
        pass

    def kill_after_second(start):
        if start == 4:
            raise Kill

    first = _Counting(40, 5)
    with pytest.raises(Kill):
        run_groundtruth(first, n=40, num_queries=5, cfg=cfg, out_dir=tmp_path, progress=False,
                        on_chunk=kill_after_second)
    assert len(first.calls) == 2
    second = _Counting(40, 5)
    got = run_groundtruth(second, n=40, num_queries=5, cfg=cfg, out_dir=tmp_path, progress=False)
    assert len(second.calls) == 1          # only subsets 8..11 were retrained
    np.testing.assert_array_equal(got.losses_sq, whole.losses_sq)
    np.testing.assert_array_equal(got.masks_sn, whole.masks_sn)
    # A finished directory is loaded, not recomputed.
    third = _Counting(40, 5)
    again = load_groundtruth(tmp_path)
    run_groundtruth(third, n=40, num_queries=5, cfg=cfg, out_dir=tmp_path, progress=False)
    assert not third.calls
    np.testing.assert_array_equal(again.losses_sq, whole.losses_sq)


def test_more_subsets_extend_a_finished_run(tmp_path):
    f = _Counting(30, 2)
    run_groundtruth(f, n=30, num_queries=2, out_dir=tmp_path, progress=False,
                    cfg=GroundTruthConfig(num_subsets=6, parallel=3))
    g = _Counting(30, 2)
    big = run_groundtruth(g, n=30, num_queries=2, out_dir=tmp_path, progress=False,
                          cfg=GroundTruthConfig(num_subsets=9, parallel=3))
    assert len(g.calls) == 1 and big.losses_sq.shape == (9, 2)


def test_other_arguments_are_refused_unless_overwrite(tmp_path):
    run_groundtruth(_Counting(30, 2), n=30, num_queries=2, out_dir=tmp_path, progress=False,
                    cfg=GroundTruthConfig(num_subsets=3), stamp={"task": "a"})
    with pytest.raises(StaleArtifactError, match="task.task"):
        run_groundtruth(_Counting(30, 2), n=30, num_queries=2, out_dir=tmp_path, progress=False,
                        cfg=GroundTruthConfig(num_subsets=3), stamp={"task": "b"})
    run_groundtruth(_Counting(30, 2), n=30, num_queries=2, out_dir=tmp_path, progress=False,
                    cfg=GroundTruthConfig(num_subsets=3), stamp={"task": "b"}, overwrite=True)


@pytest.mark.parametrize("kw,msg", [({"alpha": 1.0}, "alpha"), ({"alpha": 0.001}, "alpha"),
                                    ({"num_subsets": 2}, "num_subsets"),
                                    ({"parallel": 0}, "parallel")])
def test_bad_configs_are_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        validate(GroundTruthConfig(**kw), 100)


def test_non_finite_retrain_is_reported(tmp_path):
    def bad(subsets):
        out = np.zeros((len(subsets), 2))
        out[1, 0] = np.nan
        return out
    with pytest.raises(FloatingPointError, match="subset 1"):
        run_groundtruth(bad, n=20, num_queries=2, out_dir=tmp_path, progress=False,
                        cfg=GroundTruthConfig(num_subsets=4, parallel=4))


def test_missing_groundtruth_directory_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="stride-jax groundtruth"):
        load_groundtruth(tmp_path)


# -- the shared recipe ---------------------------------------------------------------------------

def _small_digits():
    from stride_jax.tasks.digits import DigitsConfig, build_digits_task
    cfg = DigitsConfig(num_train=120, num_queries=10, hidden=(16, 16),
                       optim=OptimConfig(learning_rate=3e-3, warmup_steps=2, batch_size=16,
                                         epochs=3.0, grad_clip=0.0, weight_decay=1e-3))
    return build_digits_task(cfg)


def test_retrain_on_every_example_reproduces_the_attributed_model():
    pytest.importorskip("sklearn")
    task = _small_digits()
    full = task.retrain(np.arange(task.n)[None])[0]
    np.testing.assert_allclose(full, task.base_query_losses, rtol=1e-4, atol=1e-5)


def test_digits_groundtruth_resumes_bitwise(tmp_path):
    pytest.importorskip("sklearn")
    task = _small_digits()
    cfg = GroundTruthConfig(num_subsets=6, alpha=0.5, parallel=2)
    whole = run_groundtruth(task.retrain, n=task.n, num_queries=task.num_queries, cfg=cfg,
                            progress=False)

    def stop(start):
        if start == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_groundtruth(task.retrain, n=task.n, num_queries=task.num_queries, cfg=cfg,
                        out_dir=tmp_path, progress=False, on_chunk=stop)
    got = run_groundtruth(task.retrain, n=task.n, num_queries=task.num_queries, cfg=cfg,
                          out_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(got.losses_sq, whole.losses_sq)
    # Subsets differ, so the retrained losses do too (the retrains are not all the same model).
    assert np.ptp(whole.losses_sq, axis=0).min() > 0
