"""Config system: strict from_dict/to_dict, YAML dialect, overrides, files, fingerprints, help."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import pytest

from stride_jax.config import (
    ConfigError,
    apply_overrides,
    config_fingerprint,
    dump_config,
    field_help,
    format_config_help,
    from_dict,
    load_config,
    missing_help,
    option,
    to_dict,
)


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = option(1e-3, "peak learning rate")
    schedule: Literal["constant", "cosine"] = option("cosine", "learning-rate schedule")
    warmup: int | None = option(None, "warm-up steps; none when null")


@dataclasses.dataclass(frozen=True)
class Data:
    path: str = option(dataclasses.MISSING, "dataset file")
    weights: dict[str, float] = option({"a": 1.0}, "mixture weights by source")


@dataclasses.dataclass(frozen=True)
class Run:
    name: str = option("run", "run name")
    seeds: tuple[int, ...] = option((0,), "random seeds")
    layers: list[int] = option([1, 2], "layers to probe")
    use_bias: bool = option(False, "add a bias")
    out: Path = option(Path("runs"), "output directory")
    optim: Optim = option(Optim(), "optimiser")
    data: Data | None = option(None, "data section (optional)")
    pair: tuple[int, str] = option((1, "x"), "an (int, str) pair")


@dataclasses.dataclass(frozen=True)
class Required:
    data: Data = option(dataclasses.MISSING, "required section")
    n: int = option(dataclasses.MISSING, "a required count")


@dataclasses.dataclass(frozen=True)
class Undocumented:
    a: int = 1
    b: int = option(2, "documented")


FULL = {
    "name": "exp",
    "seeds": [1, 2, 3],
    "layers": [4],
    "use_bias": True,
    "out": "/tmp/out",
    "optim": {"lr": 3, "schedule": "constant", "warmup": 10},
    "data": {"path": "d.jsonl", "weights": {"x": 0.5, "y": 2}},
    "pair": [7, "z"],
}


def test_from_dict_builds_nested_and_coerces():
    cfg = from_dict(Run, FULL)
    assert cfg.seeds == (1, 2, 3) and isinstance(cfg.seeds, tuple)
    assert cfg.layers == [4]
    assert cfg.out == Path("/tmp/out")
    assert cfg.optim == Optim(lr=3.0, schedule="constant", warmup=10)
    assert isinstance(cfg.optim.lr, float)
    assert cfg.data == Data(path="d.jsonl", weights={"x": 0.5, "y": 2.0})
    assert isinstance(cfg.data.weights["y"], float)
    assert cfg.pair == (7, "z")


def test_defaults_and_round_trip():
    assert from_dict(Run, {}) == Run()
    for cfg in (Run(), from_dict(Run, FULL)):
        d = to_dict(cfg)
        assert d["seeds"] == list(cfg.seeds) and isinstance(d["out"], str)
        assert from_dict(Run, d) == cfg
    assert to_dict(from_dict(Run, FULL)) == {**FULL, "optim": {**FULL["optim"], "lr": 3.0},
                                            "data": {"path": "d.jsonl",
                                                     "weights": {"x": 0.5, "y": 2.0}}}


def test_mutable_defaults_are_not_shared():
    a, b = Run(), Run()
    assert a.layers == b.layers and a.layers is not b.layers


def test_unknown_key_names_dotted_key_class_and_suggestion():
    with pytest.raises(ConfigError) as e:
        from_dict(Run, {"optim": {"lrr": 0.1}})
    msg = str(e.value)
    assert "'optim.lrr'" in msg and "Optim" in msg
    assert "did you mean 'optim.lr'?" in msg
    assert "(valid keys: lr, schedule, warmup)" in msg
    with pytest.raises(ConfigError, match=r"unknown config key 'zzz' for Run \(valid keys: name, seeds"):
        from_dict(Run, {"zzz": 1})


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"seeds": [1, "2"]}, "'seeds[1]': expected int, got '2' (str)"),
        ({"seeds": 3}, "'seeds': expected tuple[int, ...], got 3 (int)"),
        ({"use_bias": "true"}, "'use_bias': expected bool, got 'true' (str)"),
        ({"use_bias": 1}, "expected bool"),
        ({"name": 5}, "'name': expected str, got 5 (int)"),
        ({"optim": {"lr": "fast"}}, "'optim.lr': expected float, got 'fast' (str)"),
        ({"optim": {"lr": True}}, "expected float, got True (bool)"),
        ({"optim": {"warmup": 1.5}}, "'optim.warmup': expected int, got 1.5 (float)"),
        ({"optim": 3}, "'optim': expected a mapping of Optim fields"),
        ({"data": {"path": "p", "weights": {"x": "heavy"}}}, "'data.weights.x': expected float"),
        ({"pair": [1, "a", 2]}, "with 2 element(s), got 3"),
    ],
)
def test_type_errors_name_key_expected_type_and_value(data, fragment):
    with pytest.raises(ConfigError) as e:
        from_dict(Run, data)
    assert fragment in str(e.value)


def test_literal_error_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"'optim.schedule'.*'linear'.*allowed values: 'constant', 'cosine'"):
        from_dict(Run, {"optim": {"schedule": "linear"}})


def test_optional_accepts_null():
    cfg = from_dict(Run, {"data": None, "optim": {"warmup": None}})
    assert cfg.data is None and cfg.optim.warmup is None


def test_missing_required_fields_are_all_named():
    with pytest.raises(ConfigError, match=r"missing required config key\(s\) for Required: data, n"):
        from_dict(Required, {})
    with pytest.raises(ConfigError, match="missing required config key.*data.path"):
        from_dict(Required, {"data": {}, "n": 1})


def test_apply_overrides_parses_yaml_values():
    base = {"optim": {"lr": 0.1}, "name": "a"}
    out = apply_overrides(
        base,
        ["optim.lr=1e-3", "x=[1,2]", "s=hello", "n=3", "flag=true", "w=null", "deep.er.key=on",
         "q='3'"],
    )
    assert out["optim"]["lr"] == 0.001 and isinstance(out["optim"]["lr"], float)
    assert out["x"] == [1, 2] and out["s"] == "hello" and out["n"] == 3
    assert out["flag"] is True and out["w"] is None
    assert out["deep"] == {"er": {"key": "on"}}  # YAML 1.1 booleans stay strings
    assert out["q"] == "3"
    assert base == {"optim": {"lr": 0.1}, "name": "a"}  # input untouched


def test_apply_overrides_last_wins_and_fills_null_sections():
    out = apply_overrides({"data": None}, ["data.path=p", "data.path=q", "v=a=b"])
    assert out == {"data": {"path": "q"}, "v": "a=b"}


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "a..b=1", "a.=1", "x="])
def test_malformed_override_has_usage_hint(bad):
    with pytest.raises(ConfigError) as e:
        apply_overrides({}, [bad])
    assert "section.key=value" in str(e.value) or "null" in str(e.value)


def test_override_into_scalar_is_an_error():
    with pytest.raises(ConfigError, match="'name' is 'a' \\(str\\), not a section"):
        apply_overrides({"name": "a"}, ["name.sub=1"])


def test_load_config_file_plus_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(
        "# notes live in comments\n"
        "name: exp\n"
        "optim:\n"
        "  lr: 1e-4   # YAML 1.2 float, not the string '1e-4'\n"
        "  schedule: constant\n"
    )
    cfg = load_config(Run, p, ["seeds=[3,4]", "optim.warmup=5", "data.path=x.jsonl"])
    assert cfg.name == "exp" and cfg.seeds == (3, 4)
    assert cfg.optim == Optim(lr=1e-4, schedule="constant", warmup=5)
    assert cfg.data == Data(path="x.jsonl")
    assert load_config(Run) == Run()
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_config(Run, empty) == Run()


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Run, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: a\noptim: [1, 2\nseeds: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml, line \d+"):
        load_config(Run, bad)
    dup = tmp_path / "dup.yaml"
    dup.write_text("name: a\nname: b\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml, line 2.*duplicate key 'name'"):
        load_config(Run, dup)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level of a config file must be a mapping"):
        load_config(Run, lst)
    typo = tmp_path / "typo.yaml"
    typo.write_text("_doc: notes\n")
    with pytest.raises(ConfigError, match=r"unknown config key '_doc'.*typo\.yaml"):
        load_config(Run, typo)


def test_dump_config_round_trips_tricky_strings(tmp_path):
    cfg = from_dict(Run, {**FULL, "name": "1e-3", "data": {"path": "yes"}})
    p = tmp_path / "sub" / "cfg.yaml"
    dump_config(cfg, p)
    text = p.read_text()
    assert text.index("name:") < text.index("seeds:") < text.index("optim:")  # field order
    assert load_config(Run, p) == cfg
    assert [x for x in os.listdir(p.parent)] == ["cfg.yaml"]  # no temp files left


def test_fingerprint_stable_order_independent_and_sensitive():
    a = from_dict(Run, FULL)
    b = from_dict(Run, dict(reversed(list(FULL.items()))))
    assert config_fingerprint(a) == config_fingerprint(b)
    assert len(config_fingerprint(a)) == 64
    assert config_fingerprint(a) == config_fingerprint(from_dict(Run, to_dict(a)))
    changed = from_dict(Run, apply_overrides(FULL, ["optim.lr=3.0000001"]))
    assert config_fingerprint(changed) != config_fingerprint(a)
    # The canonical form is documented (sorted-key compact JSON); stamps depend on it.
    expected = hashlib.sha256(
        json.dumps({"lr": 0.001, "schedule": "cosine", "warmup": None},
                   sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    assert config_fingerprint(Optim()) == expected


def test_field_help_and_option():
    h = field_help(Run)
    assert h["optim"] == "optimiser" and h["optim.lr"] == "peak learning rate"
    assert h["data.weights"] == "mixture weights by source"
    assert list(h)[:3] == ["name", "seeds", "layers"]
    assert missing_help(Run) == []
    assert missing_help(Undocumented) == ["a"]
    text = format_config_help(Run)
    assert "optim.lr (float, default: 0.001)" in text and "peak learning rate" in text
    assert "data.path (str, required)" in text
    f = option([1], "h", metadata={"unit": "steps"})
    assert f.metadata == {"unit": "steps", "help": "h"} and f.default_factory() == [1]


def test_from_dict_rejects_non_dataclass_and_local_class():
    with pytest.raises(TypeError):
        from_dict(dict, {})

    @dataclasses.dataclass(frozen=True)
    class Inner:
        y: int = 0

    @dataclasses.dataclass(frozen=True)
    class Local:
        x: Inner = Inner()

    with pytest.raises(ConfigError, match="module level"):
        from_dict(Local, {})


def test_partial_nested_override_keeps_the_fields_own_default():
    """Overriding one key of a section whose default is a tuned instance (the digits task's
    optimiser) keeps that instance's other values, not the section class's defaults."""
    from stride_jax.eval.suite import TaskConfig
    base = load_config(TaskConfig, None, [])
    got = load_config(TaskConfig, None, ["digits.optim.batch_size=8"])
    assert got.digits.optim.batch_size == 8
    assert dataclasses.replace(got.digits.optim, batch_size=base.digits.optim.batch_size) == \
        base.digits.optim


def _numeric_keys(cls):
    """Dotted keys of every int/float (or optional int/float) setting under ``cls``."""
    import typing

    from stride_jax.config import _walk
    for key, _, tp in _walk(cls):
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if len(args) == 1 and args[0] in (int, float):
            yield key, args[0]


ROOT_CONFIGS = ["stride_jax.attributor:AttributeConfig", "stride_jax.recipes:PretrainConfig",
                "stride_jax.eval.suite:TaskConfig",
                "stride_jax.tasks.contamination:ContaminationConfig",
                "stride_jax.tasks.selection:SelectionTaskConfig"]


@pytest.mark.parametrize("root", ROOT_CONFIGS)
def test_every_numeric_setting_is_range_checked_when_loaded(root):
    """No numeric setting accepts -1, and no float setting NaN or infinity: each is refused when
    the config is loaded, naming its dotted key (Python users get the same check)."""
    import importlib

    from stride_jax.config import ConfigError, load_config
    module, name = root.split(":")
    cls = getattr(importlib.import_module(module), name)
    keys = list(_numeric_keys(cls))
    assert len(keys) >= 5, keys
    for key, tp in keys:
        values = ["-1"] + ([".nan", ".inf"] if tp is float else [])
        for value in values:
            with pytest.raises(ConfigError) as e:
                load_config(cls, None, [f"{key}={value}"])
            msg = str(e.value)
            # "train.epochs=0 must be ...", or (solve's own checks) "invalid SolveConfig at
            # stride.solve: lam must be positive ..."
            section, _, leaf = key.rpartition(".")
            assert f"{key}=" in msg or (f"at {section}:" in msg and leaf in msg), (key, value, msg)
    load_config(cls)   # the defaults themselves are in range
