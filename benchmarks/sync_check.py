"""Host syncs inside a PPO update, on a GPU (issue 18 item 7): a micro-step must make none (indices on the device,
entropy from the logprob pass, stats kept as device tensors), and the update syncs once at its end (`_means`) plus,
with the trust region on (adaptive_lr), once per optimizer step to read the step's approx-KL.

    python benchmarks/sync_check.py --sft outputs/sft --rm outputs/rm     (after make sft rm; CUDA only)

Runs two short updates each with adaptive_lr off and on, under torch.cuda.set_sync_debug_mode("warn"), counts the
synchronising calls made inside micro-steps and inside the whole update, and prints where each kind came from (the
innermost hfalign line). Exit 1 when a micro-step synced. On CPU there is nothing to sync: the CPU-side guard is the
index-device assert in ppo/graphs.py micro_steps (tests/test_ppo_core.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def where() -> str:
    frames = [f for f in traceback.extract_stack() if "/hfalign/" in f.filename and "sync_check" not in f.filename]
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].line}" if frames else "outside hfalign"


def run(sft: str, rm: str, adaptive_lr: bool) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from hfalign.ppo.config import PPOConfig
    from hfalign.ppo.trainer import PPOTrainer

    tok = AutoTokenizer.from_pretrained(sft, padding_side="left")
    rows = [json.loads(line) for line in open(ROOT / "data/ppo_prompts.jsonl", encoding="utf-8")][:32]
    args = PPOConfig(output_dir=f"/tmp/sync-check-{adaptive_lr}", per_device_train_batch_size=8, num_mini_batches=2,
                     num_ppo_epochs=2, gradient_accumulation_steps=2, total_episodes=32, response_length=16,
                     save_strategy="no", report_to="none", adaptive_lr=adaptive_lr, early_stop_kl=None)
    trainer = PPOTrainer(args=args, processing_class=tok, model=AutoModelForCausalLM.from_pretrained(sft),
                         reward_model=AutoModelForSequenceClassification.from_pretrained(rm),
                         value_model=AutoModelForSequenceClassification.from_pretrained(rm),
                         train_dataset=datasets.Dataset.from_list(rows))
    counts, places, scope = collections.Counter(), collections.defaultdict(collections.Counter), []
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message) and scope:
            counts[scope[-1]] += 1
            places[scope[-1]][where()] += 1
        else:
            show(message, category, filename, lineno, file, line)

    micro_steps = []

    def scoped(name, fn):
        def inner(*a, **k):
            scope.append(name)
            micro_steps.extend([1] if name == "micro-step" else [])
            try:
                return fn(*a, **k)
            finally:
                scope.pop()
        return inner

    trainer._micro_step = scoped("micro-step", trainer._micro_step)
    trainer.ppo_update = scoped("update", trainer.ppo_update)
    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return {"adaptive_lr": adaptive_lr, "updates": trainer.state.global_step, "micro_steps": len(micro_steps),
            "syncs_in_micro_steps": counts["micro-step"], "syncs_elsewhere_in_updates": counts["update"],
            "where": {k: dict(v.most_common(8)) for k, v in places.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", default="outputs/sft")
    ap.add_argument("--rm", default="outputs/rm")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("sync_check: no CUDA device; nothing to check on CPU")
        return 0
    bad = 0
    for adaptive in (False, True):
        result = run(a.sft, a.rm, adaptive)
        print(json.dumps(result, indent=1), flush=True)
        bad += result["syncs_in_micro_steps"]
        per_step = result["syncs_elsewhere_in_updates"] / max(1, result["updates"])
        print(f"sync_check adaptive_lr={adaptive}: {result['syncs_in_micro_steps']} syncs in "
              f"{result['micro_steps']} micro-steps, {per_step:.1f} elsewhere per update", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
