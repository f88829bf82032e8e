"""The embedded default and the robustness tasks: tiny models built offline (tiny.py) and small preference tasks with
rule-based true objectives. Not part of the product: they exist so that `make ppo`, the tests and
benchmarks/ppo_robustness.py run offline on CPU.

    reviews  task.py   short movie reviews; the rule scores positivity (the embedded default)
    lists    lists.py  name fruits; the reward model's data favours longer lists (length tempts)
    slots    slots.py  fill a meeting form with a valid day and time (slots a reward model can be fooled on)
"""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path

TASKS = {"reviews": "hfalign.demo.task", "lists": "hfalign.demo.lists", "slots": "hfalign.demo.slots"}


def get_task(name: str):
    return import_module(TASKS[name])


def preference_splits(rng, titles: dict, prompt_for, completion, pair, broken, key,
                      broken_share: float = 0.2) -> dict[str, list[dict]]:
    """The six data files every demo task has, in one shape. `titles`: {"train": [...], "eval": [...]};
    prompt_for(title) -> prompt; completion(prompt) -> an SFT answer; pair(prompt) -> two candidate answers;
    broken(prompt) -> a malformed answer; key(answer, prompt) ranks answers (higher is preferred). A `broken_share` of
    the preference pairs put a well-formed answer against a broken one; pairs that tie are drawn again."""

    def sft_rows(n, pool):
        rows = []
        for _ in range(n):
            prompt = prompt_for(rng.choice(pool))
            rows.append({"prompt": prompt, "completion": completion(prompt)})
        return rows

    def rm_rows(n, pool):
        rows = []
        while len(rows) < n:
            prompt = prompt_for(rng.choice(pool))
            if rng.random() < broken_share:
                chosen, rejected = completion(prompt), broken(prompt)
                if key(chosen, prompt) <= key(rejected, prompt):  # e.g. an all-negative review ties with broken text
                    continue
            else:
                chosen, rejected = pair(prompt)
                if key(chosen, prompt) == key(rejected, prompt):
                    continue
                if key(chosen, prompt) < key(rejected, prompt):
                    chosen, rejected = rejected, chosen
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        return rows

    train, held = titles["train"], titles["eval"]
    return {"sft_train": sft_rows(2000, train), "sft_eval": sft_rows(200, held),
            "rm_train": rm_rows(2000, train), "rm_eval": rm_rows(200, held),
            "ppo_prompts": [{"prompt": prompt_for(t)} for t in train],
            "ppo_eval_prompts": [{"prompt": prompt_for(t)} for t in held]}


def corpus_of(data: dict[str, list[dict]], joined: bool = True) -> list[str]:
    """Tokenizer text for a task from its generated files: every prompt, held-out ones included (a held-out word
    the tokenizer never saw would reach the model as letters it never trained on), and every answer. joined=False
    keeps answers apart from their prompts: pretraining documents (tiny.pretrain) that do not teach the task."""
    prompts = [r["prompt"] for r in data["ppo_prompts"] + data["ppo_eval_prompts"]]
    answers = [(r["prompt"] if joined else "") + r["completion"] for r in data["sft_train"]]
    return prompts + answers + [r["rejected"] for r in data["rm_train"]]


def as_chat(row: dict) -> dict:
    """A row as conversations: prompt + completion -> messages, chosen/rejected -> conversations sharing the user's
    turn, a lone prompt -> the user's turn (what a family template's hub datasets hold)."""
    def turn(role, text):
        return [{"role": role, "content": text.strip()}]

    user = turn("user", row["prompt"])
    if "completion" in row:
        return {"messages": user + turn("assistant", row["completion"])}
    if "chosen" in row:
        return {"chosen": user + turn("assistant", row["chosen"]), "rejected": user + turn("assistant", row["rejected"])}
    return {**row, "prompt": user}


def write_data(name: str, out_dir: str | Path, seed: int = 0, chat: bool = False) -> list[Path]:
    """The task's sft/rm/ppo files as .jsonl under out_dir (`chat`: as conversations, as_chat)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for split, rows in get_task(name).generate(seed).items():
        rows = [as_chat(r) for r in rows] if chat else rows
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        written.append(path)
    return written
