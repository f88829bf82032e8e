"""Every TrainerCallback hfalign ships, and the registry that recipes name them by (`callbacks: [metrics, ...]`).

A registry entry is a factory `make(recipe, **options)`; a recipe entry is a name or `{name: ..., option: value}`.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

from transformers import TrainerCallback

from hfalign.errors import UserError


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


class MetricsCallback(TrainerCallback):
    """Append every logged dict to `<output_dir>/metrics.jsonl` and print one concise line (main process only)."""

    def __init__(self, output_dir: str, console: bool = True, keys: list[str] | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.console = console
        self.keys = keys  # keys shown on the console line; None = all

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self.console:
            shown = {k: v for k, v in logs.items() if self.keys is None or k in self.keys}
            total = f"/{state.max_steps}" if state.max_steps else ""
            print(f"[step {state.global_step}{total}] " + " | ".join(f"{k} {_fmt(v)}" for k, v in shown.items()), flush=True)


def make_metrics(recipe, console: bool = True, keys: list[str] | None = None):
    return MetricsCallback(recipe.output_dir, console=console, keys=keys)


REGISTRY = {
    "metrics": make_metrics,
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


def build(recipe) -> list[TrainerCallback]:
    check(recipe)
    return [REGISTRY[name](recipe, **options) for name, options in map(_spec, recipe.callbacks)]


def quiet_printer(trainer) -> None:
    """Drop transformers' raw-dict printer when our metrics callback prints a concise line instead."""
    from transformers.trainer_callback import PrinterCallback

    if any(isinstance(cb, MetricsCallback) and cb.console for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(PrinterCallback)
