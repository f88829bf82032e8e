"""The TrainerCallbacks hfalign ships (recipes name them through hfalign.callbacks' registry, which builds them).
The PPO guards live in hfalign.ppo.guards, beside the code that acts on their verdicts.
This module imports transformers; hfalign.callbacks does not, so checking a recipe's callbacks stays cheap."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from hfalign.ppo.guards import CollapseGuardCallback, KLGuardCallback  # noqa: F401 (built by name from here)


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
