"""Real 2-process DeepSpeed runs on CPU through `accelerate launch ... -m hfalign` (the users' command)."""

from __future__ import annotations

import pytest
import torch
from helpers import ACCELERATE, ROOT, read_jsonl, run
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("precision, port", [("no", 29531), ("bf16", 29533)])
def test_zero3_sft_two_processes(write_recipe, sft_recipe, tiny_model, tmp_path, precision, port):
    """Also with `--mixed_precision bf16` on the launch (it died on 'ds bf16.enabled=True vs hf bf16=False')."""
    from transformers import AutoModelForCausalLM

    sft_recipe["data"]["max_rows"] = 128
    sft_recipe["train"].update(per_device_train_batch_size=8, logging_steps=2)
    path = write_recipe(sft_recipe)
    run([*ACCELERATE, "--config_file", str(ROOT / "accelerate_configs/zero3.yaml"), "--num_processes", "2",
         "--mixed_precision", precision, "--main_process_port", str(port), "-m", "hfalign", str(path)])
    out = tmp_path / "out"
    records = read_jsonl(out / "metrics.jsonl")
    train_end = next(r for r in records if "train_runtime" in r)
    assert train_end["step"] == 128 // (8 * 2)  # two processes really shared the data: world size 2
    saved = load_file(str(out / "model.safetensors"))
    base = load_file(str(tiny_model / "model.safetensors"))
    assert saved.keys() == base.keys()
    assert all(saved[k].shape == base[k].shape and saved[k].numel() > 0 for k in base)  # gathered, not empty shards
    assert any(not torch.equal(saved[k], base[k]) for k in base)
    AutoModelForCausalLM.from_pretrained(out)


def test_two_simulated_nodes_with_the_multi_node_config(write_recipe, sft_recipe, tmp_path):
    """accelerate_configs/multi_node.yaml, one process per 'node', both on 127.0.0.1 (the standard launcher)."""
    import subprocess

    sft_recipe["data"]["max_rows"] = 128
    sft_recipe["train"].update(per_device_train_batch_size=8, logging_steps=2)
    path = write_recipe(sft_recipe)
    cmd = [*ACCELERATE, "--config_file", str(ROOT / "accelerate_configs/multi_node.yaml"), "--num_machines", "2",
           "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", "29532"]
    nodes = [subprocess.Popen([*cmd, "--machine_rank", str(rank), "-m", "hfalign", str(path)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    records = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert next(r for r in records if "train_runtime" in r)["step"] == 128 // (8 * 2)  # one world of 2 processes
