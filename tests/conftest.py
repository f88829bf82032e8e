"""Shared fixtures: a tiny model built once per session, recipe writing, and an in-process CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from hfalign.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return ROOT / "data"


@pytest.fixture
def write_recipe(tmp_path):
    def write(data, name="recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data, encoding="utf-8")
        return path

    return write


@pytest.fixture
def sft_recipe(tiny_model, data_dir, tmp_path) -> dict:
    """A small valid SFT recipe as a dict: tweak it, write it, validate it."""
    return {
        "stage": "sft",
        "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": str(tiny_model)},
        "data": {"train": str(data_dir / "sft_train.jsonl"), "eval": str(data_dir / "sft_eval.jsonl")},
        "train": {"num_train_epochs": 1, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "max_length": 48},
    }


def cli(*args: str) -> tuple[int, str, str]:
    """Run the hfalign CLI in-process (fast: imports are shared); returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from hfalign.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def run(cmd: list[str], timeout: int = 900, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a real command (the CLI, accelerate launch) in a subprocess from the repo root."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


PYTHON = sys.executable
ACCELERATE = [PYTHON, "-m", "accelerate.commands.launch"]


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, tiny_model) -> dict:
    """The embedded default's SFT and RM, trained once per session with the shipped recipes (about 25 s)."""
    root = tmp_path_factory.mktemp("pipeline")
    sft, rm = root / "sft", root / "rm"
    for recipe, out, model in (("recipes/sft.yaml", sft, tiny_model), ("recipes/rm.yaml", rm, sft)):
        code, _, err = _cli_in_root("train", recipe, f"output_dir={out}", f"model.name_or_path={model}")
        assert code == 0, err[-3000:]
    return {"root": root, "sft": sft, "rm": rm, "base": tiny_model}


@pytest.fixture(scope="session")
def lora_pipeline(tmp_path_factory, tiny_model) -> dict:
    """A LoRA SFT adapter and a LoRA reward adapter trained on top of it (same base): the shared-base inputs."""
    root = tmp_path_factory.mktemp("lora_pipeline")
    sft, rm = root / "sft", root / "rm"
    code, _, err = _cli_in_root("train", "recipes/sft.yaml", f"output_dir={sft}", f"model.name_or_path={tiny_model}",
                                "lora.enabled=true", "lora.r=8", "train.learning_rate=1e-2", "train.num_train_epochs=1",
                                "data.max_rows=512")
    assert code == 0, err[-3000:]
    code, _, err = _cli_in_root("train", "recipes/rm.yaml", f"output_dir={rm}", f"model.name_or_path={tiny_model}",
                                f"model.adapter={sft}", "lora.enabled=true", "lora.r=8", "train.learning_rate=1e-2",
                                "train.num_train_epochs=1", "data.max_rows=512")
    assert code == 0, err[-3000:]
    return {"root": root, "sft": sft, "rm": rm, "base": tiny_model}


def _cli_in_root(*args):
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return cli(*args)
    finally:
        os.chdir(cwd)


def ppo_args(pipeline: dict, out, *extra: str) -> list[str]:
    """Overrides that point recipes/ppo.yaml at a test pipeline, with a small budget."""
    return [f"output_dir={out}", f"model.name_or_path={pipeline['sft']}", f"reward.model={pipeline['rm']}",
            "train.total_episodes=128", "train.num_eval_prompts=8", *extra]
