"""The recipe directories (issue 9): every shipped directory follows the Makefile's convention, and recipes/lora —
LoRA SFT -> LoRA RM -> shared-base LoRA PPO on a *pretrained* tiny base, and its QLoRA variant — learns on CPU about
as well as full fine-tuning (the numbers in the README)."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import ROOT, read_jsonl, train_shipped

from hfalign.recipe import load_tree

DIRS = sorted(p for p in (ROOT / "recipes").iterdir() if p.is_dir())


def test_every_recipe_directory_follows_the_make_convention():
    """`make ppo RECIPES=recipes/NAME VARIANT=V` runs NAME/{sft,rm,ppo}V.yaml and waits for
    outputs/NAMEV/<stage>/hfalign_done.json: each recipe must write there, and a variant must extend its plain file."""
    assert "lora" in [d.name for d in DIRS]
    for d in DIRS:
        for path in sorted(d.glob("*.yaml")):
            stage, _, variant = path.stem.partition("-")
            tree = load_tree(path)
            assert tree["stage"] == stage, path
            assert tree["output_dir"] == f"outputs/{d.name}{'-' + variant if variant else ''}/{stage}", path
            if variant:
                assert path.read_text().count(f"extends: {stage}.yaml") == 1, path
        assert {p.stem for p in d.glob("*.yaml") if "-" not in p.stem} == {"sft", "rm", "ppo"}, d


def test_pretrained_base_knows_the_language_but_not_the_task(tiny_base, tiny_model):
    """`make tiny-base`: plain language modelling on the task's text. Review text is likely under it (and far less
    likely under the random init), but a prompt is a finished document: it does not answer it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    text = tok(["the plot was great. the music felt long.</s>"], return_tensors="pt").input_ids
    loss = {p: AutoModelForCausalLM.from_pretrained(p)(text, labels=text).loss.item() for p in (tiny_base, tiny_model)}
    assert loss[tiny_base] < loss[tiny_model] - 2  # measured: 3.9 against 6.2 (= ln 512, a uniform guess)
    prompt = tok(["Write a review of the red door."], return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = AutoModelForCausalLM.from_pretrained(tiny_base)(prompt).logits[0, -1].argmax().item()
    assert next_id == tok.eos_token_id


@pytest.mark.parametrize("variant", ["", "-qlora"])
def test_lora_recipes_learn(variant, tiny_base, tmp_path):
    """The shipped recipes/lora budgets, end to end (SFT adapter -> RM adapter on it -> shared-base PPO)."""
    out = {stage: tmp_path / stage for stage in ("sft", "rm", "ppo")}
    paths = [f"model.name_or_path={tiny_base}"]
    code, _, err = train_shipped(f"lora/sft{variant}.yaml", f"output_dir={out['sft']}", *paths)
    assert code == 0, err[-3000:]
    paths.append(f"model.adapter={out['sft']}")
    code, _, err = train_shipped(f"lora/rm{variant}.yaml", f"output_dir={out['rm']}", *paths)
    assert code == 0, err[-3000:]
    code, _, err = train_shipped(f"lora/ppo{variant}.yaml", f"output_dir={out['ppo']}", f"reward.model={out['rm']}",
                                 *paths)
    assert code == 0, err[-3000:]
    assert "gemv_4bit" not in err  # the wrong-gradient kernel never ran (models.prepare_quantized)
    sft_loss = read_jsonl(out["sft"] / "metrics.jsonl", having="eval_loss")[-1]["eval_loss"]
    assert sft_loss < 1.3  # full SFT of the random-init default: 1.24
    assert read_jsonl(out["rm"] / "metrics.jsonl", having="eval_accuracy")[-1]["eval_accuracy"] > 0.95
    summary = json.loads((out["ppo"] / "summary.json").read_text())
    before, after = summary["before (reference)"], summary["after (policy)"]
    assert before["well_formed"] >= 0.95
    assert after["objective"] > before["objective"] + 0.5
    assert after["well_formed"] >= 0.95 and after["kl"] < 5
    resolved = yaml.safe_load((out["ppo"] / "recipe.resolved.yaml").read_text())
    assert resolved["quantization"]["load_in_4bit"] is bool(variant)
