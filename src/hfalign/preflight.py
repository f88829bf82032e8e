"""Every check that can run before a model loads, behind one entry point: what `hfalign validate` runs, and what
`hfalign train` runs first.

    recipe.load(path, overrides) -> preflight.check(recipe) -> Checked -> stages.run(checked)

The recipe's schema is checked by recipe.load; here come the checks that need the stage: `train:` against the
stage's config class, the model directory and adapters, every data row of local files (read once, kept in Checked
for the stage to use), callbacks, and the stage's own rules (e.g. PPO's batch arithmetic).
"""

from __future__ import annotations

from dataclasses import dataclass

from hfalign import callbacks, data, models, stages, trainargs
from hfalign.errors import located
from hfalign.recipe import Recipe


@dataclass
class Checked:
    """A fully checked recipe, and the rows of its local data files (None for a hub set, read when the stage runs)."""

    recipe: Recipe
    rows: dict[str, list[dict] | None]


def check(recipe: Recipe, judge: bool = True) -> Checked:
    """`judge`: also let the trainer config class judge `train:` as a whole (imports the trainer stack, ~4 s);
    `hfalign validate` leaves that to the run's start, which repeats every check with it."""
    with located(recipe.source):
        stage = stages.get(recipe.stage)
        trainargs.check(recipe, stage.config_class, judge)
        models.check_model(recipe.model)
        if recipe.model.adapter:
            models.check_adapter_base(recipe.model.adapter, recipe.model.name_or_path, "model.adapter")
        rows = data.check(recipe.data, recipe.stage, stage.FORMATS)
        callbacks.check(recipe)
        stage.check(recipe, rows)
    return Checked(recipe, rows)
