"""Helpers the tests share (imported as `from helpers import ...`; conftest.py holds only fixtures).

Nothing here changes the working directory: shipped recipes get absolute data paths through overrides instead.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ACCELERATE = [PYTHON, "-m", "accelerate.commands.launch"]


def read_jsonl(path, having: str | None = None) -> list[dict]:
    """The records of a .jsonl file (metrics.jsonl, samples.jsonl); with `having`, only those holding that key."""
    rows = [json.loads(ln) for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    return [r for r in rows if having is None or having in r]


def cli(*args: str) -> tuple[int, str, str]:
    """Run the hfalign CLI in-process (fast: imports are shared); returns (exit code, stdout, stderr)."""
    from hfalign.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def shipped(name: str) -> list[str]:
    """A recipe under recipes/ as CLI arguments: its absolute path, plus absolute overrides for the data files it
    names relative to the repository root, so it runs from any working directory."""
    from hfalign.recipe import load_tree

    path = ROOT / "recipes" / name
    data = load_tree(path).get("data") or {}
    fixes = [f"data.{key}={ROOT / data[key]}" for key in ("train", "eval")
             if isinstance(data.get(key), str) and (ROOT / data[key]).is_file()]
    return [str(path), *fixes]


def train_shipped(name: str, *overrides: str) -> tuple[int, str, str]:
    """`hfalign train recipes/NAME overrides...` in-process, from whatever directory the tests run in."""
    return cli("train", *shipped(name), *overrides)


def load_shipped(name: str, *overrides: str):
    """A shipped recipe loaded and checked as `hfalign train` would (without loading a model)."""
    from hfalign import preflight, recipe

    path, *fixes = shipped(name)
    return preflight.check(recipe.load(path, [*fixes, *overrides])).recipe


def run(cmd: list[str], timeout: int = 900, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a real command (the CLI, accelerate launch) in a subprocess from the repo root."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def ppo_args(pipeline: dict, out, *extra: str) -> list[str]:
    """Overrides that point recipes/ppo.yaml at a test pipeline, with a small budget."""
    return [f"output_dir={out}", f"model.name_or_path={pipeline['sft']}", f"reward.model={pipeline['rm']}",
            "train.total_episodes=128", "train.num_eval_prompts=8", *extra]
