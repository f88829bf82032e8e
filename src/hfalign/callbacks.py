"""Every TrainerCallback hfalign ships, and the registry that recipes name them by (`callbacks: [metrics, ...]`).

A registry entry is a factory `make(recipe, **options)`; a recipe entry is a name or `{name: ..., option: value}`.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
import sys
import time
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
    """Append every logged dict to `<output_dir>/metrics.jsonl` and show it on the console (main process only): one
    line per log with the step, the share done and an ETA; on a terminal, one progress bar rewritten in place
    instead (the logs' lines are still in metrics.jsonl)."""

    def __init__(self, output_dir: str, console: bool = True, keys: list[str] | None = None, stream=None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.console = console
        self.keys = keys  # keys shown on the console; None = all
        self.stream = stream  # None: sys.stdout at print time
        self.start = None  # (time, step) when this process began training: a resumed run's ETA counts its own pace
        self.bar_open = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = (time.monotonic(), state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if not self.console:
            return
        stream = self.stream or sys.stdout
        shown = " | ".join(f"{k} {_fmt(v)}" for k, v in logs.items() if self.keys is None or k in self.keys)
        if stream.isatty() and state.max_steps:
            width = 24
            done = min(width, width * state.global_step // state.max_steps)
            line = f"[{'#' * done}{'.' * (width - done)}] {progress(self.start, state)} | {shown}"
            cols = shutil.get_terminal_size((120, 20)).columns
            stream.write("\r" + line[:cols - 1].ljust(cols - 1))  # one bar, rewritten in place
            self.bar_open = True
        else:
            stream.write(f"[{progress(self.start, state)}] {shown}\n")
        stream.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar_open:  # what comes next starts on a line of its own
            (self.stream or sys.stdout).write("\n")
            self.bar_open = False


def progress(start, state) -> str:
    """'step 40/120 33% eta 1m20s': the ETA from this process's own pace (steps done since it began)."""
    if not state.max_steps:
        return f"step {state.global_step}"
    text = f"step {state.global_step}/{state.max_steps} {100 * state.global_step // state.max_steps}%"
    if start is not None and state.global_step > start[1]:
        per_step = (time.monotonic() - start[0]) / (state.global_step - start[1])
        text += f" eta {_duration(per_step * (state.max_steps - state.global_step))}"
    return text


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Guard(TrainerCallback):
    """A PPO guard: after every update `trip(metrics)` answers why the run is going wrong, or None. PPOTrainer then
    acts: `warn` prints, `stop` saves a checkpoint and stops, `rollback` restores the newest checkpoint's weights and
    optimizer state and continues with the KL coefficient times `kl_factor` and the learning rate times `lr_factor`
    (at most `max_rollbacks` times, then it stops). Reward hacking shows as KL running away or answers collapsing
    while the score rises (PPO_NOTES #15, "Secrets of RLHF" §5)."""

    name = "guard"

    def __init__(self, action: str = "warn", kl_factor: float = 2.0, lr_factor: float = 1.0, max_rollbacks: int = 3):
        self.action, self.kl_factor, self.lr_factor, self.max_rollbacks = action, kl_factor, lr_factor, max_rollbacks
        self.rollbacks = 0

    def trip(self, metrics: dict) -> str | None:
        raise NotImplementedError


class KLGuardCallback(Guard):
    """objective/kl above `max_kl` (nats per response)."""

    name = "KL guard"

    def __init__(self, max_kl: float, action: str = "warn", **kw):
        super().__init__(action, **kw)
        self.max_kl = max_kl

    def trip(self, metrics: dict) -> str | None:
        kl = metrics.get("objective/kl")
        return None if kl is None or kl <= self.max_kl else f"objective/kl {kl:.3g} > max_kl {self.max_kl}"


class CollapseGuardCallback(Guard):
    """Answers degenerating while the score is above its mean over the first `window` updates: response length or
    entropy below `drop` x their early mean, or the share of repeated bigrams in a response (val/repetition) above
    its early mean + `rise`. The policy found short, certain or repetitive answers the reward model still likes."""

    name = "collapse guard"
    FALLING = ("val/response_length", "policy/entropy_avg")
    RISING = ("val/repetition",)  # optional: a metric stream without it is watched for the falling ones only

    def __init__(self, window: int = 5, drop: float = 0.5, rise: float = 0.15, action: str = "warn", **kw):
        super().__init__(action, **kw)
        self.window, self.drop, self.rise, self.seen = window, drop, rise, []

    def trip(self, metrics: dict) -> str | None:
        keys = (*self.FALLING, "objective/scores")
        if any(k not in metrics for k in keys):
            return None
        rising = [k for k in self.RISING if k in metrics and all(k in m for m in self.seen)]
        if len(self.seen) < self.window:
            self.seen.append({k: metrics[k] for k in (*keys, *self.RISING) if k in metrics})
            return None
        ref = {k: sum(m[k] for m in self.seen) / len(self.seen) for k in (*keys, *rising)}
        if metrics["objective/scores"] <= ref["objective/scores"]:
            return None
        for key in self.FALLING:
            if metrics[key] < self.drop * ref[key]:
                return f"{key} {metrics[key]:.3g} < {self.drop} x its early mean {ref[key]:.3g} while the score rose"
        for key in rising:
            if metrics[key] > ref[key] + self.rise:
                return f"{key} {metrics[key]:.3g} > its early mean {ref[key]:.3g} + {self.rise} while the score rose"
        return None


class SampleTableCallback(TrainerCallback):
    """PPO: every `every` updates, append `rows` (update, prompt, completion, score, ended_with: the stop token that
    ended the response, null when cut at response_length) rows to <output_dir>/samples.jsonl, and send the same rows
    to the run's trackers that show tables: TensorBoard (a markdown table under the text tab, tag `samples`), Trackio
    (a trackio.Table, key `samples`). Other trackers get the metrics only."""

    def __init__(self, output_dir: str, every: int = 10, rows: int = 8):
        self.path, self.every, self.rows = Path(output_dir) / "samples.jsonl", every, rows

    def on_rollout(self, args, state, control, samples=None, callbacks=(), **kwargs):
        update = state.global_step + 1  # called during the update, before the step counter moves
        if not state.is_world_process_zero or not samples or (update % self.every and update != 1):
            return
        rows = [{key: values[i] for key, values in samples.items()} for i in range(min(self.rows, len(samples["prompt"])))]
        with open(self.path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"update": update, **row}) + "\n")
        to_trackers(rows, update, callbacks)


def to_trackers(rows: list[dict], update: int, callbacks) -> None:
    """The sample rows as a table in each tracker (transformers' integration callbacks) that has one."""
    columns = list(rows[0]) if rows else []
    for cb in callbacks:
        kind = type(cb).__name__
        if kind == "TensorBoardCallback" and getattr(cb, "tb_writer", None) is not None:
            cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731 (one markdown cell)
            table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            table += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
            cb.tb_writer.add_text("samples", "\n".join(table), update)
            cb.tb_writer.flush()
        elif kind == "TrackioCallback" and getattr(cb, "_initialized", False):
            cb._trackio.log({"samples": cb._trackio.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])},
                            step=update)


def make_metrics(recipe, console: bool = True, keys: list[str] | None = None):
    return MetricsCallback(recipe.output_dir, console=console, keys=keys)


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
    return KLGuardCallback(float(max_kl), **_guard_options("kl_guard", action, kl_factor, lr_factor, max_rollbacks))


def make_collapse_guard(recipe, window: int = 5, drop: float = 0.5, rise: float = 0.15, action: str = "warn",
                        kl_factor: float = 2.0, lr_factor: float = 1.0, max_rollbacks: int = 3):
    if not isinstance(window, int) or window < 1 or not isinstance(drop, (int, float)) or not 0 < drop < 1 \
            or not isinstance(rise, (int, float)) or not 0 < rise < 1:
        raise UserError(f"collapse_guard needs window >= 1, 0 < drop < 1 and 0 < rise < 1, got window={window!r}, "
                        f"drop={drop!r}, rise={rise!r}.",
                        fix="e.g. {name: collapse_guard, window: 5, drop: 0.5, rise: 0.15, action: rollback}")
    return CollapseGuardCallback(window, float(drop), float(rise), **_guard_options("collapse_guard", action, kl_factor, lr_factor,
                                                                      max_rollbacks))


def make_sample_table(recipe, every: int = 10, rows: int = 8):
    if not isinstance(every, int) or every < 1 or not isinstance(rows, int) or rows < 1:
        raise UserError(f"sample_table needs every >= 1 and rows >= 1, got every={every!r}, rows={rows!r}.",
                        fix="e.g. {name: sample_table, every: 10, rows: 8}")
    return SampleTableCallback(recipe.output_dir, every, rows)


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


def build(recipe) -> list[TrainerCallback]:
    check(recipe)
    return [REGISTRY[name](recipe, **options) for name, options in map(_spec, recipe.callbacks)]


def quiet_printer(trainer) -> None:
    """Drop transformers' raw-dict printer when our metrics callback prints a concise line instead."""
    from transformers.trainer_callback import PrinterCallback

    if any(isinstance(cb, MetricsCallback) and cb.console for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(PrinterCallback)
