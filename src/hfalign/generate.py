"""`hfalign generate RUN_DIR "prompt" [...]`: sample from a trained SFT or PPO run, the way it was trained.

The run directory says what to load: a full model, or a LoRA adapter on the base its adapter_config names (SFT
adapter; PPO policy adapter). A run trained on conversations gets the chat template with the generation prompt (its
BOS not doubled); a run trained on plain prompt/completion text gets the prompt as it is. Generation stops at EOS and
the family's end-of-turn tokens, as PPO's does.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from hfalign.errors import UserError


def _resolved(run: Path) -> dict:
    path = run / "recipe.resolved.yaml"
    if not path.is_file():
        raise UserError(f"{run} is not an hfalign run directory (no recipe.resolved.yaml).", fix="give a run's output_dir")
    resolved = yaml.safe_load(path.read_text(encoding="utf-8"))
    if resolved["stage"] not in ("sft", "ppo"):
        raise UserError(f"{run} is a {resolved['stage']} run; only SFT and PPO runs generate.",
                        fix="give an SFT or PPO run directory")
    return resolved


def conversational(resolved: dict) -> bool:
    """Was the run trained on conversations? Its data's first row says (a hub set: assumed so)."""
    from hfalign.data import read_rows

    data = resolved.get("data") or {}
    source = data.get("train")
    if not source or not Path(source).is_file():
        return True
    row = read_rows(source, data.get("split", "train"), data.get("subset"))[0]
    renamed = {ours: row.get(theirs) for ours, theirs in (data.get("columns") or {}).items()}
    row = {**row, **{k: v for k, v in renamed.items() if v is not None}}
    return "messages" in row or isinstance(row.get("prompt"), list)


def load(run: Path):
    """(model, tokenizer) of a run: full weights, or base + the run's LoRA adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run)
    tok.padding_side = "left"
    adapter = run / "adapter_config.json"
    if adapter.is_file():
        from peft import PeftModel

        base = json.loads(adapter.read_text())["base_model_name_or_path"]
        model = AutoModelForCausalLM.from_pretrained(base)
        if len(tok) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tok))
        model = PeftModel.from_pretrained(model, run)
    else:
        model = AutoModelForCausalLM.from_pretrained(run)
    return model.eval(), tok


def generate(run_dir: str, prompts: list[str], max_new_tokens: int | None = None, temperature: float | None = None,
             seed: int = 0, chat: bool | None = None) -> list[str]:
    """Completions of `prompts`; chat: apply the chat template (None: as the run was trained)."""
    import torch

    from hfalign.models import family_of

    run = Path(run_dir)
    resolved = _resolved(run)
    train = resolved.get("train") or {}
    model, tok = load(run)
    if (conversational(resolved) if chat is None else chat) and tok.chat_template:
        ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for p in prompts]
    else:
        ids = [tok(p)["input_ids"] for p in prompts]
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    vocab = tok.get_vocab()
    stops = [tok.eos_token_id, *[vocab[t] for t in family_of(model).stop_tokens if t in vocab]]
    temperature = temperature if temperature is not None else train.get("temperature", 0.7)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=temperature > 0,
                             temperature=temperature or None, top_k=0, top_p=1.0, eos_token_id=stops,
                             pad_token_id=tok.pad_token_id,
                             max_new_tokens=max_new_tokens or train.get("response_length", 128))
    return tok.batch_decode(out[:, width:], skip_special_tokens=True)
