"""The registry recipes name hfalign's callbacks by (`callbacks: [metrics, ...]`); the classes are in callback_types.

A registry entry is a factory `make(recipe, **options) -> (class name, constructor kwargs)` that checks the options
(so checking a recipe imports no trainer library); a recipe entry is a name or `{name: ..., option: value}`.
"""

from __future__ import annotations

import inspect

from hfalign.errors import UserError

# Files callbacks append to in the run directory, each with the record key that holds its step: on resume the run
# directory trims them back to the checkpoint, so no step is logged twice.
LOG_FILES = {"metrics.jsonl": "step", "samples.jsonl": "update"}


def make_metrics(recipe, console: bool = True, keys: list[str] | None = None):
    return "MetricsCallback", {"output_dir": recipe.output_dir, "console": console, "keys": keys}


def _guard_options(name: str, action, kl_factor, lr_factor, max_rollbacks) -> dict:
    if action not in ("warn", "stop", "rollback"):
        raise UserError(f"{name} action must be warn, stop or rollback, got {action!r}.", fix=f"e.g. {{name: {name}, action: rollback}}")
    numbers = {"kl_factor": kl_factor, "lr_factor": lr_factor}
    if any(not isinstance(v, (int, float)) or v <= 0 for v in numbers.values()) or not isinstance(max_rollbacks, int) \
            or max_rollbacks < 1:
        raise UserError(f"{name} needs kl_factor > 0, lr_factor > 0 and max_rollbacks >= 1, got {numbers}, "
                        f"max_rollbacks={max_rollbacks!r}.", fix="e.g. kl_factor: 2, lr_factor: 0.5, max_rollbacks: 3")
    return {"action": action, "kl_factor": float(kl_factor), "lr_factor": float(lr_factor), "max_rollbacks": max_rollbacks}


def make_kl_guard(recipe, max_kl: float = 20.0, action: str = "warn", kl_factor: float = 2.0, lr_factor: float = 1.0,
                  max_rollbacks: int = 3):
    if not isinstance(max_kl, (int, float)) or max_kl <= 0:
        raise UserError(f"kl_guard needs max_kl > 0 and action warn|stop|rollback, got max_kl={max_kl!r}.",
                        fix="e.g. {name: kl_guard, max_kl: 20, action: rollback}")
    return "KLGuardCallback", {"max_kl": float(max_kl), **_guard_options("kl_guard", action, kl_factor, lr_factor, max_rollbacks)}


def make_collapse_guard(recipe, window: int = 5, drop: float = 0.5, rise: float = 0.15, action: str = "warn",
                        kl_factor: float = 2.0, lr_factor: float = 1.0, max_rollbacks: int = 3):
    if not isinstance(window, int) or window < 1 or not isinstance(drop, (int, float)) or not 0 < drop < 1 \
            or not isinstance(rise, (int, float)) or not 0 < rise < 1:
        raise UserError(f"collapse_guard needs window >= 1, 0 < drop < 1 and 0 < rise < 1, got window={window!r}, "
                        f"drop={drop!r}, rise={rise!r}.",
                        fix="e.g. {name: collapse_guard, window: 5, drop: 0.5, rise: 0.15, action: rollback}")
    return "CollapseGuardCallback", {"window": window, "drop": float(drop), "rise": float(rise),
                                     **_guard_options("collapse_guard", action, kl_factor, lr_factor, max_rollbacks)}


def make_sample_table(recipe, every: int = 10, rows: int = 8):
    if not isinstance(every, int) or every < 1 or not isinstance(rows, int) or rows < 1:
        raise UserError(f"sample_table needs every >= 1 and rows >= 1, got every={every!r}, rows={rows!r}.",
                        fix="e.g. {name: sample_table, every: 10, rows: 8}")
    return "SampleTableCallback", {"output_dir": recipe.output_dir, "every": every, "rows": rows}


REGISTRY = {
    "metrics": make_metrics,
    "kl_guard": make_kl_guard,  # PPO
    "collapse_guard": make_collapse_guard,  # PPO
    "sample_table": make_sample_table,  # PPO
}


def _spec(entry) -> tuple[str, dict]:
    if isinstance(entry, str):
        return entry, {}
    entry = dict(entry)
    return entry.pop("name"), entry


def check(recipe) -> None:
    """Unknown callback names and options fail before anything loads."""
    for i, entry in enumerate(recipe.callbacks):
        name, options = _spec(entry)
        if name not in REGISTRY:
            raise UserError(f"'callbacks[{i}]': unknown callback {name!r}.", fix=f"use one of {', '.join(sorted(REGISTRY))}")
        params = inspect.signature(REGISTRY[name]).parameters
        for key in options:
            if key not in params or key == "recipe":
                allowed = [p for p in params if p != "recipe"]
                raise UserError(f"'callbacks[{i}].{key}': callback {name!r} has no option {key!r}.",
                                fix=f"options are: {', '.join(allowed) or 'none'}")
        REGISTRY[name](recipe, **options)  # the factory checks option values


def build(recipe) -> list:
    """The recipe's callbacks as TrainerCallback instances (imports transformers, through callback_types)."""
    from hfalign import callback_types

    check(recipe)
    made = [REGISTRY[name](recipe, **options) for name, options in map(_spec, recipe.callbacks)]
    return [getattr(callback_types, cls)(**kwargs) for cls, kwargs in made]


def quiet_printer(trainer) -> None:
    """Drop transformers' raw-dict printer when our metrics callback prints a concise line instead."""
    from transformers.trainer_callback import PrinterCallback

    from hfalign.callback_types import MetricsCallback

    if any(isinstance(cb, MetricsCallback) and cb.console for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(PrinterCallback)
