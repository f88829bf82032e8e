"""mkdocs hook: the recipe reference page, generated at every build from the same source `hfalign schema` and
validation read (the Recipe dataclasses and each stage's trainer config class), so it cannot drift from the code."""

from __future__ import annotations

import dataclasses

from mkdocs.structure.files import File

PAGE = "reference/recipe.md"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def _shown(default) -> str:
    return "required" if default == "required" else repr(default)  # schema.field_default's word for no default


def _recipe_rows(cls) -> list[str]:
    from hfalign.schema import schema_rows

    return [f"| **`{key}`** | section | | {_cell(help_)} |" if tp is None else
            f"| `{key}` | {_cell(tp)} | `{_cell(_shown(default))}` | {_cell(help_)} |"
            for key, tp, default, help_ in schema_rows(cls)]


def _train_rows(cls) -> tuple[list[str], list[str]]:
    """(the class's own fields, the ones it inherits from transformers' TrainingArguments)."""
    from transformers import TrainingArguments

    from hfalign.schema import describe, field_default, field_types

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    own, inherited, types_ = [], [], field_types(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        row = (f"| `train.{f.name}` | {_cell(describe(types_[f.name]))} | `{_cell(_shown(field_default(f)))}` | "
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
