"""Parse plain YAML data straight into typed dataclasses, with errors that name the dotted key.

Generic machinery only; the recipe's sections live in recipe.py. `parse_into(cls, data, where)` checks unknown keys
(naming the nearest valid one), types (coercing `1e-5` strings into floats, which YAML 1.1 reads as strings), then
calls the section's own `check(where)` for ranges and files.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from typing import Any, Literal, Union

from hfalign.errors import UserError

MISSING = dataclasses.MISSING


def doc(text: str, **kw) -> dict:
    """Field metadata: the one place a recipe field is documented (`hfalign schema` prints it)."""
    return {"help": text, **kw}


def nearest(key: str, allowed: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(sorted(allowed))}"


def check_keys(data: dict, allowed: typing.Iterable[str], where: str) -> None:
    allowed = list(allowed)
    for key in data:
        if key not in allowed:
            path = f"{where}.{key}" if where else str(key)
            raise UserError(f"unknown key '{path}'.", fix=f"remove it or rename it; {nearest(str(key), allowed)}")


def describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def coerce(value: Any, tp: Any) -> Any:
    """Return `value` as type `tp`, or raise _Mismatch. Unknown or exotic types are accepted as they are."""
    if tp is Any or tp is object or isinstance(tp, (str, typing.TypeVar)):
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arm in sorted(typing.get_args(tp), key=lambda a: a is str):  # try str last: "1e-5" is a float first
            if arm is type(None):
                continue
            try:
                return coerce(value, arm)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        value = _yaml_bool_word(value, typing.get_args(tp))
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):  # True == 1, but not here
            return value
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list):
            raise _Mismatch
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return [coerce(v, item) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        value = _yaml_bool_word(value, [m.value for m in tp])
        if isinstance(value, tp) or (not isinstance(value, bool) and value in [m.value for m in tp]):  # a list: no
            return value
        raise _Mismatch
    return value


def _yaml_bool_word(value: Any, choices) -> Any:
    """YAML 1.1 reads a bare `no`/`yes` as a boolean; where the choices are words, take the word that was meant."""
    if isinstance(value, bool):
        word = "yes" if value else "no"
        if word in choices:
            return word
    return value


def field_types(cls: type) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # some third-party configs carry unresolvable annotations; check what resolves
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def check_value(value: Any, tp: Any, path: str) -> Any:
    try:
        return coerce(value, tp)
    except _Mismatch:
        hint = " (YAML reads bare yes/no/on/off as booleans: quote the word)" if isinstance(value, bool) else ""
        raise UserError(f"'{path}' must be {describe(tp)}, got {value!r}{hint}.", fix=f"set '{path}' to {describe(tp)}") from None


def parse_into(cls: type, data: Any, where: str):
    """Build dataclass `cls` from mapping `data`; nested dataclass fields recurse with a longer dotted path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"'{where}' must be a mapping of keys to values, got {data!r}.", fix=f"write '{where}:' as a section")
    types_ = field_types(cls)
    check_keys(data, types_, where)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        path = f"{where}.{f.name}" if where else f.name
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise UserError(f"'{path}' is required.", fix=f"add '{path}': {f.metadata.get('help', '')}")
            continue
        tp = types_[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = parse_into(tp, data[f.name], path)
        else:
            kwargs[f.name] = check_value(data[f.name], tp, path)
    obj = cls(**kwargs)
    if hasattr(obj, "check"):
        obj.check(where)
    return obj


def field_default(f: dataclasses.Field):
    """A dataclass field's default: its value, its factory's value, or "required"."""
    if f.default is not MISSING:
        return f.default
    return "required" if f.default_factory is MISSING else f.default_factory()


def schema_rows(cls: type, prefix: str = "") -> list[tuple[str, str | None, object, str]]:
    """(dotted key, type in words or None for a section, default, help) per field, sections before their keys."""
    rows, types_ = [], field_types(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("hidden"):
            continue
        path, tp = f"{prefix}{f.name}", types_[f.name]
        section = f.metadata.get("section") or (tp if dataclasses.is_dataclass(tp) else None)
        if section:
            rows.append((path, None, None, f.metadata.get("help", "")))
            rows += schema_rows(section, prefix=path + ".")
        else:
            rows.append((path, describe(tp), field_default(f), f.metadata.get("help", "")))
    return rows


def describe_schema(cls: type, prefix: str = "") -> list[str]:
    """One line per field: dotted key, type, default, help. Used by `hfalign schema`; docs/hooks.py renders the same
    rows (schema_rows) as tables."""
    return [f"{key}:  {help_}" if tp is None else f"{key}  ({tp}; default {default!r})  {help_}"
            for key, tp, default, help_ in schema_rows(cls, prefix)]
