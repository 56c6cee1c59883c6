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
    att = Attributor(model, train, CFG, workdir=work, progress=False)
    again = att.attribute(queries)
    np.testing.assert_array_equal(again.scores_qn, out.scores_qn)
    assert att.history == []                    # operators were loaded, not retrained
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
