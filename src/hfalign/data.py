"""Datasets: local jsonl/json/parquet/csv files or hub ids, renamed and checked row by row against a format.

Every malformed row fails with the file and the line (jsonl, csv) or row index (json, parquet), before any model
loads. Output datasets keep only the format's columns, so TRL's trainers see exactly what they expect. Which formats
a stage takes is the stage's own declaration (`FORMATS` in stages/<stage>.py); local files are read and checked once,
by preflight (`check`), and `load` builds the datasets from those rows.
"""

from __future__ import annotations

import json
import os

from hfalign.errors import UserError
from hfalign.recipe import DATA_SUFFIXES, DataSection

FORMATS = {  # format: (required columns, optional columns)
    "messages": (("messages",), ()),
    "prompt_completion": (("prompt", "completion"), ()),
    "text": (("text",), ()),
    "preference": (("chosen", "rejected"), ("prompt",)),
    "prompt": (("prompt",), ()),
}
ROLES = ("system", "user", "assistant", "tool")


def _read_local(path: str) -> tuple[list[dict], str]:
    """Rows of a local file, and how to name a row in errors ('line' or 'row')."""
    if path.endswith(".jsonl"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"line {i} is not valid JSON ({e.msg}).", where=path, fix="fix or remove that line") from None
                if not isinstance(row, dict):
                    raise UserError(f"line {i} must be a JSON object, got {type(row).__name__}.", where=path, fix="write one {...} per line")
                row["__pos__"] = f"line {i}"
                rows.append(row)
        return rows, "line"
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"is not valid JSON (line {e.lineno}: {e.msg}).", where=path, fix="fix the JSON or use .jsonl") from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))
        if not isinstance(data, list):
            raise UserError("must hold a JSON list of objects.", where=path, fix="write [{...}, {...}] or use .jsonl")
        rows = []
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise UserError(f"row {i} must be an object, got {type(row).__name__}.", where=path, fix="make every item an object")
            rows.append({**row, "__pos__": f"row {i}"})
        return rows, "row"
    import datasets

    kind = "csv" if path.endswith(".csv") else "parquet"
    try:
        ds = datasets.load_dataset(kind, data_files=path, split="train")
    except Exception as e:  # datasets raises many types for unreadable files
        raise UserError(f"could not be read as {kind}: {e}", where=path, fix=f"check that it is a valid {kind} file") from None
    offset, unit = (2, "line") if kind == "csv" else (0, "row")  # csv: 1-based, after the header
    return [{**row, "__pos__": f"{unit} {i + offset}"} for i, row in enumerate(ds)], unit


def _read_hub(name: str, split: str, subset: str | None) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as e:  # offline, missing, gated: say which and how to fix
        raise UserError(f"could not load hub dataset {name!r} (split {split!r}): {type(e).__name__}: {e}",
                        fix="check the id and split, your network, or download it and point data at a local file") from None
    return [{**row, "__pos__": f"row {i}"} for i, row in enumerate(ds)]


def read_rows(source: str, split: str, subset: str | None) -> list[dict]:
    if _is_local(source):
        return _read_local(source)[0]
    return _read_hub(source, split, subset)


def _bad(source: str, row: dict, what: str, fix: str) -> UserError:
    return UserError(f"{row['__pos__']}: {what}", where=source, fix=fix)


def _check_messages(value, source, row, col) -> None:
    if not isinstance(value, list) or not value:
        raise _bad(source, row, f"'{col}' must be a non-empty list of {{role, content}} messages.", "see the data formats in docs/recipes.md")
    for j, msg in enumerate(value):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
            raise _bad(source, row, f"'{col}[{j}]' must be {{role: {'|'.join(ROLES)}, content: text}}, got {msg!r}.",
                       "fix that message")


def _check_text(value, source, row, col, conversational_ok: bool) -> None:
    if conversational_ok and isinstance(value, list):
        _check_messages(value, source, row, col)
    elif not isinstance(value, str):
        raise _bad(source, row, f"'{col}' must be text, got {type(value).__name__}.", f"make '{col}' a string")
    elif not value.strip():
        raise _bad(source, row, f"'{col}' is empty.", f"remove the row or fill in '{col}'")


def detect_format(row: dict, stage: str, formats: tuple[str, ...], source: str) -> str:
    for fmt in formats:
        if all(c in row for c in FORMATS[fmt][0]):
            return fmt
    wanted = " or ".join("+".join(FORMATS[f][0]) for f in formats)
    cols = ", ".join(k for k in row if k != "__pos__")
    raise UserError(f"{row['__pos__']}: has columns [{cols}]; stage {stage!r} needs {wanted}.", where=source,
                    fix="rename columns with data.columns (hfalign name: your column) or set data.format")


def check_rows(rows: list[dict], section: DataSection, stage: str, formats: tuple[str, ...],
               source: str) -> tuple[list[dict], str]:
    """Rename, detect the format, check every row; return clean rows holding only the format's columns."""
    if not rows:
        raise UserError("has no rows.", where=source, fix="point data at a non-empty file")
    fmt = section.format if section.format != "auto" else detect_format(_renamed(rows[0], section), stage, formats, source)
    if fmt not in formats:
        raise UserError(f"data.format {fmt!r} does not fit stage {stage!r}.", fix=f"use one of {', '.join(formats)}")
    required, optional = FORMATS[fmt]
    clean = []
    for raw in rows:
        for ours, theirs in section.columns.items():
            if theirs not in raw:
                raise _bad(source, raw, f"missing column '{theirs}' (named by data.columns.{ours}).",
                           f"fix data.columns.{ours} or the file")
        row = _renamed(raw, section)
        for col in required:
            if col not in row:
                hint = f" (data.columns.{col} = {section.columns[col]!r})" if col in section.columns else ""
                raise _bad(source, row, f"missing column '{col}'{hint}.", f"add '{col}' or map it with data.columns.{col}")
        for col in (*required, *[c for c in optional if c in row]):
            if fmt == "messages":
                _check_messages(row[col], source, row, col)
            else:
                _check_text(row[col], source, row, col, conversational_ok=fmt != "text")
        clean.append({c: row[c] for c in (*required, *optional) if c in row})
    if fmt == "preference" and len({("prompt" in r) for r in clean}) > 1:
        raise UserError("some rows have 'prompt' and some do not.", where=source, fix="give every row a prompt, or none")
    return clean, fmt


def _renamed(row: dict, section: DataSection) -> dict:
    out = dict(row)
    for ours, theirs in section.columns.items():
        if theirs in row:
            out[ours] = out.pop(theirs)
    return out


def _is_local(source: str) -> bool:
    return source.endswith(DATA_SUFFIXES) or os.path.exists(source)


def _checked(section: DataSection, stage: str, formats: tuple[str, ...], key: str) -> list[dict]:
    source, split = (section.train, section.split) if key == "train" else (section.eval, section.eval_split)
    rows, _fmt = check_rows(read_rows(source, split, section.subset), section, stage, formats, source)
    return rows[: section.max_rows] if key == "train" and section.max_rows else rows


def check(section: DataSection, stage: str, formats: tuple[str, ...]) -> dict[str, list[dict] | None]:
    """Read and check the local files now (what `hfalign validate` reports); hub sets are read by `load`.
    Returns {"train": rows, "eval": rows}, None where the source is a hub set or absent."""
    return {key: _checked(section, stage, formats, key) if source and _is_local(source) else None
            for key, source in (("train", section.train), ("eval", section.eval))}


def load(section: DataSection, stage: str, formats: tuple[str, ...], checked: dict | None = None):
    """(train, eval) as datasets.Dataset, from the rows `check` returned (local files are not read twice) or from
    the hub; eval is None when neither data.eval nor data.eval_fraction is set."""
    import datasets

    checked = checked or {}
    rows = checked.get("train") or _checked(section, stage, formats, "train")
    train = datasets.Dataset.from_list(rows)
    if section.eval:
        return train, datasets.Dataset.from_list(checked.get("eval") or _checked(section, stage, formats, "eval"))
    if section.eval_fraction:
        split = train.train_test_split(test_size=section.eval_fraction, seed=section.seed)
        return split["train"], split["test"]
    return train, None
