"""LoRA on a base as LLaMA-3 base ships (issue 17): its chat header and end-of-turn tokens have all-zero embedding
rows, never trained; and tied input/output embeddings (as Qwen2.5 <= 3B, LLaMA-3.2 1B/3B, Gemma). hfalign trains those
rows beside a new adapter (hfalign.tokens); every LoRA stage -- SFT, RM on the SFT adapter, the PPO policy and
critic adapters on the shared base -- and export are run here on such a tied base."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ROOT, cli, read_jsonl, train_shipped
from safetensors.torch import load_file

CHAT_TOKENS = {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}


def chat_data(out, rows: int = 512) -> dict:
    """The embedded default's data as conversations (rendered through the LLaMA-3 chat template)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, n in (("sft_train", rows), ("sft_eval", 100), ("rm_train", 3 * rows), ("rm_eval", 200)):
        lines = []
        for r in read_jsonl(ROOT / "data" / f"{name}.jsonl")[:n]:
            user = [{"role": "user", "content": r["prompt"]}]
            if name.startswith("sft"):
                row = {"messages": [*user, {"role": "assistant", "content": r["completion"].strip()}]}
            else:
                row = {"prompt": user, **{k: [{"role": "assistant", "content": r[k].strip()}] for k in ("chosen", "rejected")}}
            lines.append(json.dumps(row))
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


@pytest.fixture(scope="session")
def llama3_base(tmp_path_factory):
    """A tied LLaMA-3-like base: pretrained on plain documents ending in <|end_of_text|>; every token it never saw
    (the chat header and end-of-turn tokens among them) has an all-zero row."""
    from hfalign.demo.tiny import build_tiny

    root = tmp_path_factory.mktemp("llama3_base")
    return {"base": build_tiny(root / "base", family="llama3", pretrain_steps=300, tie_embeddings=True, zero_unseen=True),
            "data": chat_data(root / "data"), "root": root}


@pytest.fixture(scope="session")
def tied_chain(llama3_base):
    """LoRA SFT, then a LoRA RM on the SFT adapter, with the shipped recipes/lora templates, on the tied base."""
    root, d = llama3_base["root"], llama3_base["data"]
    base = f"model.name_or_path={llama3_base['base']}"
    short = ["train.num_train_epochs=3", "train.eval_strategy=no", "train.save_strategy=no"]
    code, out, err = train_shipped("lora/sft.yaml", f"output_dir={root / 'sft'}", base, *short,
                                   f"data.train={d['sft_train']}", f"data.eval={d['sft_eval']}")
    assert code == 0, err[-3000:]
    code, _, err = train_shipped("lora/rm.yaml", f"output_dir={root / 'rm'}", base, f"model.adapter={root / 'sft'}",
                                 *short, f"data.train={d['rm_train']}", f"data.eval={d['rm_eval']}")
    assert code == 0, err[-3000:]
    return {"sft": root / "sft", "rm": root / "rm", "sft_stdout": out, **llama3_base}


def test_untrained_rows_are_found_for_the_tokens_the_data_uses(llama3_base):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfalign import tokens

    tok = AutoTokenizer.from_pretrained(llama3_base["base"])
    model = AutoModelForCausalLM.from_pretrained(llama3_base["base"])
    chat = datasets.Dataset.from_list(read_jsonl(llama3_base["data"]["sft_train"]))
    used = tokens.used_token_ids(tok, chat)
    rows = tokens.untrained(model, used)
    # the chat header and end-of-turn tokens, and the few pieces only the template's layout produces ("\n\n", a
    # word with no space before it): every used token with a zero row, none with a trained one
    assert CHAT_TOKENS <= set(tok.convert_ids_to_tokens(rows)) and len(rows) < 0.2 * len(used)
    norms = model.get_input_embeddings().weight.norm(dim=1)
    assert all(norms[i] == 0 for i in rows) and all(norms[i] > 0 for i in used - set(rows))
    # plain text as pretraining saw it: only the EOS SFT appends to it (this tokenizer's is <|eot_id|>) is untrained
    plain = datasets.Dataset.from_list([{"text": " the plot was great."}])
    assert tok.convert_ids_to_tokens(tokens.untrained(model, tokens.used_token_ids(tok, plain))) == ["<|eot_id|>"]
    tokens.start_at_mean(model, rows)
    emb = model.get_input_embeddings().weight
    assert emb[rows].norm(dim=1).min() > 0.1 * emb.norm(dim=1).median()


def test_lora_sft_learns_a_chat_template_the_base_never_saw(tied_chain):
    """Within 10% of full SFT's eval loss (frozen zero rows: 3.66 against 0.4 on the 6-epoch recipe), the rows saved in
    the adapter, said in the run header, and the answers end their turn."""
    root, d = tied_chain["root"], tied_chain["data"]
    assert "the base never trained the embedding rows of" in tied_chain["sft_stdout"]
    assert "<|start_header_id|>" in tied_chain["sft_stdout"]
    code, _, err = train_shipped("sft.yaml", f"output_dir={root / 'full'}", f"model.name_or_path={tied_chain['base']}",
                                 "train.num_train_epochs=3", "train.eval_strategy=no", "train.save_strategy=no",
                                 f"data.train={d['sft_train']}", f"data.eval={d['sft_eval']}")
    assert code == 0, err[-3000:]
    code, _, err = train_shipped("lora/sft.yaml", f"output_dir={root / 'off'}", f"model.name_or_path={tied_chain['base']}",
                                 "train.num_train_epochs=3", "train.eval_strategy=no", "train.save_strategy=no",
                                 f"data.train={d['sft_train']}", f"data.eval={d['sft_eval']}",
                                 "lora.train_untrained_tokens=false")
    assert code == 0, err[-3000:]
    loss = {run: json.loads((root / run / "hfalign_done.json").read_text())["eval_loss"] for run in ("sft", "full", "off")}
    assert loss["sft"] < 1.1 * loss["full"] and loss["off"] > 1.5 * loss["sft"], loss
    saved = load_file(str(tied_chain["sft"] / "adapter_model.safetensors"))
    (rows,) = [v for k, v in saved.items() if "trainable_tokens" in k]  # tied: one set of rows, input and output
    assert rows.shape[0] >= 3 and rows.norm(dim=1).min() > 0.1
    code, out, err = cli("generate", str(tied_chain["sft"]), "Write a review of the red door.", "--temperature", "0")
    assert code == 0 and "-> the " in out, (out, err)


def test_lora_rm_on_the_sft_adapter_of_a_tied_base_learns(tied_chain):
    acc = json.loads((tied_chain["rm"] / "hfalign_done.json").read_text())["eval_accuracy"]
    assert acc > 0.9


def test_export_carries_the_trained_rows(tied_chain, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, _, err = cli("export", str(tied_chain["sft"]), str(tmp_path / "merged"))
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    stacked = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tied_chain["base"]), tied_chain["sft"])
    tok = AutoTokenizer.from_pretrained(tied_chain["base"])
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "Write a review of the red door."}],
                                                add_generation_prompt=True, return_dict=False)])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, stacked(ids).logits, rtol=1e-4, atol=1e-4)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert merged.get_input_embeddings().weight[eot].norm() > 0.1  # no longer the base's zero row
    prompts = [r["prompt"] for r in read_jsonl(ROOT / "data/ppo_eval_prompts.jsonl")[:16]]
    tok.padding_side, tok.pad_token = "left", "<|end_of_text|>"
    batch = tok.apply_chat_template([[{"role": "user", "content": p}] for p in prompts], add_generation_prompt=True,
                                    padding=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = merged.generate(**batch, do_sample=False, max_new_tokens=48, eos_token_id=eot, pad_token_id=eot)
    ended = (gen[:, batch["input_ids"].shape[1]:] == eot).any(dim=1)
    assert ended.float().mean() >= 0.9  # the answers end their turn (frozen zero rows: 48% ended)
    assert merged.config.tie_word_embeddings and merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()


def test_shared_base_ppo_on_a_tied_base_trains_policy_and_critic(tied_chain, tmp_path):
    out = tmp_path / "ppo"
    prompts = tmp_path / "prompts.jsonl"
    rows = read_jsonl(ROOT / "data/ppo_prompts.jsonl")[:128]
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": r["prompt"]}]}) + "\n" for r in rows))
    code, _, err = train_shipped("lora/ppo.yaml", f"output_dir={out}", f"model.name_or_path={tied_chain['base']}",
                                 f"model.adapter={tied_chain['sft']}", f"reward.model={tied_chain['rm']}",
                                 f"data.train={prompts}", "data.eval=null", "train.total_episodes=128",
                                 "train.num_eval_prompts=8")
    assert code == 0, err[-3000:]
    before = load_file(str(tied_chain["sft"] / "adapter_model.safetensors"))
    after = load_file(str(out / "adapter_model.safetensors"))
    assert before.keys() == after.keys()  # the policy adapter keeps its token rows
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_" in k)
    rm_value = {k for k in load_file(str(tied_chain["rm"] / "adapter_model.safetensors")) if "lora_" in k}
    value = load_file(str(out / "value" / "adapter_model.safetensors"))
    assert value and rm_value and (out / "value" / "value_head.safetensors").exists()
    logs = read_jsonl(out / "metrics.jsonl", having="objective/kl")
    assert logs and all(abs(h["objective/kl"]) < 5 for h in logs)
