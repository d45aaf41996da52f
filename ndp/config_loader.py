"""Strict conversion of plain YAML data into the typed config tree.

Why a loader of our own: the config is a tree of frozen dataclasses (see `ndp.config`), and
every mistake must fail at load with the dotted path of the field and what is allowed,
e.g. ``model.tables[3].embedding_dim: expected int, got str 'x'``. The loader walks the
dataclass type hints; each dataclass may define ``validate(self, path)`` for rules that span
fields, called after its fields are converted.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from ndp.errors import ConfigError

T = TypeVar("T")


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
        value = yaml.safe_load(text) if text.strip() else ""
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
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, raw, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{where}: {_describe(raw)} fits none of {tp}"
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
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{where}: expected an integer, got {_describe(raw)}")
        return raw
    if tp is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ConfigError(f"{where}: expected a number, got {_describe(raw)}")
        return float(raw)
    if tp is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{where}: expected a string, got {_describe(raw)}")
        return raw
    raise TypeError(f"config loader does not support type {tp!r} at {where}")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
