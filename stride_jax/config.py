"""Configuration: frozen dataclasses loaded from YAML with dotted command-line overrides.

A config is a (possibly nested) frozen dataclass whose fields carry help text::

    @dataclasses.dataclass(frozen=True)
    class Optim:
        lr: float = option(1e-3, "peak learning rate")

    @dataclasses.dataclass(frozen=True)
    class Run:
        optim: Optim = option(Optim(), "optimiser settings")
        seeds: tuple[int, ...] = option((0,), "random seeds, one run each")

    cfg = load_config(Run, "configs/run.yaml", ["optim.lr=3e-4", "seeds=[0,1,2]"])
    cfg = with_overrides(cfg, "optim.lr=1e-4")           # the same dotted keys, from Python
    cfg = with_overrides(cfg, **{"optim.lr": 1e-4})      # ... with Python values

Loading is strict, because a typo silently falling back to a default wastes a run:

* unknown keys are errors naming the dotted key, the dataclass, a "did you mean" suggestion and
  the valid keys; duplicate keys in a YAML mapping are errors too;
* values are checked against the field annotations (``int``, ``float`` (ints widen), ``bool``
  (real booleans only), ``str``, ``pathlib.Path`` (from a string), ``X | None``,
  ``Literal[...]``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``, ``dict[K, V]``, nested
  dataclasses, ``Any``), and missing required fields are reported together;
* every numeric setting is range-checked by its dataclass's ``__post_init__`` through
  :func:`check_ranges` (so Python users get the same checks), and the error names the dotted key,
  the value, the valid range and, where it helps, the fix.

YAML is read with a safe loader that follows YAML 1.2 for scalars: ``1e-3`` is a float (PyYAML's
YAML 1.1 default would make it a string), only ``true``/``false`` are booleans (``yes``, ``no``,
``on``, ``off`` stay strings) and dates stay strings. Override values are parsed the same way, so
``a.b=1e-3``, ``flag=true``, ``xs=[1,2]`` and ``name=null`` do what they look like; anything else
(``s=hello``) is a string.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar

import yaml

from stride_jax.errors import ConfigError
from stride_jax.io.atomic import atomic_write_text

__all__ = [
    "SEED_RANGE",
    "ConfigError",
    "ConfigValueError",
    "apply_overrides",
    "check_ranges",
    "config_fingerprint",
    "dump_config",
    "field_help",
    "format_config_help",
    "from_dict",
    "load_config",
    "missing_help",
    "option",
    "parse_yaml",
    "to_dict",
    "with_overrides",
]

T = TypeVar("T")


class ConfigValueError(ConfigError):
    """Settings out of their valid range: ``problems`` holds ``(field, value, requirement)``.

    Raised by a config dataclass's ``__post_init__``; :func:`from_dict` re-raises it with the
    dotted key of each field (``train.epochs=0 must be >= 1``). Constructed directly in Python,
    the message names the dataclass instead (``OperatorTrainConfig.epochs=0 must be >= 1``).
    """

    def __init__(self, owner: str, problems: Sequence[tuple[str, Any, str]]):
        self.owner, self.problems = owner, list(problems)
        super().__init__(self.format(f"{owner}."))

    def format(self, prefix: str) -> str:
        return "; ".join(f"{prefix}{name}={value!r} {req}" for name, value, req in self.problems)


# Seeds become JAX keys, which keep only the low 32 bits (2**32 would be seed 0 again).
SEED_RANGE = "in [0, 4294967295]"
_SPEC_RE = re.compile(r"^(>=|>)\s*(\S+)$|^in\s*([\[(])\s*([^,]+?)\s*,\s*([^\])]+?)\s*([\])])$")


def _satisfies(value: Any, spec: str) -> bool:
    m = _SPEC_RE.match(spec.strip())
    if m is None:
        raise ValueError(f"bad range spec {spec!r}")
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if m.group(1):
        bound = float(m.group(2))
        return value >= bound if m.group(1) == ">=" else value > bound
    lo, hi = float(m.group(4)), float(m.group(5))
    return ((value >= lo) if m.group(3) == "[" else (value > lo)) and \
        ((value <= hi) if m.group(6) == "]" else (value < hi))


def check_ranges(cfg: Any, ranges: Mapping[str, str], *, fixes: Mapping[str, str] | None = None,
                 extra: Sequence[tuple[str, Any, str]] = ()) -> None:
    """Raise :class:`ConfigValueError` for every field of ``cfg`` outside its range.

    ``ranges`` maps a field to ``">= 1"``, ``"> 0"`` or an interval such as ``"in [0, 1)"``; a
    ``None`` value passes (an optional field left automatic), a float must be finite. ``fixes``
    adds a hint per field; ``extra`` are further ``(field, value, requirement)`` problems found by
    the caller (cross-field checks), reported in the same error.
    """
    problems = []
    for name, spec in ranges.items():
        value = getattr(cfg, name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue   # the type itself is checked by the loader
        if not _satisfies(value, spec):
            text = spec.strip()
            req = f"must lie {text}" if text.startswith("in") else f"must be {text}"
            if isinstance(value, float) and not math.isfinite(value):
                req = f"must be a finite number {text}"
            fix = (fixes or {}).get(name)
            problems.append((name, value, f"{req}; {fix}" if fix else req))
    problems += list(extra)
    if problems:
        raise ConfigValueError(type(cfg).__name__, problems)


# --------------------------------------------------------------------------------------------
# YAML dialect
# --------------------------------------------------------------------------------------------

_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_DROPPED_TAGS = {_BOOL_TAG, _FLOAT_TAG, "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value"}
_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
# YAML 1.2 floats: the exponent form needs no dot, unlike PyYAML's YAML 1.1 regex.
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars and duplicate-key detection."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        # Only the mapping's own keys: a key overriding one pulled in by a `<<` merge is legal.
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in _DROPPED_TAGS]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, _BOOL_RE, list("tTfF"))
_Loader.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings our loader would read as floats (e.g. ``"1e-3"``).

    It keeps all YAML 1.1 resolvers, so strings such as ``"yes"`` are quoted too and the file
    reads back identically with a stock YAML 1.1 parser.
    """


_Dumper.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text with this module's dialect; errors become :class:`ConfigError` naming
    ``source`` and the line/column."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
        problem = " ".join(str(x) for x in (e.context, e.problem) if x)
        raise ConfigError(f"YAML syntax error in {where}: {problem}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"YAML error in {source}: {e}") from e


# --------------------------------------------------------------------------------------------
# dataclass <-> dict
# --------------------------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        try:
            _HINTS[cls] = typing.get_type_hints(cls)
        except NameError as e:
            # Classes defined inside functions cannot resolve string annotations.
            raise ConfigError(
                f"cannot resolve the annotations of {cls.__qualname__} ({e}); config "
                "dataclasses must be defined at module level"
            ) from e
    return _HINTS[cls]


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if tp is Any:
        return "Any"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{_type_name(args[0])}, ...]"
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _key_label(key: str) -> str:
    return f"config key {key!r}" if key else "config"


def _type_error(key: str, tp: Any, value: Any, hint: str = "") -> ConfigError:
    return ConfigError(
        f"{_key_label(key)}: expected {_type_name(tp)}, got {_describe(value)}{hint}"
    )


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert it (list -> tuple, int -> float,
    mapping -> dataclass, ...). ``key`` is the dotted key, for error messages."""
    if tp is Any or tp is object:
        return value
    if tp is type(None):
        if value is not None:
            raise _type_error(key, tp, value)
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            # Optional[X]: let X's own (more specific) error through.
            return _coerce(value, options[0], key)
        # Exact type matches first so that `int | str` keeps 3 an int and `float | str` keeps
        # "3" a string.
        for opt in sorted(options, key=lambda o: not (isinstance(o, type) and type(value) is o)):
            try:
                return _coerce(value, opt, key)
            except ConfigError:
                continue
        raise _type_error(key, tp, value)

    if origin is Literal:
        for allowed in args:
            # type() check: True == 1 and 1 == 1.0 must not match Literal[1] / Literal[1.0].
            if type(value) is type(allowed) and value == allowed:
                return allowed
        raise ConfigError(
            f"{_key_label(key)}: {_describe(value)} is not allowed; "
            f"allowed values: {', '.join(repr(a) for a in args)}"
        )

    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return from_dict(tp, value, path=key)
        raise ConfigError(
            f"{_key_label(key)}: expected a mapping of {tp.__name__} fields, got {_describe(value)}"
        )

    if origin in (tuple, list, Sequence, typing.Sequence) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if args == ((),):  # tuple[()]
                args = ()
            if len(value) != len(args):
                raise ConfigError(
                    f"{_key_label(key)}: expected {_type_name(tp)} with {len(args)} element(s), "
                    f"got {len(value)}: {_describe(value)}"
                )
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        elem = args[0] if args else Any
        items = [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        return list(items) if (origin is list or tp is list) else tuple(items)

    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _type_error(key, tp, value)
        ktp, vtp = args if args else (Any, Any)
        return {
            _coerce(k, ktp, f"{key}.<key {k!r}>"): _coerce(v, vtp, f"{key}.{k}")
            for k, v in value.items()
        }

    if tp is bool:
        if not isinstance(value, bool):
            raise _type_error(key, tp, value, "; write true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(key, tp, value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(key, tp, value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _type_error(
                key, tp, value, "; quote it to pass a string (on a command line: key='\"...\"')"
            )
        return value
    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, (str, PurePath)):
            return tp(value)
        raise _type_error(key, tp, value)
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise _type_error(key, tp, value)
        return value
    raise ConfigError(f"{_key_label(key)}: unsupported annotation {tp!r} in a config dataclass")


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(
            out.get(k), Mapping) else v
    return out


def _merge_onto_default(field: dataclasses.Field, value: Any) -> Any:
    if not isinstance(value, Mapping):
        return value
    default = field.default
    if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    if default is dataclasses.MISSING or not dataclasses.is_dataclass(default):
        return value
    return _deep_merge(to_dict(default), value)


def from_dict(cls: type[T], data: Mapping[str, Any], *, path: str = "") -> T:
    """Build the dataclass ``cls`` from a (nested) mapping, checking keys and types.

    ``path`` is the dotted prefix of ``data`` within the whole config, used in messages. Raises
    :class:`ConfigError` on unknown keys (with a suggestion and the valid keys), missing
    required fields, or values that do not match the field annotations.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{_key_label(path)}: expected a mapping of {cls.__name__} fields, got {_describe(data)}"
        )
    hints = _hints(cls)
    fields = _init_fields(cls)
    names = [f.name for f in fields]
    prefix = f"{path}." if path else ""

    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            suggestion = f"; did you mean {prefix + close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown config key {prefix + str(key)!r} for {cls.__name__}{suggestion} "
                f"(valid keys: {', '.join(names)})"
            )

    missing = [
        prefix + f.name
        for f in fields
        if f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            f"missing required config key(s) for {cls.__name__}: {', '.join(missing)}"
        )

    # A partial mapping for a nested section fills in from that field's own default instance
    # (e.g. a task's tuned optimiser), not from the section class's defaults.
    by_name = {f.name: f for f in fields}
    data = {name: _merge_onto_default(by_name[name], value) for name, value in data.items()}
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigValueError):
            raise ConfigError(e.format(prefix)) from None
        if isinstance(e, ConfigError):
            raise
        # __post_init__ validation: attach where the failing config lives.
        raise ConfigError(f"invalid {cls.__name__} at {path or '<top level>'}: {e}") from e


def to_dict(obj: Any) -> Any:
    """Convert a config (dataclass, possibly nested) into plain YAML/JSON-able data.

    Tuples become lists and paths become strings; ``from_dict(type(obj), to_dict(obj)) == obj``.
    Only ``init`` fields are included, as those are what :func:`from_dict` accepts.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in _init_fields(type(obj))}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, PurePath):
        return str(obj)
    return obj


# --------------------------------------------------------------------------------------------
# overrides, files, fingerprints
# --------------------------------------------------------------------------------------------

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z_0-9][A-Za-z0-9_\-]*)*$")
_OVERRIDE_USAGE = "overrides look like section.key=value, e.g. optim.lr=3e-4 or seeds=[0,1]"


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with ``a.b.c=value`` overrides applied in order.

    Values are parsed as YAML (``3`` int, ``1e-3`` float, ``true`` bool, ``[1,2]`` list,
    ``null`` None; other text stays a string). Intermediate mappings are created as needed (also
    over a ``null``). An empty value is refused: write ``null`` or ``''`` explicitly.
    """
    if isinstance(overrides, str):
        raise TypeError("apply_overrides takes a sequence of strings, not a single string")
    out: dict[str, Any] = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"malformed override {item!r}: {_OVERRIDE_USAGE}")
        if not _KEY_RE.match(key):
            raise ConfigError(f"malformed override key {key!r} in {item!r}: {_OVERRIDE_USAGE}")
        if not text.strip():
            raise ConfigError(
                f"override {item!r} has an empty value; write {key}=null for None or "
                f"{key}=\"''\" for an empty string"
            )
        _set_dotted(out, key, parse_yaml(text, source=f"override {item!r}"), item)
    return out


def _set_dotted(data: dict[str, Any], key: str, value: Any, item: str) -> None:
    """``data[a][b][c] = value`` for ``key = "a.b.c"``; ``item`` names the override in errors."""
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(
                f"override {item!r}: {'.'.join(parts[: depth + 1])!r} is "
                f"{_describe(child)}, not a section, so it has no key {parts[depth + 1]!r}"
            )
        node = child
    node[parts[-1]] = value


def with_overrides(config: T, *overrides: str, **values: Any) -> T:
    """A copy of the config dataclass ``config`` with dotted overrides, checked like
    :func:`load_config` (unknown keys, types, ``__post_init__``)::

        cfg = with_overrides(AttributeConfig(), "train.epochs=5", "steering.site=final_hidden")
        cfg = with_overrides(cfg, **{"train.epochs": 5, "design.per_example": 10})

    Strings are ``key=value`` overrides parsed as on the command line; keyword arguments give
    Python values for dotted keys (nested dataclasses and tuples are converted).
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"with_overrides needs a config dataclass instance, got {config!r}")
    data = apply_overrides(to_dict(config), overrides)
    for key, value in values.items():
        if not _KEY_RE.match(key):
            raise ConfigError(f"malformed override key {key!r}: {_OVERRIDE_USAGE}")
        _set_dotted(data, key, to_dict(value), f"{key}={value!r}")
    return from_dict(type(config), data)


def load_config(
    cls: type[T],
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Load ``cls`` from a YAML file (optional; defaults only when ``None``) plus overrides.

    The file's top level must be a mapping (an empty file means all defaults). Notes belong in
    YAML comments: every key must be a field. Raises :class:`ConfigError` for a missing file,
    YAML syntax errors (with file and line), duplicate keys and anything :func:`from_dict`
    rejects.
    """
    data: Any = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"{p} is a directory, not a config file; pass a YAML file such "
                              f"as configs/attribute_default.yaml (CLI: --config)")
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}; check the path (CLI: --config)")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p} is not valid UTF-8 ({e}); save the config file as UTF-8") \
                from None
        data = parse_yaml(text, source=str(p))
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"{p}: the top level of a config file must be a mapping of keys, "
                f"got {_describe(data)}"
            )
    data = apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        if path is None:
            raise
        raise ConfigError(f"{e} (loading {path})") from e


def dump_config(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write ``obj`` (a config dataclass) to ``path`` as YAML in field order, atomically.
    :func:`load_config` reads the file back to an equal config."""
    text = yaml.dump(to_dict(obj), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True)
    atomic_write_text(path, text)


def config_fingerprint(obj: Any) -> str:
    """SHA-256 hex digest of the canonical JSON of ``to_dict(obj)`` (sorted keys, no spaces).

    Independent of key order and stable across processes and machines; artifacts are stamped
    with it so that a stage can tell whether its inputs were made with the same settings.
    """
    canonical = json.dumps(
        to_dict(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# help text
# --------------------------------------------------------------------------------------------


def option(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse
    """A dataclass field with help text: ``x: int = option(3, "what x controls")``.

    Mutable defaults (dataclass instances, lists, dicts, sets) become a ``default_factory``
    that deep-copies them. Pass ``dataclasses.MISSING`` for a required field. Extra keyword
    arguments go to :func:`dataclasses.field` (``metadata`` is merged with the help).
    """
    metadata = {**kw.pop("metadata", {}), "help": help}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata, **kw)
    if (dataclasses.is_dataclass(default) and not isinstance(default, type)) or isinstance(
        default, (list, dict, set)
    ):
        return dataclasses.field(
            default_factory=lambda: copy.deepcopy(default), metadata=metadata, **kw
        )
    return dataclasses.field(default=default, metadata=metadata, **kw)


def _nested_dataclass(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``X`` or ``X | None``), if any."""
    if _is_dataclass_type(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1 and _is_dataclass_type(inner[0]):
            return inner[0]
    return None


def _walk(cls: type, prefix: str = ""):
    hints = _hints(cls)
    for f in _init_fields(cls):
        key = prefix + f.name
        yield key, f, hints[f.name]
        sub = _nested_dataclass(hints[f.name])
        if sub is not None:
            yield from _walk(sub, key + ".")


def field_help(cls: type) -> dict[str, str]:
    """Help text of every field of ``cls`` and its nested config dataclasses, by dotted key
    (``""`` where a field has none). A nested section's own entry comes before its fields."""
    return {key: f.metadata.get("help", "") for key, f, _ in _walk(cls)}


def missing_help(cls: type) -> list[str]:
    """Dotted keys of fields that lack help text (for a test that keeps configs documented)."""
    return [key for key, text in field_help(cls).items() if not text.strip()]


def format_config_help(cls: type) -> str:
    """Human-readable listing of every config key: type, default and help (``--help-config``)."""
    lines = []
    for key, f, tp in _walk(cls):
        if f.default is not dataclasses.MISSING:
            default = f"default: {json.dumps(to_dict(f.default))}"
        elif f.default_factory is not dataclasses.MISSING:
            made = f.default_factory()
            default = "" if dataclasses.is_dataclass(made) else f"default: {json.dumps(to_dict(made))}"
        else:
            default = "required"
        sub = _nested_dataclass(tp)
        kind = f"section {sub.__name__}" if sub is not None else _type_name(tp)
        meta = ", ".join(x for x in (kind, default) if x)
        lines.append(f"{key} ({meta})")
        text = f.metadata.get("help", "")
        if text:
            lines.append(f"    {text}")
    return "\n".join(lines)
