"""`hfalign generate RUN_DIR "prompt" [...]`: sample from a trained SFT or PPO run, the way it was trained.

The run directory says what to load (hfalign.export.load_run_model): a full model, or its base with the LoRA
adapter (SFT adapter; PPO policy adapter) merged. A run trained on conversations gets the chat template with the generation prompt (its
BOS not doubled); a run trained on plain prompt/completion text gets the prompt as it is. Generation stops where
PPO's does (hfalign.ppo.generation.stop_token_ids).
"""

from __future__ import annotations

from pathlib import Path

from hfalign.errors import UserError


def _resolved(run: Path) -> dict:
    from hfalign.rundir import read_run

    resolved = read_run(run)
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


def generate(run_dir: str, prompts: list[str], max_new_tokens: int | None = None, temperature: float | None = None,
             seed: int = 0, chat: bool | None = None) -> list[str]:
    """Completions of `prompts`; chat: apply the chat template (None: as the run was trained)."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoTokenizer

    from hfalign.export import load_run_model
    from hfalign.ppo.generation import stop_token_ids
    from hfalign.ppo.rollout import left_pad

    run = Path(run_dir)
    resolved = _resolved(run)
    train = resolved.get("train") or {}
    tok = AutoTokenizer.from_pretrained(run)
    model = load_run_model(run, resolved, tok).eval()  # a LoRA run: base + its adapter, merged
    if (conversational(resolved) if chat is None else chat) and tok.chat_template:
        ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for p in prompts]
    else:
        ids = [tok(p)["input_ids"] for p in prompts]
    input_ids, mask = left_pad(ids, tok.pad_token_id)
    # the run's own stop tokens, else EOS and the family's end-of-turn tokens, as PPO stops
    stops = stop_token_ids(SimpleNamespace(stop_tokens=train.get("stop_tokens"),
                                           stop_token_ids=train.get("stop_token_ids")), tok, model)
    temperature = temperature if temperature is not None else train.get("temperature", 0.7)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=temperature > 0,
                             temperature=temperature or None, top_k=0, top_p=1.0, eos_token_id=stops,
                             pad_token_id=tok.pad_token_id,
                             max_new_tokens=max_new_tokens or train.get("response_length", 128))
    return tok.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
