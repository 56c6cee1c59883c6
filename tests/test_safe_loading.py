"""Nothing stride-jax reads can run code: no pickle, no unsafe YAML, no eval.

A static audit parses every module of ``stride_jax/`` and ``benchmarks/`` and fails on the known
ways of executing data (pickle and its relatives, ``torch.load``, ``np.load``/``np.save`` with
pickles allowed, YAML loaders that construct Python objects, ``eval``/``exec``). Behavioural
tests then feed malicious files to the entry points a user points at untrusted data: a pickled
object array as ``--scores`` and a YAML config with a ``!!python`` tag are refused with a clear
message, and the payload (which would create a marker file) never runs.
"""

from __future__ import annotations

import ast
import pickle  # noqa: S403 - only to build malicious test inputs
from pathlib import Path

import numpy as np
import pytest
import yaml

from stride_jax.cli import main
from stride_jax.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
AUDITED = ("stride_jax", "benchmarks")

BANNED_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve",
                  "marshal"}
SAFE_YAML_LOADERS = {"_Loader", "SafeLoader", "CSafeLoader"}
UNSAFE_YAML_CALLS = {"unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}
NUMPY_PICKLING_SAVERS = {"save", "savez", "savez_compressed"}


def _sources() -> list[Path]:
    files = [p for d in AUDITED for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20, files      # the audit really looked at the code
    return files


def _dotted(node: ast.AST) -> str:
    """``np.load`` for ``Attribute(Name('np'), 'load')``; '' for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_false(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def _audit(path: Path, root: Path = REPO) -> list[str]:
    rel = path.relative_to(root)
    in_library = rel.parts[0] == "stride_jax"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(rel))
    numpy_names = {"np", "numpy", "onp"}
    yaml_names = {"yaml"}
    problems = []

    def bad(node: ast.AST, what: str) -> None:
        problems.append(f"{rel}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in BANNED_MODULES:
                    bad(node, f"imports {a.name} (unpickling runs arbitrary code)")
                if a.name == "numpy" and a.asname:
                    numpy_names.add(a.asname)
                if a.name == "yaml" and a.asname:
                    yaml_names.add(a.asname)
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")[0]
            if mod in BANNED_MODULES:
                bad(node, f"imports from {node.module}")
            if mod == "torch" and any(a.name == "load" for a in node.names):
                bad(node, "imports torch.load (pickle-based)")
            if mod == "yaml" and any(a.name in UNSAFE_YAML_CALLS | {"load", "load_all",
                                                                    "Loader", "UnsafeLoader",
                                                                    "FullLoader"}
                                     for a in node.names):
                bad(node, "imports a YAML loader by name; call yaml.load(..., Loader=_Loader)")
            if mod == "numpy" and any(a.name in {"load"} | NUMPY_PICKLING_SAVERS
                                      for a in node.names):
                bad(node, "imports numpy's load/save by name (the audit checks np.load/np.save)")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            head, _, attr = name.rpartition(".")
            if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
                bad(node, f"calls {name}()")
            elif name == "torch.load":
                bad(node, "calls torch.load (unpickles)")
            elif head in numpy_names and attr == "load":
                allow = _kw(node, "allow_pickle")
                if allow is not None and not _is_false(allow):
                    bad(node, "calls np.load with allow_pickle other than False")
                elif allow is None and in_library:
                    bad(node, "calls np.load without an explicit allow_pickle=False")
            elif head in numpy_names and attr in NUMPY_PICKLING_SAVERS:
                allow = _kw(node, "allow_pickle")
                if allow is not None and not _is_false(allow):
                    bad(node, f"calls np.{attr} with allow_pickle other than False")
            elif head in yaml_names and attr in UNSAFE_YAML_CALLS:
                bad(node, f"calls yaml.{attr} (constructs arbitrary Python objects)")
            elif head in yaml_names and attr in ("load", "load_all"):
                loader = _kw(node, "Loader")
                if loader is None and len(node.args) > 1:
                    loader = node.args[1]
                loader_name = _dotted(loader) if loader is not None else ""
                if loader_name.rpartition(".")[2] not in SAFE_YAML_LOADERS:
                    bad(node, f"calls yaml.{attr} with Loader={loader_name or 'None'}; use a "
                              f"SafeLoader (stride_jax.config._Loader)")
    return problems


def test_no_code_path_unpickles_or_evaluates_data():
    problems = [p for f in _sources() for p in _audit(f)]
    assert not problems, "unsafe loading:\n" + "\n".join(problems)


def test_the_audit_catches_what_it_is_for(tmp_path):
    src = tmp_path / "stride_jax" / "evil.py"
    src.parent.mkdir()
    src.write_text("\n".join([
        "import pickle", "import numpy as np", "import yaml", "import torch",        # 1-4
        "np.load('a', allow_pickle=True)", "np.load('b')",                           # 5-6
        "np.save('c', x, allow_pickle=True)", "yaml.load(t)",                        # 7-8
        "yaml.load(t, Loader=yaml.Loader)", "yaml.unsafe_load(t)",                   # 9-10
        "yaml.full_load(t)", "torch.load('m.pt')", "eval(s)", "exec(s)",             # 11-14
        # allowed: the safe loader, an explicit allow_pickle=False, a method named eval
        "yaml.load(t, Loader=_Loader)", "np.load('d', allow_pickle=False)", "m.eval()",
    ]) + "\n")
    got = _audit(src, root=tmp_path)
    lines = sorted(int(p.split(":")[1]) for p in got)
    assert lines == [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], got


def test_the_config_loader_is_a_safe_loader():
    from stride_jax.config import _Loader
    assert issubclass(_Loader, yaml.SafeLoader)
    python_tags = [t for t in {**_Loader.yaml_constructors, **_Loader.yaml_multi_constructors}
                   if t and "python/" in t]
    assert not python_tags, python_tags


# --------------------------------------------------------------------------------------------
# behaviour
# --------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this creates ``marker`` (through ``open(marker, "w")``)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _object_npy(path: Path, marker: Path) -> Path:
    arr = np.empty(1, dtype=object)
    arr[0] = _Payload(marker)
    np.save(path, arr, allow_pickle=True)
    return path


def test_the_malicious_files_are_live(tmp_path):
    """The payloads below do run when loaded unsafely, so their refusal is meaningful."""
    marker = tmp_path / "ran"
    np.load(_object_npy(tmp_path / "x.npy", marker), allow_pickle=True)
    assert marker.exists()
    marker.unlink()
    pickle.loads(pickle.dumps(_Payload(marker)))    # noqa: S301 - our own payload
    assert marker.exists()


@pytest.mark.parametrize("kind", ["object_npy", "raw_pickle"])
@pytest.mark.parametrize("command", ["evaluate", "counterfactual"])
def test_a_pickled_scores_file_is_refused_without_running_it(tmp_path, capsys, monkeypatch,
                                                             kind, command):
    monkeypatch.setenv("STRIDE_JAX_CACHE", "off")
    marker = tmp_path / "ran"
    scores = tmp_path / "scores.npy"
    if kind == "object_npy":
        _object_npy(scores, marker)
    else:
        scores.write_bytes(pickle.dumps(_Payload(marker)))
    args = {"evaluate": ["evaluate", "--scores", str(scores), "--groundtruth", str(tmp_path)],
            "counterfactual": ["counterfactual", "--scores", str(scores)]}[command]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"stride-jax {command}: error:" in err and str(scores) in err, err
    assert "is not a .npy" in err, err
    assert "Traceback" not in err
    assert not marker.exists(), "the pickle payload ran"


def test_library_loaders_refuse_object_arrays(tmp_path):
    from stride_jax.eval.groundtruth import load_groundtruth
    from stride_jax.io.atomic import load_npy
    marker = tmp_path / "ran"
    with pytest.raises(ValueError, match="allow_pickle"):
        load_npy(_object_npy(tmp_path / "a.npy", marker))
    gt = tmp_path / "gt"
    gt.mkdir()
    _object_npy(gt / "losses.npy", marker)
    np.save(gt / "masks.npy", np.ones((3, 4), bool), allow_pickle=False)
    (gt / "groundtruth.json").write_text("{}")
    with pytest.raises(ValueError, match="allow_pickle"):
        load_groundtruth(gt)
    assert not marker.exists()


def _yaml_exploit(marker: Path) -> str:
    return f'!!python/object/apply:os.system ["touch {marker}"]'


def test_a_yaml_config_with_python_tags_is_refused(tmp_path, capsys, monkeypatch):
    from stride_jax.eval.suite import TaskConfig
    monkeypatch.setenv("STRIDE_JAX_CACHE", "off")
    marker = tmp_path / "ran"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"kind: digits\nseed: {_yaml_exploit(marker)}\n")
    with pytest.raises(ConfigError, match="python/object/apply:os.system"):
        load_config(TaskConfig, cfg)
    # Dotted overrides are YAML too.
    with pytest.raises(ConfigError, match="python/object/apply:os.system"):
        load_config(TaskConfig, None, [f"seed={_yaml_exploit(marker)}"])
    for tag in ("!!python/object/new:os.system", "!!python/name:os.system",
                "!!python/module:os"):
        with pytest.raises(ConfigError, match="python/"):
            load_config(TaskConfig, None, [f"seed={tag} [x]"])
    # The command refuses it in one line, before doing anything else.
    assert main(["groundtruth", "--config", str(cfg), "--out", str(tmp_path / "gt")]) == 2
    err = capsys.readouterr().err
    assert "stride-jax groundtruth: error:" in err and "evil.yaml" in err and "line 2" in err, err
    assert not (tmp_path / "gt").exists()
    assert not marker.exists(), "the YAML payload ran"
