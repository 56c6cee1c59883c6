"""The pretraining recipe: loss goes down, same seed gives the same weights, configs parse."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from stride_jax.config import load_config
from stride_jax.model.hf import from_hf
from stride_jax.recipes import (ArchConfig, CorpusConfig, NonFiniteLossError, OptimConfig,
                                PretrainConfig, batch_schedule, build_corpus, evaluate_loss,
                                model_config_for, pretrain, train_lm)
from stride_jax.tokenizer import vocab_size_of

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

SMALL = PretrainConfig(
    arch=ArchConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                    intermediate_size=64),
    corpus=CorpusConfig(plays=("macbeth",), seq_len=32, vocab_size=320, heldout_fraction=0.1),
    optim=OptimConfig(batch_size=16, epochs=0.25, warmup_steps=3, learning_rate=1e-2),
    log_every=5, sample_tokens=5)


@pytest.fixture(scope="module")
def small_corpus():
    return build_corpus(SMALL.corpus)


def _params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_training_lowers_the_loss(small_corpus):
    tok, train, heldout = small_corpus
    mcfg = model_config_for(SMALL.arch, vocab_size_of(tok), SMALL.corpus.seq_len)
    from stride_jax.model import init_model
    before = evaluate_loss(init_model(mcfg, seed=0), heldout)
    result = train_lm(mcfg, train, SMALL.optim, seed=0, progress=False, log_every=5)
    after = evaluate_loss(result.model, heldout)
    assert np.log(vocab_size_of(tok)) - 0.5 < before  # an untrained model is near uniform
    assert after < before - 1.0, (before, after)
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_same_seed_same_weights_and_other_seed_differs(small_corpus):
    tok, train, _ = small_corpus
    mcfg = model_config_for(SMALL.arch, vocab_size_of(tok), SMALL.corpus.seq_len)
    short = dataclasses.replace(SMALL.optim, epochs=0.05)
    a = _params(train_lm(mcfg, train, short, seed=3, progress=False).model)
    b = _params(train_lm(mcfg, train, short, seed=3, progress=False).model)
    c = _params(train_lm(mcfg, train, short, seed=4, progress=False).model)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(a, c))


def test_batch_schedule_is_a_pure_function_of_its_inputs():
    optim = OptimConfig(batch_size=4, epochs=2.5)
    s1 = batch_schedule(10, optim, key=jax.random.key(0))
    s2 = batch_schedule(10, optim, key=jax.random.key(0))
    np.testing.assert_array_equal(s1, s2)
    assert s1.shape == (7, 4)  # ceil(2.5 * 10 / 4)
    # Each epoch is a permutation of all rows.
    np.testing.assert_array_equal(np.sort(s1.reshape(-1)[:10]), np.arange(10))
    np.testing.assert_array_equal(np.sort(s1.reshape(-1)[10:20]), np.arange(10))
    with pytest.raises(ValueError, match="empty"):
        batch_schedule(0, optim, key=jax.random.key(0))


def test_pretrain_writes_a_loadable_hf_directory(tmp_path):
    result = pretrain(SMALL, tmp_path / "m", progress=False)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "recipe.yaml",
                 "history.json", "split.json"):
        assert (tmp_path / "m" / name).is_file(), name
    loaded = from_hf(tmp_path / "m")
    ids = result.corpus.heldout.input_ids[:2]
    np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(result.model(ids)))
    assert load_config(PretrainConfig, tmp_path / "m" / "recipe.yaml") == SMALL
    assert isinstance(result.sample, str) and len(result.sample) > len(SMALL.sample_prompt)


def test_nan_loss_stops_with_a_clear_error(small_corpus):
    tok, train, _ = small_corpus
    mcfg = model_config_for(SMALL.arch, vocab_size_of(tok), SMALL.corpus.seq_len)
    with pytest.raises(ValueError, match=r"learning_rate=nan must be a finite number > 0"):
        dataclasses.replace(SMALL.optim, learning_rate=float("nan"))   # refused when made
    # A NaN that gets past the config (here forced in) still stops training with an error.
    bad = dataclasses.replace(SMALL.optim, epochs=0.05)
    object.__setattr__(bad, "learning_rate", float("nan"))
    with pytest.raises(NonFiniteLossError, match="step"):
        train_lm(mcfg, train, bad, seed=0, progress=False, log_every=1)


def test_every_config_file_parses():
    from stride_jax.attributor import AttributeConfig
    from stride_jax.eval.suite import TaskConfig
    from stride_jax.recipes import PretrainConfig as P
    from stride_jax.tasks.contamination import ContaminationConfig
    kinds = {"pretrain": P, "attribute": AttributeConfig, "task": TaskConfig,
             "contamination": ContaminationConfig}
    files = sorted(CONFIGS.glob("*.yaml"))
    assert files, "configs/ is empty"
    for f in files:
        prefix = f.stem.split("_")[0]
        assert prefix in kinds, f"{f.name}: no config class registered for prefix {prefix!r}"
        load_config(kinds[prefix], f)


def test_default_config_files_are_the_built_in_defaults():
    from stride_jax.attributor import AttributeConfig
    assert load_config(PretrainConfig, CONFIGS / "pretrain_tiny.yaml") == PretrainConfig()
    assert load_config(AttributeConfig, CONFIGS / "attribute_default.yaml") == AttributeConfig()


def test_cli_rejects_a_typo_with_a_suggestion(capsys):
    from stride_jax.cli import main
    assert main(["pretrain", "--out", "/nonexistent/x", "optim.epoch=1"]) == 2
    err = capsys.readouterr().err
    assert "optim.epoch" in err and "did you mean 'optim.epochs'" in err


def test_faithful_preset_changes_only_the_measured_settings_of_the_trained_pipeline():
    import dataclasses as dc

    from stride_jax.attributor import AttributeConfig
    d = load_config(AttributeConfig, CONFIGS / "attribute_trained.yaml")   # the preset's base
    assert d == dc.replace(AttributeConfig(), operators="trained")
    assert load_config(AttributeConfig, CONFIGS / "attribute_faithful.yaml") == dc.replace(
        d, steering=dc.replace(d.steering, rank=64),
        train=dc.replace(d.train, epochs=80, learning_rate=3e-3, basis_learning_rate=3e-4))
