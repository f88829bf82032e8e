"""The recipe directories (issue 9): every shipped directory follows the Makefile's convention, and recipes/lora —
LoRA SFT -> LoRA RM -> shared-base LoRA PPO on a *pretrained* tiny base, and its QLoRA variant — learns on CPU about
as well as full fine-tuning (the numbers in the README)."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import ROOT, read_jsonl, train_shipped

from hfalign.recipe import load_tree

DIRS = sorted(p for p in (ROOT / "recipes").iterdir() if p.is_dir() and p.name != "reward")  # reward/: PPO variants


def test_every_recipe_directory_follows_the_make_convention():
    """`make ppo RECIPES=recipes/NAME VARIANT=V` runs NAME/{sft,rm,ppo}V.yaml and waits for
    outputs/NAMEV/<stage>/hfalign_done.json: each recipe must write there, and a variant must extend its plain file.
    `make rloo` / `make grpo` likewise run NAME/{rloo,grpo}V.yaml, PPO-stage recipes writing outputs/NAMEV/rloo|grpo."""
    assert "lora" in [d.name for d in DIRS]
    for d in DIRS:
        for path in sorted(d.glob("*.yaml")):
            stage, _, variant = path.stem.partition("-")
            tree = load_tree(path)
            assert tree["stage"] == ("ppo" if stage in ("rloo", "grpo") else stage), path
            assert tree["output_dir"] == f"outputs/{d.name}{'-' + variant if variant else ''}/{stage}", path
            if variant:
                assert path.read_text().count(f"extends: {stage}.yaml") == 1, path
        assert {p.stem for p in d.glob("*.yaml") if "-" not in p.stem} - {"rloo", "grpo"} == {"sft", "rm", "ppo"}, d


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


# --- the family templates, end to end on tiny models of each family ------------------------------------------------

# template directory: (tiny family it runs on, the tokens its PPO responses may end with)
FAMILY_TEMPLATES = {
    "llama2": ("llama2", {"</s>"}),
    "llama3": ("llama3", {"<|eot_id|>", "<|end_of_text|>"}),
    "glm4": ("glm", {"<|endoftext|>", "<|user|>", "<|observation|>"}),
    # a converted ChatGLM3 is a native glm checkpoint (hfalign convert chatglm; tests/test_convert.py)
    "chatglm3": ("glm", {"<|endoftext|>", "<|user|>", "<|observation|>"}),
}


def test_family_templates_validate_offline():
    """As shipped, a family's first stage validates with no network (hub ids are not fetched by validate); the
    later stages and the converted ChatGLM3 need their local inputs first, and say which."""
    from helpers import cli

    for name in ("llama2", "llama3", "glm4"):
        for variant in ("", "-qlora"):
            code, _, err = cli("validate", str(ROOT / f"recipes/{name}/sft{variant}.yaml"))
            assert code == 0, err
    code, _, err = cli("validate", str(ROOT / "recipes/llama3/ppo.yaml"))
    assert code == 2 and "'model.adapter' is './outputs/llama3/sft'" in err and "make sft RECIPES=" in err
    code, _, err = cli("validate", str(ROOT / "recipes/chatglm3/sft.yaml"))
    assert code == 2 and "./models/chatglm3-6b" in err and "hfalign convert chatglm" in err


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> dict:
    """The embedded default's rows as conversations (what the templates' hub datasets hold): SFT `messages`,
    preference pairs as chosen/rejected conversations sharing the user's turn, PPO prompts as a user turn."""
    root = tmp_path_factory.mktemp("chat_data")

    def turn(role, text):
        return [{"role": role, "content": text.strip()}]

    def write(name, rows):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path

    sft = read_jsonl(ROOT / "data/sft_train.jsonl")[:256]
    rm = read_jsonl(ROOT / "data/rm_train.jsonl")[:256]
    ppo = read_jsonl(ROOT / "data/ppo_prompts.jsonl")
    return {
        "sft": write("sft", [{"messages": turn("user", r["prompt"]) + turn("assistant", r["completion"])} for r in sft]),
        "rm": write("rm", [{"chosen": turn("user", r["prompt"]) + turn("assistant", r["chosen"]),
                            "rejected": turn("user", r["prompt"]) + turn("assistant", r["rejected"])} for r in rm]),
        "ppo": write("ppo", [{"prompt": turn("user", r["prompt"])} for r in ppo]),
    }


@pytest.fixture(scope="module")
def family_bases(tmp_path_factory) -> dict:
    """Pretrained tiny bases of each family: their EOS ends every pretraining document, as real checkpoints stop."""
    from hfalign.demo.tiny import build_tiny

    root = tmp_path_factory.mktemp("family_bases")
    return {f: build_tiny(root / f, family=f, pretrain_steps=300) for f in sorted({v[0] for v in FAMILY_TEMPLATES.values()})}


# Every template once, each variant on two families (a LoRA or QLoRA run is the same code whatever the family; what
# a family changes -- chat template, pad, stop tokens -- is in every case). recipes/llama3 LoRA runs in test_docs.py:
# getting-started's first LoRA run, through make, as written.
@pytest.mark.parametrize(("name", "variant"), [("llama2", ""), ("glm4", ""), ("llama3", "-qlora"), ("chatglm3", "-qlora")])
def test_family_template_runs_end_to_end(name, variant, family_bases, chat_data, tmp_path):
    """recipes/<family>/{sft,rm,ppo}<variant>.yaml as shipped (LoRA or QLoRA, bf16, activation checkpointing, the
    family's pad and stop tokens) with only the model, the data and the size of the run overridden."""
    family, stops = FAMILY_TEMPLATES[name]
    out = {stage: tmp_path / stage for stage in ("sft", "rm", "ppo")}
    model = [f"model.name_or_path={family_bases[family]}"]
    small = ["train.max_steps=30", "train.per_device_train_batch_size=8", "train.gradient_accumulation_steps=1",
             "train.max_length=96", "train.eval_steps=30", "train.save_steps=30", "train.logging_steps=10"]
    code, _, err = train_shipped(f"{name}/sft{variant}.yaml", f"output_dir={out['sft']}", *model,
                                 f"data.train={chat_data['sft']}", "data.eval_fraction=0.05", *small,
                                 "train.learning_rate=1e-2")
    assert code == 0, err[-3000:]
    model.append(f"model.adapter={out['sft']}")
    code, _, err = train_shipped(f"{name}/rm{variant}.yaml", f"output_dir={out['rm']}", *model,
                                 f"data.train={chat_data['rm']}", f"data.eval={chat_data['rm']}", *small,
                                 "train.max_steps=10", "train.eval_steps=10", "train.save_steps=10")
    assert code == 0, err[-3000:]
    code, _, err = train_shipped(f"{name}/ppo{variant}.yaml", f"output_dir={out['ppo']}", *model,
                                 f"reward.model={out['rm']}", f"data.train={chat_data['ppo']}",
                                 f"data.eval={chat_data['ppo']}", "train.total_episodes=32",
                                 "train.per_device_train_batch_size=8", "train.gradient_accumulation_steps=1",
                                 "train.response_length=24", "train.num_eval_prompts=8", "train.save_steps=2",
                                 )
    assert code == 0, err[-3000:]
    resolved = yaml.safe_load((out["ppo"] / "recipe.resolved.yaml").read_text())
    assert resolved["lora"]["enabled"] and resolved["train"]["bf16"] and resolved["train"]["activation_checkpointing"]
    assert resolved["quantization"]["load_in_4bit"] is bool(variant)
    # responses end at the family's end-of-turn tokens (the score is read there), or are cut at response_length
    ended = [r["ended_with"] for r in read_jsonl(out["ppo"] / "samples.jsonl")]
    assert ended and set(ended) <= stops | {None}, ended
    assert any(e is not None for e in ended), "no response stopped: the SFT did not learn the family's end of turn"
