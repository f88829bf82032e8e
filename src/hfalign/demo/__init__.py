"""The embedded default and the robustness tasks: tiny models built offline (tiny.py) and small preference tasks with
rule-based true objectives. Not part of the product: they exist so that `make ppo`, the tests and
benchmarks/ppo_robustness.py run offline on CPU.

    reviews  task.py   short movie reviews; the rule scores positivity (the embedded default)
    lists    lists.py  name fruits; the reward model's data favours longer lists (length tempts)
    slots    slots.py  fill a meeting form with a valid day and time (slots a reward model can be fooled on)
"""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path

TASKS = {"reviews": "hfalign.demo.task", "lists": "hfalign.demo.lists", "slots": "hfalign.demo.slots"}


def get_task(name: str):
    return import_module(TASKS[name])


def write_data(name: str, out_dir: str | Path, seed: int = 0) -> list[Path]:
    """The task's sft/rm/ppo files as .jsonl under out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for split, rows in get_task(name).generate(seed).items():
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        written.append(path)
    return written
