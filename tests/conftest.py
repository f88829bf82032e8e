"""Shared fixtures: a tiny model and the default pipeline built once per session, recipe writing.
Helpers live in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, train_shipped

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from hfalign.demo.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """The pretrained tiny base of recipes/lora (`make tiny-base`: 300 steps of plain language modelling, ~8 s)."""
    from hfalign.demo.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny-llama-base", pretrain_steps=300)


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


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, tiny_model) -> dict:
    """The embedded default's SFT and RM, trained once per session with the shipped recipes (about 25 s)."""
    root = tmp_path_factory.mktemp("pipeline")
    sft, rm = root / "sft", root / "rm"
    for recipe, out, model in (("sft.yaml", sft, tiny_model), ("rm.yaml", rm, sft)):
        code, _, err = train_shipped(recipe, f"output_dir={out}", f"model.name_or_path={model}")
        assert code == 0, err[-3000:]
    return {"root": root, "sft": sft, "rm": rm, "base": tiny_model}


@pytest.fixture(scope="session")
def lora_pipeline(tmp_path_factory, tiny_model) -> dict:
    """A LoRA SFT adapter and a LoRA reward adapter trained on top of it (same base): the shared-base inputs."""
    root = tmp_path_factory.mktemp("lora_pipeline")
    sft, rm = root / "sft", root / "rm"
    code, _, err = train_shipped("sft.yaml", f"output_dir={sft}", f"model.name_or_path={tiny_model}",
                                "lora.enabled=true", "lora.r=8", "train.learning_rate=1e-2", "train.num_train_epochs=1",
                                "data.max_rows=512")
    assert code == 0, err[-3000:]
    code, _, err = train_shipped("rm.yaml", f"output_dir={rm}", f"model.name_or_path={tiny_model}",
                                f"model.adapter={sft}", "lora.enabled=true", "lora.r=8", "train.learning_rate=1e-2",
                                "train.num_train_epochs=1", "data.max_rows=512")
    assert code == 0, err[-3000:]
    return {"root": root, "sft": sft, "rm": rm, "base": tiny_model}


@pytest.fixture(scope="session")
def ppo_run(pipeline) -> Path:
    """A short full-weight PPO run of the embedded default on the session pipeline (64 episodes); its console output
    is kept beside it in ppo.stdout."""
    from helpers import ppo_args

    out = pipeline["root"] / "ppo"
    code, stdout, err = train_shipped("ppo.yaml", *ppo_args(pipeline, out, "train.total_episodes=64"))
    assert code == 0, err[-3000:]
    (pipeline["root"] / "ppo.stdout").write_text(stdout, encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def lora_ppo_run(lora_pipeline) -> Path:
    """A short shared-base LoRA PPO run: the policy adapter starts from the SFT adapter, the reward adapter on it."""
    from helpers import ROOT

    out = lora_pipeline["root"] / "ppo"
    code, _, err = train_shipped("ppo.yaml", f"output_dir={out}", f"model.name_or_path={lora_pipeline['base']}",
                                 f"model.adapter={lora_pipeline['sft']}", f"reward.model={lora_pipeline['rm']}",
                                 "lora.enabled=true", "lora.r=8", "train.total_episodes=64", "train.num_eval_prompts=8",
                                 f"data.train={ROOT / 'data/ppo_prompts.jsonl'}")
    assert code == 0, err[-3000:]
    return out
