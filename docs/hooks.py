"""mkdocs hook: the recipe reference page, generated at every build from the same source `hfalign schema` and
validation read (the Recipe dataclasses and each stage's trainer config class), so it cannot drift from the code."""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING

from mkdocs.structure.files import File

PAGE = "reference/recipe.md"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def _default(f) -> str:
    if f.default is not MISSING:
        return repr(f.default)
    return "required" if f.default_factory is MISSING else repr(f.default_factory())


def _recipe_rows(cls, prefix: str = "") -> list[str]:
    from hfalign.schema import describe, field_types

    rows, types_ = [], field_types(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("hidden"):
            continue
        tp, key = types_[f.name], f"{prefix}{f.name}"
        section = f.metadata.get("section") or (tp if dataclasses.is_dataclass(tp) else None)
        if section:
            rows.append(f"| **`{key}`** | section | | {_cell(f.metadata.get('help', ''))} |")
            rows += _recipe_rows(section, key + ".")
            continue
        rows.append(f"| `{key}` | {_cell(describe(tp))} | `{_cell(_default(f))}` | {_cell(f.metadata.get('help', ''))} |")
    return rows


def _train_rows(cls) -> tuple[list[str], list[str]]:
    """(the class's own fields, the ones it inherits from transformers' TrainingArguments)."""
    from transformers import TrainingArguments

    from hfalign.schema import describe, field_types

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    own, inherited, types_ = [], [], field_types(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        row = (f"| `train.{f.name}` | {_cell(describe(types_[f.name]))} | `{_cell(_default(f))}` | "
               f"{_cell(f.metadata.get('help', ''))} |")
        (inherited if f.name in base else own).append(row)
    return own, inherited


def reference() -> str:
    from hfalign.recipe import Recipe
    from hfalign.stages import STAGES

    head = "| key | type | default | meaning |\n|---|---|---|---|"
    out = ["# Recipe reference", "",
           "Generated from the code at every docs build (`docs/hooks.py`): the same dataclasses `hfalign schema` "
           "prints and `hfalign validate` checks against. A recipe is YAML; nested keys are written as sections "
           "(`model:` then `name_or_path: ...`) or dotted on the command line (`model.name_or_path=...`).", "",
           "## Every stage", "", head, *_recipe_rows(Recipe), ""]
    for name, stage in STAGES.items():
        cls = stage.config_class()
        own, inherited = _train_rows(cls)
        out += [f"## `train:` of stage `{name}` ({cls.__module__}.{cls.__name__})", "",
                f"{len(own)} fields of {cls.__name__} itself, then the {len(inherited)} it inherits from "
                "transformers' `TrainingArguments`.", "", head, *own, "", "??? note \"TrainingArguments fields\"", "",
                *("    " + line for line in [*head.splitlines(), *inherited]), ""]
    return "\n".join(out) + "\n"


def on_files(files, config):
    files.append(File.generated(config, PAGE, content=reference()))
    return files
