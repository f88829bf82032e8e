"""SFT and RM stages end to end on the tiny model: parameters change, outputs are written and reload with the
standard HF classes, the run directory refuses to be clobbered and resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from helpers import cli, read_jsonl
from safetensors.torch import load_file

SMALL = {"data.max_rows=96", "train.per_device_train_batch_size=16", "train.logging_steps=2", "train.save_strategy=steps",
         "train.save_steps=3"}


def train(write_recipe, recipe: dict, *overrides: str, name="r.yaml"):
    code, out, err = cli("train", str(write_recipe(recipe, name)), *sorted(SMALL), *overrides)
    assert code == 0, err[-3000:]
    return out


def weights(path) -> dict:
    return load_file(str(Path(path) / "model.safetensors"))


def assert_changed(before: dict, after: dict, prefix=""):
    common = [k for k in after if k in before and k.startswith(prefix)]
    assert common
    changed = [k for k in common if not torch.equal(before[k], after[k])]
    assert len(changed) == len(common), f"unchanged: {sorted(set(common) - set(changed))[:5]}"


def test_sft_full_then_rm_full(write_recipe, sft_recipe, tiny_model, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    sft_out = Path(sft_recipe["output_dir"])
    train(write_recipe, sft_recipe)
    assert_changed(weights(tiny_model), weights(sft_out))
    lines = read_jsonl(sft_out / "metrics.jsonl")
    assert any("loss" in ln for ln in lines) and any("eval_loss" in ln for ln in lines)
    assert yaml.safe_load((sft_out / "recipe.resolved.yaml").read_text())["stage"] == "sft"
    assert json.loads((sft_out / "versions.json").read_text())["trl"]
    assert (sft_out / "hfalign_done.json").exists()
    model = AutoModelForCausalLM.from_pretrained(sft_out)
    tok = AutoTokenizer.from_pretrained(sft_out)
    assert model.generation_config.eos_token_id == tok.eos_token_id != tok.pad_token_id

    rm = {"stage": "rm", "output_dir": str(tmp_path / "rm"), "model": {"name_or_path": str(sft_out)},
          "data": {"train": str(data_dir / "rm_train.jsonl"), "eval": str(data_dir / "rm_eval.jsonl")},
          "train": {"num_train_epochs": 1, "learning_rate": 1e-3, "max_length": 48}}
    train(write_recipe, rm, name="rm.yaml")
    rm_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert rm_model.config.num_labels == 1
    assert_changed(weights(sft_out), weights(tmp_path / "rm"), prefix="model.layers")
    logged = read_jsonl(tmp_path / "rm" / "metrics.jsonl")
    assert any("eval_accuracy" in ln for ln in logged)


def test_sft_lora_then_rm_lora_on_the_sft_adapter(write_recipe, sft_recipe, tiny_model, data_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    sft_out = Path(sft_recipe["output_dir"])
    train(write_recipe, sft_recipe, "lora.enabled=true", "lora.r=4", "train.learning_rate=1e-2")
    assert (sft_out / "adapter_model.safetensors").exists() and not (sft_out / "model.safetensors").exists()
    adapter = load_file(str(sft_out / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items()), "LoRA B is still zero: nothing learned"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), sft_out)
    assert model.peft_config["default"].r == 4

    rm = {"stage": "rm", "output_dir": str(tmp_path / "rm"),
          "model": {"name_or_path": str(tiny_model), "adapter": str(sft_out)},
          "lora": {"enabled": True, "r": 4}, "data": {"train": str(data_dir / "rm_train.jsonl")},
          "train": {"num_train_epochs": 1, "learning_rate": 1e-2, "max_length": 48}}
    train(write_recipe, rm, name="rm.yaml")
    rm_adapter = load_file(str(tmp_path / "rm" / "adapter_model.safetensors"))
    assert any("score" in k for k in rm_adapter), "the value head must be saved with the adapter"
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    PeftModel.from_pretrained(base, tmp_path / "rm")


def test_refuses_clobber_and_resumes(write_recipe, sft_recipe):
    out = Path(sft_recipe["output_dir"])
    train(write_recipe, sft_recipe)
    code, _, err = cli("train", str(write_recipe(sft_recipe)), *sorted(SMALL))
    assert code == 2 and "already holds a finished sft run" in err and "overwrite=true" in err
    # simulate a crash after checkpoint 3: drop the finish marker and the final checkpoint
    (out / "hfalign_done.json").unlink()
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for extra in ckpts[1:]:
        shutil.rmtree(extra)
    out_text = train(write_recipe, sft_recipe)
    assert f"resuming sft from {ckpts[0]}" in out_text
    records = read_jsonl(out / "metrics.jsonl")
    steps = [r["step"] for r in records if "loss" in r]  # per-step train logs (not eval_loss, not train_loss)
    assert len(steps) == len(set(steps)), f"duplicated train log steps after resume: {steps}"
    assert steps[0] < int(ckpts[0].name.split("-")[1]) < steps[-1]  # logs from before and after the crash survive
    assert (out / "hfalign_done.json").exists()


def test_foreign_nonempty_dir_is_refused(write_recipe, sft_recipe):
    out = Path(sft_recipe["output_dir"])
    out.mkdir(parents=True)
    (out / "precious.txt").write_text("mine")
    code, _, err = cli("train", str(write_recipe(sft_recipe)))
    assert code == 2 and "not an hfalign run directory" in err
    assert (out / "precious.txt").read_text() == "mine"


def test_qlora_sft_stage(write_recipe, sft_recipe, tiny_model):
    """QLoRA through the stage: 4-bit NF4 base (bitsandbytes on CPU) + a LoRA adapter that learns."""
    out = Path(sft_recipe["output_dir"])
    train(write_recipe, sft_recipe, "lora.enabled=true", "lora.r=4", "quantization.load_in_4bit=true",
          "quantization.compute_dtype=float32", "train.learning_rate=1e-2")
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model)


def test_messages_sft_with_tensorboard(write_recipe, sft_recipe, data_dir, tmp_path):
    """Conversational rows through the tokenizer's chat template, and report_to: tensorboard writing events."""
    rows = read_jsonl(data_dir / "sft_train.jsonl")[:64]
    convo = tmp_path / "convo.jsonl"
    convo.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                      {"role": "assistant", "content": r["completion"].strip()}]}) + "\n"
                             for r in rows))
    sft_recipe["data"] = {"train": str(convo)}
    out = Path(sft_recipe["output_dir"])
    train(write_recipe, sft_recipe, "train.report_to=[tensorboard]")
    assert list((out / "runs").rglob("events.out.tfevents.*")), "no tensorboard event file"
    assert any("loss" in r for r in read_jsonl(out / "metrics.jsonl"))


def test_resume_trims_metrics_including_a_line_cut_by_the_crash(tmp_path):
    from hfalign.rundir import _trim_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "loss": 1}\n{"step": 4, "loss": 0.9}\n{"step": 6, "loss": 0.8}\n{"step": 8, "lo')
    _trim_metrics(path, 4)
    assert [r["step"] for r in read_jsonl(path)] == [2, 4]
