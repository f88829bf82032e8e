"""The fields of a stage's trainer config (trl.SFTConfig, trl.RewardConfig, hfalign PPOConfig) without importing it.

Importing any of those classes imports transformers' Trainer stack (torch, peft, bitsandbytes: ~4 s), which
`hfalign validate` must not pay. The first time a stage's fields are asked for under a given set of library
versions they are read from the class and written to a small JSON cache; after that they come from the cache:

    ~/.cache/hfalign/train-fields-<key>-<stage>.json     (HFALIGN_CACHE_DIR or XDG_CACHE_HOME move it)

The key covers the versions of trl, transformers and accelerate, and the sources of hfalign's PPOConfig and of this
module, so a changed library, config or encoding means a fresh read. Types are stored in the terms schema.coerce
understands: enums become the Literal of their values (what coerce accepted for them anyway; `Enum | str` too, because the class converts the
string with the enum), classes of other libraries become Any.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

JSON_SCALARS = (str, int, float, bool, type(None))


def spec(stage: str, config_class) -> dict[str, tuple[Any, Any]]:
    """{field name: (type, default)} of the stage's config class (init fields only); default None where the class
    computes it. `config_class`: the stage module's function that imports the class (called only on a cache miss).
    The stage is handed in, not looked up, so this module imports no stage (stages -> trainargs -> trainfields)."""
    path = _cache_dir() / f"train-fields-{_key()}-{stage}.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = _read(config_class())
        _write(path, raw)
    return {name: (_decode(tp), default) for name, (tp, default) in raw.items()}


def _read(cls: type) -> dict:
    """The class's fields, read from the class itself (the slow import was paid to get it)."""
    import dataclasses

    from hfalign.schema import field_types

    hints = field_types(cls)
    out = {f.name: (_encode(hints[f.name]), f.default if isinstance(f.default, JSON_SCALARS) else None)
           for f in dataclasses.fields(cls) if f.init}
    for f in dataclasses.fields(cls):
        if f.init and isinstance(f.default, enum.Enum):
            out[f.name] = (out[f.name][0], f.default.value)
    return out


def _key() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for package in ("trl", "transformers", "accelerate"):
        try:
            parts.append(f"{package}={version(package)}")
        except PackageNotFoundError:
            parts.append(f"{package}=none")
    for source in (Path(__file__).parent / "ppo" / "config.py", Path(__file__)):  # hfalign's config, this encoding
        parts.append(hashlib.sha1(source.read_bytes()).hexdigest())
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def _cache_dir() -> Path:
    if os.environ.get("HFALIGN_CACHE_DIR"):
        return Path(os.environ["HFALIGN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hfalign"


def _write(path: Path, raw: dict) -> None:
    """Best effort: an unwritable cache only means the next check reads the classes again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(raw), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass


def _encode(tp) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and str in args:  # `IntervalStrategy | str`: the class converts the string with the enum, so only
            args = tuple(a for a in args if a is not str)  # its values pass (said now, not at the run's start)
        return {"union": [_encode(a) for a in args]}
    if origin is Literal:
        return {"literal": list(typing.get_args(tp))}
    if origin in (list, tuple) or tp in (list, tuple):
        args = typing.get_args(tp)
        return {"list": _encode(args[0]) if args else "any"}
    if origin is dict or tp is dict:
        return "dict"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"literal": [m.value for m in tp]}
    names = {int: "int", float: "float", str: "str", bool: "bool", type(None): "none"}
    return names.get(tp, "any")


def _decode(code) -> Any:
    if isinstance(code, dict):
        if "union" in code:
            return Union[tuple(_decode(a) for a in code["union"])]  # noqa: UP007 (built from a list)
        if "literal" in code:
            return Literal[tuple(code["literal"])]
        return list[_decode(code["list"])]
    return {"int": int, "float": float, "str": str, "bool": bool, "none": type(None), "dict": dict}.get(code, Any)
