"""`hfalign launch [accelerate options] RECIPE [overrides]`: check first, then `accelerate launch ... -m hfalign`.

Under `accelerate launch`, a user mistake raised inside the ranks ends in accelerate's ChildFailedError traceback.
Here everything a recipe can be checked for before any process starts is checked in this one process (the same
checks as `hfalign validate`, plus the run directory: a finished run, or checkpoints with resume off), so a mistake
is one line and exit 2. Without --num_processes, the launch uses every GPU it sees (one process on a CPU).
"""

from __future__ import annotations

import os
import subprocess
import sys

from hfalign.errors import UserError


def split(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """accelerate options, the recipe, the recipe's overrides: the recipe is the first argument naming a YAML file."""
    for i, arg in enumerate(argv):
        if arg.endswith((".yaml", ".yml")) and not (i and argv[i - 1] == "--config_file"):
            return argv[:i], arg, argv[i + 1:]
    raise UserError("hfalign launch needs a recipe (a .yaml file) after the accelerate options.",
                    fix="hfalign launch [--config_file accelerate_configs/zero3.yaml ...] RECIPE.yaml [key=value ...]")


def command(accelerate: list[str], recipe: str, overrides: list[str]) -> list[str]:
    if not any(a == "--num_processes" or a.startswith("--num_processes=") for a in accelerate):
        import torch

        accelerate = [*accelerate, "--num_processes", str(max(1, torch.cuda.device_count()))]
    return [sys.executable, "-m", "accelerate.commands.launch", *accelerate, "-m", "hfalign", recipe, *overrides]


def launch(argv: list[str]) -> int:
    from hfalign import preflight, recipe, rundir

    accelerate, path, overrides = split(argv)
    checked = preflight.check(recipe.load(path, overrides))
    rundir.decide(checked.recipe)  # a finished run or a run that cannot resume: said here, not inside the ranks
    cmd = command(accelerate, path, overrides)
    print("hfalign launch:", " ".join(cmd[1:]), flush=True)
    return subprocess.run(cmd, env=os.environ.copy()).returncode
