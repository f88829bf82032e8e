"""One module per stage, each with `run(recipe)` of the same numbered steps."""


def run(recipe) -> dict:
    from importlib import import_module

    return import_module(f"hfalign.stages.{recipe.stage}").run(recipe)
