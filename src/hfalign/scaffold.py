"""`hfalign new DIR --from TEMPLATE [--model M] [--data D]`: a recipe directory of your own from a shipped one.

Copying a template by hand leaves its run paths behind (`output_dir: outputs/llama3/sft`, `model.adapter:
./outputs/llama3/sft`, `reward.model`), so `make ppo RECIPES=my` looks for outputs/my/... while the recipes write
outputs/llama3/..., and an `extends: ../sft.yaml` no longer resolves. This copies the template's recipes as text
(comments kept) and rewrites exactly that: run paths to outputs/<DIR name>[-variant]/<stage>, `extends:` to the
same file seen from DIR, and, when asked, every `model.name_or_path` and each stage's `data:` block (from the files
`make-data` writes: <stage>_train.jsonl / _eval.jsonl, ppo_prompts.jsonl / ppo_eval_prompts.jsonl).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from hfalign.errors import UserError

STAGE_FILES = {"sft": ("sft_train.jsonl", "sft_eval.jsonl"), "rm": ("rm_train.jsonl", "rm_eval.jsonl"),
               "ppo": ("ppo_prompts.jsonl", "ppo_eval_prompts.jsonl")}


def new(dest: str, template: str, model: str | None = None, data: str | None = None) -> list[Path]:
    src, out = Path(template), Path(dest)
    recipes = sorted(src.glob("*.yaml"))
    if not recipes:
        raise UserError(f"--from {template} holds no recipes (*.yaml).",
                        fix="name a recipe directory, e.g. recipes/llama3, recipes/lora or recipes")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{dest} exists and is not empty; nothing was written.", fix="name a new directory")
    if data and not any((Path(data) / f).is_file() for f, _ in STAGE_FILES.values()):
        raise UserError(f"--data {data} holds none of {', '.join(f for f, _ in STAGE_FILES.values())}.",
                        fix=f"write them with `hfalign make-data {data}` (add --chat for a chat template), or name "
                            "another directory")
    texts = {p.name: _rewrite(p.read_text(encoding="utf-8"), src, out, model, data, *_stage_and_owner(p, src))
             for p in recipes}
    out.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (out / name).write_text(text, encoding="utf-8")
    return [out / name for name in texts]


def _stage_and_owner(path: Path, src: Path) -> tuple[str | None, bool]:
    """(the recipe's stage, following `extends:`; whether it sets its own data: it has a data block, extends nothing,
    or extends a file outside the template -- a file extending a sibling inherits the sibling's)."""
    text = path.read_text(encoding="utf-8")
    parent = re.search(r"(?m)^extends:\s*(\S+)", text)
    owns = bool(re.search(r"(?m)^data:", text)) or not parent or \
        os.path.dirname(os.path.normpath(os.path.join(os.path.abspath(path.parent), parent.group(1)))) != os.path.abspath(src)
    stage, seen = None, set()
    while path.is_file() and path not in seen:
        seen.add(path)
        text = path.read_text(encoding="utf-8")
        found, parent = re.search(r"(?m)^stage:\s*(\w+)", text), re.search(r"(?m)^extends:\s*(\S+)", text)
        if found or not parent:
            stage = found.group(1) if found else None
            break
        path = path.parent / parent.group(1)
    return stage, owns


def _rewrite(text: str, src: Path, out: Path, model: str | None, data: str | None, stage: str | None,
             owns_data: bool) -> str:
    name, old = out.name, re.escape(os.path.basename(os.path.abspath(src)))
    if re.search(rf"\boutputs/{old}(-[\w-]+)?/", text):  # outputs/llama3/sft, outputs/llama3-qlora/rm -> outputs/my/...
        text = re.sub(rf"\boutputs/{old}(-[\w-]+)?/", rf"outputs/{name}\1/", text)
    else:  # the embedded default (recipes/) writes outputs/<stage>
        text = re.sub(r"\boutputs/(sft|rm|ppo|rloo|grpo)\b", rf"outputs/{name}/\1", text)
    text = re.sub(r"(?m)^extends:\s*(\S+)", lambda m: "extends: " + _relocate(m.group(1), src, out), text)
    if model:  # the base, not an earlier run (a full-weight RM or PPO starts from ./outputs/.../sft)
        text = _in_block(text, "model", lambda body: re.sub(r"(?m)^(\s+)name_or_path:(?!.*outputs/).*$",
                                                              rf"\1name_or_path: {model}", body))
    if data and stage in STAGE_FILES and owns_data:
        train, evals = (Path(data) / f for f in STAGE_FILES[stage])
        block = f"  train: {train}\n" + (f"  eval: {evals}\n" if evals.is_file() else "  eval_fraction: 0.05\n")
        if re.search(r"(?m)^data:", text):
            text = _in_block(text, "data", lambda _body: block)
        else:
            text = text.rstrip("\n") + "\n\ndata:\n" + block
    return text


def _relocate(ref: str, src: Path, out: Path) -> str:
    """An `extends:` path of a recipe in src, as seen from out (a sibling in the template stays a sibling)."""
    here = os.path.abspath(src)  # not resolved: a symlinked recipes/ stays the path the user gave
    target = os.path.normpath(os.path.join(here, ref))
    if os.path.dirname(target) == here:
        return ref
    return os.path.relpath(target, os.path.abspath(out))


def _in_block(text: str, key: str, change) -> str:
    """Apply `change` to the body of the top-level `key:` block (its indented lines, comments included)."""
    m = re.search(rf"(?m)^{key}:[^\n]*\n((?:[ \t]+[^\n]*\n|[ \t]*\n)*)", text)
    if not m:
        return text
    body = m.group(1)
    trailing = body[len(body.rstrip("\n")) + 1:] if body.endswith("\n\n") else ""
    return text[:m.start(1)] + change(body.rstrip("\n") + "\n") + trailing + text[m.end(1):]
