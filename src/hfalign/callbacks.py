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

# Files callbacks append to in the run directory, each with the record key that holds its step: on resume the run
# directory trims them back to the checkpoint, so no step is logged twice.
LOG_FILES = {"metrics.jsonl": "step", "samples.jsonl": "update"}


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


class KLGuardCallback(TrainerCallback):
    """PPO: when objective/kl passes `max_kl`, warn, or (action: stop) save a checkpoint and stop training.
    KL running away is the first sign of reward hacking (PPO_NOTES #15)."""

    def __init__(self, max_kl: float, action: str = "warn"):
        self.max_kl, self.action, self.tripped = max_kl, action, False

    def on_log(self, args, state, control, logs=None, **kwargs):
        kl = (logs or {}).get("objective/kl")
        if kl is None or kl <= self.max_kl:
            return
        self.tripped = True
        if state.is_world_process_zero:
            verb = "stopping and saving" if self.action == "stop" else "warning only"
            print(f"hfalign: KL guard: objective/kl {kl:.3g} > max_kl {self.max_kl} at update {state.global_step} ({verb})",
                  flush=True)
        if self.action == "stop":
            control.should_save = True
            control.should_training_stop = True


class SampleTableCallback(TrainerCallback):
    """PPO: every `every` updates, append `rows` (update, prompt, completion, score) rows to <output_dir>/samples.jsonl."""

    def __init__(self, output_dir: str, every: int = 10, rows: int = 8):
        self.path, self.every, self.rows = Path(output_dir) / "samples.jsonl", every, rows

    def on_rollout(self, args, state, control, samples=None, **kwargs):
        update = state.global_step + 1  # called during the update, before the step counter moves
        if not state.is_world_process_zero or not samples or (update % self.every and update != 1):
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps({"update": update, "prompt": prompt, "completion": completion, "score": score}) + "\n" for prompt, completion, score in list(zip(samples["prompt"], samples["completion"], samples["score"]))[: self.rows])


def make_metrics(recipe, console: bool = True, keys: list[str] | None = None):
    return MetricsCallback(recipe.output_dir, console=console, keys=keys)


def make_kl_guard(recipe, max_kl: float = 20.0, action: str = "warn"):
    if action not in ("warn", "stop") or not isinstance(max_kl, (int, float)) or max_kl <= 0:
        raise UserError(f"kl_guard needs max_kl > 0 and action warn|stop, got max_kl={max_kl!r}, action={action!r}.",
                        fix="e.g. {name: kl_guard, max_kl: 20, action: stop}")
    return KLGuardCallback(float(max_kl), action)


def make_sample_table(recipe, every: int = 10, rows: int = 8):
    if not isinstance(every, int) or every < 1 or not isinstance(rows, int) or rows < 1:
        raise UserError(f"sample_table needs every >= 1 and rows >= 1, got every={every!r}, rows={rows!r}.",
                        fix="e.g. {name: sample_table, every: 10, rows: 8}")
    return SampleTableCallback(recipe.output_dir, every, rows)


REGISTRY = {
    "metrics": make_metrics,
    "kl_guard": make_kl_guard,  # PPO
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


def build(recipe) -> list[TrainerCallback]:
    check(recipe)
    return [REGISTRY[name](recipe, **options) for name, options in map(_spec, recipe.callbacks)]


def quiet_printer(trainer) -> None:
    """Drop transformers' raw-dict printer when our metrics callback prints a concise line instead."""
    from transformers.trainer_callback import PrinterCallback

    if any(isinstance(cb, MetricsCallback) and cb.console for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(PrinterCallback)
