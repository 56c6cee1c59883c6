"""Argument-stamped artifacts: every stage records the config and input fingerprints that made
it, and a rerun with other arguments, another model or changed data refuses, naming what changed,
unless ``overwrite``."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from stride_jax.attributor import AttributeConfig, Attributor, DesignConfig
from stride_jax.io.stamps import StaleArtifactError
from stride_jax.model.config import tiny_llama
from stride_jax.model.transformer import init_model
from stride_jax.solve import SolveConfig
from stride_jax.steering import SteeringConfig
from stride_jax.train import OperatorTrainConfig
from _tiny import random_rows

CFG = AttributeConfig(
    operators="trained",
    design=DesignConfig(num_subsets=16, per_example=3),
    steering=SteeringConfig(rank=4),
    train=OperatorTrainConfig(epochs=1, subsets_per_step=16, rows_per_subset=2, stability_rows=2,
                              tokens_per_row=4),
    solve=SolveConfig(estimator="lasso", lam=1e-3))


def _model(seed: int = 0):
    return init_model(tiny_llama(vocab_size=64, hidden_size=16, num_heads=2, num_kv_heads=1,
                                 head_dim=8, intermediate_size=32, num_layers=2), seed=seed)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("stamped")
    model, train = _model(), random_rows(40, 8, 64, 0, "t")
    queries = random_rows(3, 8, 64, 1, "q")
    out = Attributor(model, train, CFG, workdir=work, progress=False).attribute(queries)
    return work, model, train, queries, out


def test_stamps_record_config_and_input_fingerprints(run):
    work, *_ = run
    ops = json.loads((work / "operators" / "stamp.json").read_text())
    assert ops["complete"] is True and ops["stage"] == "operators"
    payload = ops["payload"]
    for key in ("model", "train_rows", "design", "steering", "train", "seed", "layer"):
        assert key in payload, key
    assert payload["train"]["epochs"] == 1 and payload["steering"]["rank"] == 4
    (resp,) = (work / "responses").glob("*/stamp.json")
    assert json.loads(resp.read_text())["payload"]["queries"] == resp.parent.name


def test_changed_training_data_is_refused_naming_it(run):
    work, model, train, queries, _ = run
    ids = train.input_ids.copy()
    ids[7, 3] = (ids[7, 3] + 1) % 64            # one token of one row
    edited = dataclasses.replace(train, input_ids=ids)
    with pytest.raises(StaleArtifactError, match="train_rows") as e:
        Attributor(model, edited, CFG, workdir=work, progress=False).fit_operators()
    assert "--overwrite" in str(e.value)


def test_other_model_weights_are_refused_naming_them(run):
    work, _, train, _, _ = run
    with pytest.raises(StaleArtifactError, match=r"model: "):
        Attributor(_model(seed=1), train, CFG, workdir=work, progress=False).fit_operators()


def test_other_design_is_refused_at_the_design_stage(run):
    work, model, train, _, _ = run
    other = dataclasses.replace(CFG, design=DesignConfig(num_subsets=16, per_example=4))
    with pytest.raises(StaleArtifactError, match="design.per_example: 3 -> 4"):
        Attributor(model, train, other, workdir=work, progress=False).design()


def test_new_queries_reuse_operators_and_same_arguments_reuse_everything(run, tmp_path):
    work, model, train, queries, out = run
    saved = (work / "operators" / "operators.npz").stat().st_mtime_ns
    att = Attributor(model, train, CFG, workdir=work, progress=False)
    again = att.attribute(queries)
    np.testing.assert_array_equal(again.scores_qn, out.scores_qn)
    # Operators loaded, not retrained (nor rewritten); their loss curve read back with them.
    assert (work / "operators" / "operators.npz").stat().st_mtime_ns == saved
    assert att.history
    other_q = random_rows(2, 8, 64, 5, "p")
    att.attribute(other_q)                      # a second responses directory, no refusal
    assert len(list((work / "responses").glob("*/stamp.json"))) == 2


def test_overwrite_replaces_a_stale_stage(tmp_path):
    model, train = _model(), random_rows(40, 8, 64, 0, "t")
    Attributor(model, train, CFG, workdir=tmp_path, progress=False).fit_operators()
    other = dataclasses.replace(CFG, seed=1)
    with pytest.raises(StaleArtifactError, match="seed: 0 -> 1"):
        Attributor(model, train, other, workdir=tmp_path, progress=False).fit_operators()
    Attributor(model, train, other, workdir=tmp_path, overwrite=True, progress=False).fit_operators()
    stamp = json.loads((tmp_path / "operators" / "stamp.json").read_text())
    assert stamp["payload"]["seed"] == 1 and stamp["complete"] is True


def _user_lm(seed: int):
    """A user's own JAX model given as params + functions, without a fingerprint (issue 17)."""
    import jax
    import jax.numpy as jnp

    from stride_jax.steering import LMFunctions
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"emb": jax.random.normal(k1, (64, 8)) * 0.5,
              "out": jax.random.normal(k2, (8, 64)) * 0.5}
    return LMFunctions(
        params=params, features=lambda p, ids, mask: (p["emb"][ids], jnp.tanh(p["emb"][ids])),
        head=lambda p, h: h @ p["out"], upper=None, d_reader=8, d_final=8, vocab_size=64,
        max_len=8, layer=0, num_layers=1)


@pytest.mark.parametrize("operators,stages", [
    ("trained", ("design", "operators", "responses", "solve")),
    ("closed_form", ("operators", "responses", "solve")),       # no subsets, no design
])
def test_a_retrained_user_model_never_reuses_the_old_models_scores(tmp_path, caplog, operators,
                                                                    stages):
    """Issue 17: LMFunctions without a fingerprint, another seed, the same workdir: the old
    model's operators must be refused (naming the model), never silently reused."""
    train, queries = random_rows(40, 8, 64, 0, "t"), random_rows(3, 8, 64, 1, "q")
    cfg = dataclasses.replace(CFG, operators=operators,
                              steering=dataclasses.replace(CFG.steering, layer=0))
    first = Attributor(_user_lm(0), train, cfg, workdir=tmp_path, progress=False).attribute(queries)
    with pytest.raises(StaleArtifactError, match=r"model: "):
        Attributor(_user_lm(1), train, cfg, workdir=tmp_path, progress=False).attribute(queries)
    second = Attributor(_user_lm(1), train, cfg, workdir=tmp_path, overwrite=True,
                        progress=False).attribute(queries)
    assert not np.array_equal(first.scores_qn, second.scores_qn)
    # The same model again reuses every stage, and says so in the log: stage and stamp.
    import logging
    with caplog.at_level(logging.INFO, logger="stride_jax"):
        again = Attributor(_user_lm(1), train, cfg, workdir=tmp_path,
                           progress=False).attribute(queries)
    np.testing.assert_array_equal(again.scores_qn, second.scores_qn)
    reused = [r.getMessage() for r in caplog.records if "reusing" in r.getMessage()]
    for stage in stages:
        assert any(f"'{stage}'" in m and "stamp " in m for m in reused), (stage, reused)


def test_a_user_supplied_fingerprint_is_stamped(tmp_path):
    lm = dataclasses.replace(_user_lm(0), fingerprint="my-model-v1")
    cfg = dataclasses.replace(CFG, steering=dataclasses.replace(CFG.steering, layer=0))
    Attributor(lm, random_rows(40, 8, 64, 0, "t"), cfg, workdir=tmp_path,
               progress=False).fit_operators()
    stamp = json.loads((tmp_path / "operators" / "stamp.json").read_text())
    assert stamp["payload"]["model"] == "my-model-v1"


def test_params_fingerprint_sees_every_value():
    """A change anywhere in the parameters (here one value of a large leaf that a strided
    sample would skip, keeping the sum) changes the fingerprint."""
    from stride_jax.steering import params_fingerprint
    a = np.zeros((1000, 100), np.float32)
    a[0, 1], a[0, 2] = 1.0, -1.0
    b = np.zeros_like(a)
    b[0, 3], b[0, 4] = 1.0, -1.0
    assert params_fingerprint({"w": a}) != params_fingerprint({"w": b})
    assert params_fingerprint({"w": a}) == params_fingerprint({"w": a.copy()})
    assert params_fingerprint({"w": a}) != params_fingerprint({"v": a})


def test_a_damaged_stamp_is_a_one_line_error_and_overwrite_replaces_it(tmp_path):
    from stride_jax.io.stamps import open_stage
    open_stage(tmp_path / "s", "design", {"a": 1})
    (tmp_path / "s" / "stamp.json").write_text("{not json")
    with pytest.raises(StaleArtifactError, match="is not a stage stamp"):
        open_stage(tmp_path / "s", "design", {"a": 1})
    assert open_stage(tmp_path / "s", "design", {"a": 1}, overwrite=True) is False
