"""`hfalign export` (issue 10, item 3): every adapter layout hfalign writes becomes one full model that loads with
the Auto classes and computes what the adapters computed (fp32, 1e-4)."""

from __future__ import annotations

import pytest
import torch
from helpers import cli

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 51, 52, 53, 54, 55, 56]])


def exported(run, tmp_path, causal=True):
    out = tmp_path / "export"
    code, _, err = cli("export", str(run), str(out))
    assert code == 0, err
    files = {"config.json", "tokenizer.json"} | ({"generation_config.json"} if causal else set())
    assert files <= {p.name for p in out.iterdir()}
    return out


def test_sft_adapter_merges_to_the_same_logits(lora_pipeline, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = exported(lora_pipeline["sft"], tmp_path)
    stacked = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lora_pipeline["base"]), lora_pipeline["sft"])
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(IDS).logits, stacked(IDS).logits,
                                   rtol=1e-4, atol=1e-4)
    assert AutoTokenizer.from_pretrained(out).chat_template  # the template travels with it


def test_reward_adapter_on_the_sft_adapter_merges_to_the_same_scores(lora_pipeline, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from hfalign import models

    out = exported(lora_pipeline["rm"], tmp_path, causal=False)
    base = AutoModelForSequenceClassification.from_pretrained(lora_pipeline["base"], num_labels=1)
    base.config.pad_token_id = 0
    stacked = PeftModel.from_pretrained(models.apply_adapter(base, str(lora_pipeline["sft"]), trainable=False),
                                        lora_pipeline["rm"])  # the reward adapter stays unmerged: the reference
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    with torch.no_grad():
        want, got = stacked(IDS).logits, merged(IDS).logits
    assert want.shape == got.shape == (2, 1) and want.abs().max() > 0.01
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_ppo_policy_adapter_and_full_runs_export(lora_ppo_run, lora_pipeline, pipeline, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ppo = lora_ppo_run
    out = exported(ppo, tmp_path)
    stacked = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lora_pipeline["base"]), ppo)
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(IDS).logits, stacked(IDS).logits,
                                   rtol=1e-4, atol=1e-4)
    half = tmp_path / "half"
    code, _, err = cli("export", str(pipeline["sft"]), str(half), "--dtype", "bf16")  # a full run, re-saved
    assert code == 0, err
    assert next(AutoModelForCausalLM.from_pretrained(half).parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("case", ["not a run", "taken"])
def test_export_refuses(case, pipeline, tmp_path):
    code, _, err = cli("export", str(tmp_path if case == "not a run" else pipeline["sft"]),
                       str(pipeline["rm"] if case == "taken" else tmp_path / "x"))
    assert code == 2 and ("not a finished hfalign run" if case == "not a run" else "already holds a model") in err
