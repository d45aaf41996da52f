"""Strict conversion of plain YAML data into the typed config tree.

Why a loader of our own: the config is a tree of frozen dataclasses (see `ndp.config`), and
every mistake must fail at load with the dotted path of the field and what is allowed,
e.g. ``model.tables[3].embedding_dim: expected int, got str 'x'``. The loader walks the
dataclass type hints; each dataclass may define ``validate(self, path)`` for rules that span
fields, called after its fields are converted.

Where PyYAML's YAML 1.1 reading would make a config mean something else than it says, the
loader reads it differently (``load_yaml``, used for config files and ``--set`` values):

- a key given twice in one mapping is a ``ConfigError`` naming its dotted path and both
  lines (PyYAML keeps the last one silently); a key after a ``<<`` merge still overrides;
- numbers are read in every YAML 1.2 spelling: ``1e-3``, ``-1e9``, ``1E5``, ``-.5`` are floats,
  where YAML 1.1 wants a dot and a signed exponent and reads them as strings (quote a string
  that looks like a number: ``name: '1e5'``; ``dump_yaml`` does so);
- a float field refuses NaN and infinities (``.nan``, ``.inf``, ``1e999``), naming the field;
- an int field takes a float only when it is a whole number exactly representable as one
  (``1e6`` -> 1000000; ``2.5`` and ``1e20``, past 2**53, are refused).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from ndp.errors import ConfigError

T = TypeVar("T")

_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
"""YAML 1.1's float pattern (as PyYAML has it) plus YAML 1.2's spellings: no dot needed
before an exponent, an unsigned exponent, a sign before a leading dot."""
_MAX_EXACT_INT = 2**53
"""Past this a float is no longer an exact integer (float64 has a 53-bit significand)."""


def _with_yaml12_floats(resolvers: dict[Any, list]) -> dict[Any, list]:
    """PyYAML's implicit resolvers with the float pattern swapped for `_FLOAT` in place
    (same first characters, same order, so ints and timestamps resolve as before)."""
    return {
        first: [(tag, _FLOAT if tag == _FLOAT_TAG else regexp) for tag, regexp in entries]
        for first, entries in resolvers.items()
    }


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader reading YAML 1.2 number spellings as numbers."""

    yaml_implicit_resolvers = _with_yaml12_floats(yaml.SafeLoader.yaml_implicit_resolvers)


class _ConfigDumper(yaml.SafeDumper):
    """SafeDumper that quotes every string `_ConfigLoader` would read as a number."""

    yaml_implicit_resolvers = _with_yaml12_floats(yaml.SafeDumper.yaml_implicit_resolvers)


def load_yaml(text: str, source: str, path: str = "") -> Any:
    """Parse one YAML document as the config reads it (see the module docstring).

    Args:
        text: the YAML text.
        source: where it came from, for messages (a file name, ``--set KEY=VALUE``).
        path: dotted config path of the document's root (the key of a ``--set``).

    Raises:
        ConfigError: a key appears twice in one mapping.
        yaml.YAMLError: the text is not valid YAML.
    """
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, path, source, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def dump_yaml(data: Any) -> str:
    """YAML text that `load_yaml` reads back to `data` (keys in the order given)."""
    return yaml.dump(data, Dumper=_ConfigDumper, sort_keys=False)


def _refuse_duplicate_keys(node: yaml.Node, path: str, source: str, seen: set[int]) -> None:
    """Walk the composed node tree (before construction, while line numbers are known)."""
    if id(node) in seen:  # an alias points back at a node already walked
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{path}[{i}]", source, seen)
    elif isinstance(node, yaml.MappingNode):
        first_seen: dict[tuple[str, str], yaml.Node] = {}
        for key, value in node.value:
            if key.tag == _MERGE_TAG or not isinstance(key, yaml.ScalarNode):
                continue
            name = _join(path, str(key.value))
            earlier = first_seen.setdefault((key.tag, key.value), key)
            if earlier is not key:
                raise ConfigError(
                    f"{name}: duplicate key, {_lines(earlier, key)} of {source}; YAML would "
                    "silently keep only the last one, so give it once"
                )
            _refuse_duplicate_keys(value, name, source, seen)


def _problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error (PyYAML's own message spans several, with a caret)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return problem if mark is None else f"{problem} at column {mark.column + 1}"


def _lines(first: yaml.Node, second: yaml.Node) -> str:
    """`lines 3 and 7` (1-based), or `line 1, columns 2 and 10` for a one-line flow mapping."""
    a, b = first.start_mark, second.start_mark
    if a.line != b.line:
        return f"lines {a.line + 1} and {b.line + 1}"
    return f"line {a.line + 1}, columns {a.column + 1} and {b.column + 1}"


def from_dict(cls: type[T], raw: Any, path: str = "") -> T:
    """Build dataclass `cls` from `raw` (a mapping), rejecting unknown keys and wrong types."""
    return _convert(cls, raw, path)


def to_dict(obj: Any) -> Any:
    """Inverse of `from_dict`: plain dicts/lists/scalars, fit for YAML or JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set a.b[0].c=value`` overrides to a raw config mapping (values parsed as YAML).

    Integer path parts index into lists: ``model.tables.0.num_rows=10`` and
    ``model.tables[0].num_rows=10`` are the same override.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.steps=100")
        key, _, text = item.partition("=")
        parts = [p for p in key.replace("[", ".").replace("]", "").split(".") if p]
        if not parts:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = load_yaml(text, f"--set {item}", ".".join(parts)) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"--set {item!r}: the value is not valid YAML: {_problem(exc)}"
            ) from None
        node: Any = raw
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"--set {key}: {where} is not an index of a list of {len(node)} items"
                    )
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:  # the value reached so far is a scalar: name it, not the key below it
                raise ConfigError(f"--set {key}: {'.'.join(parts[:depth])} is not a section")
    return raw


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal after each field)."""
    import ast
    import inspect
    import textwrap

    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0]
    docs: dict[str, str] = {}
    statements = getattr(body, "body", [])
    for stmt, nxt in zip(statements, statements[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, raw: Any, path: str) -> Any:
    where = path or "<config>"
    origin = get_origin(tp)

    if dataclasses.is_dataclass(tp):
        if not isinstance(raw, Mapping):
            raise ConfigError(
                f"{where}: expected a mapping (section {tp.__name__}), got {_describe(raw)}"
            )
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise ConfigError(
                f"{_join(path, str(unknown[0]))}: unknown key; allowed keys here: "
                + ", ".join(sorted(fields))
            )
        kwargs = {}
        for name, field in fields.items():
            sub = _join(path, name)
            if name in raw:
                kwargs[name] = _convert(hints[name], raw[name], sub)
            elif (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            ):
                raise ConfigError(f"{sub}: required field is missing")
        obj = tp(**kwargs)
        validate = getattr(obj, "validate", None)
        if validate is not None:
            validate(path)
        return obj

    if origin is Literal:
        allowed = get_args(tp)
        if raw not in allowed or type(raw) is not type(next((a for a in allowed if a == raw), raw)):
            raise ConfigError(f"{where}: {raw!r} is not allowed; allowed values: {_type_name(tp)}")
        return raw

    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if raw is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{where}: must not be null")
        errors = {}
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, raw, path)
            except ConfigError as exc:
                errors[option] = str(exc)
        # The one option of raw's shape (a number for `float | list[float]` given a number)
        # says what is wrong with it better than "fits none".
        fitting = [e for option, e in errors.items() if _same_shape(option, raw)]
        raise ConfigError(
            fitting[0] if len(fitting) == 1 else f"{where}: {_describe(raw)} fits none of {tp}"
        )

    if origin in (list, tuple):
        if not isinstance(raw, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {_describe(raw)}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(raw)]
        return tuple(items) if origin is tuple else items

    if origin is dict:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {_describe(raw)}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {
            _convert(key_tp, k, where): _convert(val_tp, v, _join(path, str(k)))
            for k, v in raw.items()
        }

    if tp is Any:
        return raw
    if tp is bool:
        if not isinstance(raw, bool):
            raise ConfigError(f"{where}: expected true or false, got {_describe(raw)}")
        return raw
    if tp is int:
        if isinstance(raw, float) and raw.is_integer() and abs(raw) <= _MAX_EXACT_INT:
            return int(raw)  # `1e6`: YAML has no exponent spelling for integers
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{where}: expected an integer, got {_describe(raw)}")
        return raw
    if tp is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ConfigError(f"{where}: expected a number, got {_describe(raw)}")
        try:
            number = float(raw)
        except OverflowError:  # an int past float's range
            raise ConfigError(
                f"{where}: an integer of {len(str(raw))} digits is not a finite "
                "number; NaN and infinities are refused"
            ) from None
        if not math.isfinite(number):
            raise ConfigError(
                f"{where}: {raw!r} is not a finite number; NaN and infinities are refused"
            )
        return number
    if tp is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{where}: expected a string, got {_describe(raw)}")
        return raw
    raise TypeError(f"config loader does not support type {tp!r} at {where}")


def _same_shape(tp: Any, raw: Any) -> bool:
    """Whether `raw` is a list for a list type, a mapping for a section or map, else a scalar."""
    if get_origin(tp) in (list, tuple):
        return isinstance(raw, list | tuple)
    if dataclasses.is_dataclass(tp) or get_origin(tp) is dict:
        return isinstance(raw, Mapping)
    return not isinstance(raw, list | tuple | Mapping)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
