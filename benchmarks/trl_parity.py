"""Parity with TRL 1.12's PPO: the same tiny models, prompts, seed and settings through both trainers.

    .venv/bin/python benchmarks/trl_parity.py [--episodes 640]

The embedded default's SFT policy and reward model (outputs/sft, outputs/rm; trained if missing), its prompts
tokenized TRL-style (`input_ids`), seed 0, TRL 1.12's PPO settings on both sides (hfalign: PPOConfig(**TRL_1_12_DEFAULTS),
so no adaptive KL, no score normalisation, no early stop), num_mini_batches 1 (one optimizer step per minibatch on
both sides: TRL 1.12 counted steps differently beyond that, PPO_NOTES #12), a missing-EOS penalty of 1 on both, and
the policy stopping at EOS on both (TRL: stop_token eos). TRL 1.12 is installed on demand into a temporary directory,
as ppo_throughput.py does. Each trainer runs in its own process.

Printed: the first update's metric pairs with a verdict per metric, then the learning curves side by side (means
over blocks of updates). What may differ, and why (docs/migrating.md):
  - objective/scores: the responses are sampled by two different programs (same weights, same seed, other random
    streams), so the first update's scores differ by sampling noise; hfalign also reads the score at the EOS token,
    TRL 1.12 at the pad after it (trl#3750). Tolerance: 3 standard errors of the first update's mean score.
  - objective/kl, non_score_reward: policy = reference at the first rollout, so both must be ~0.
  - val/ratio: 1 at the first step of both; its mean over the update's epochs moves with the data.
  - loss/*, approxkl: follow from the sampled responses and advantages; compared for scale only (within a factor
    of 3); clipfrac, a fraction near 0 at the first update: within 0.05.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import workers  # noqa: E402

SETTINGS = {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 1, "num_mini_batches": 1,
            "num_ppo_epochs": 4, "response_length": 24, "temperature": 0.7, "learning_rate": 1e-4,
            "missing_eos_penalty": 1.0, "local_rollout_forward_batch_size": 16, "seed": 0, "logging_steps": 1,
            "kl_coef": 0.05}
METRICS = ["objective/scores", "objective/kl", "objective/non_score_reward", "objective/rlhf_reward",
           "loss/policy_avg", "loss/value_avg", "policy/clipfrac_avg", "policy/approxkl_avg", "val/ratio"]


def _data(tok):
    import datasets

    rows = [json.loads(ln) for ln in (ROOT / "data/ppo_prompts.jsonl").read_text().splitlines()]
    return datasets.Dataset.from_list(rows).map(lambda r: {"input_ids": tok(r["prompt"])["input_ids"]},
                                                remove_columns=["prompt"])


def _models(sft: str, rm: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return dict(model=AutoModelForCausalLM.from_pretrained(sft), ref_model=AutoModelForCausalLM.from_pretrained(sft),
                reward_model=AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1),
                value_model=AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1))


def worker(which: str, sft: str, rm: str, episodes: int, out: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sft, padding_side="left")
    common = dict(output_dir=out, total_episodes=episodes, report_to="none", save_strategy="no", **SETTINGS)
    if which == "trl":
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        args = PPOConfig(**common, stop_token="eos", num_sample_generations=0, bf16=False, gradient_checkpointing=False)
    else:
        from hfalign.ppo import PPOConfig, PPOTrainer
        from hfalign.ppo.config import TRL_1_12_DEFAULTS

        args = PPOConfig(**{**TRL_1_12_DEFAULTS, **common, "num_sample_generations": 0}, stop_token="eos")
    trainer = PPOTrainer(args=args, processing_class=tok, train_dataset=_data(tok), **_models(sft, rm))
    trainer.train()
    history = [{k: h[k] for k in METRICS if k in h} for h in trainer.state.log_history if "objective/scores" in h]
    workers.result({"history": history})


def report(ours: list[dict], theirs: list[dict]) -> None:
    first_h, first_t = ours[0], theirs[0]
    early = [h["objective/scores"] for h in ours[:5]] + [t["objective/scores"] for t in theirs[:5]]
    mean = sum(early) / len(early)
    spread = math.sqrt(sum((x - mean) ** 2 for x in early) / (len(early) - 1))  # update-to-update noise of a mean
    print("\n== first update (hfalign | TRL 1.12 | verdict)")
    flagged = []
    for key in METRICS:
        h, t = first_h.get(key), first_t.get(key)
        if h is None or t is None:
            print(f"  {key:28} {h!s:>10} {t!s:>10}   (not logged by both)")
            continue
        if key == "objective/scores":
            ok, why = abs(h - t) <= 3 * spread, f"|diff| <= 3 x {spread:.3f} (spread of the first 5 batch means)"
        elif key in ("objective/kl", "objective/non_score_reward"):
            ok, why = abs(h) < 1e-3 and abs(t) < 1e-3, "both ~0: policy = reference at the first rollout"
        elif key == "objective/rlhf_reward":
            ok, why = abs(h - t) <= 3 * spread + 0.1, "scores' tolerance (KL part ~0)"
        elif key == "val/ratio":
            ok, why = abs(h - 1) < 0.1 and abs(t - 1) < 0.1, "near 1 on both"
        elif key == "policy/clipfrac_avg":
            ok, why = abs(h - t) <= 0.05, "a fraction: within 0.05 (TRL's also counts pad positions)"
        else:
            ok = (h == t == 0) or (h != 0 and t != 0 and 1 / 3 <= abs(h / t) <= 3)
            why = "same scale (factor 3): follows from the sampled data"
        flagged += [] if ok else [key]
        print(f"  {key:28} {h:>10.4f} {t:>10.4f}   {'ok' if ok else 'DIFFERS'}: {why}")
    print("\n== learning curves: mean over blocks of updates (hfalign | TRL 1.12)")
    block = max(1, min(len(ours), len(theirs)) // 8)
    print(f"  {'updates':>10} " + " ".join(f"{k.split('/')[-1]:>22}" for k in ("objective/scores", "objective/kl")))
    for start in range(0, min(len(ours), len(theirs)), block):
        cells = []
        for key in ("objective/scores", "objective/kl"):
            h = sum(r[key] for r in ours[start:start + block]) / len(ours[start:start + block])
            t = sum(r[key] for r in theirs[start:start + block]) / len(theirs[start:start + block])
            cells.append(f"{h:>10.3f} | {t:<9.3f}")
        print(f"  {start + 1:>4}-{start + block:<5} " + " ".join(f"{c:>22}" for c in cells))
    print(f"\n  flagged beyond the documented differences: {', '.join(flagged) if flagged else 'none'}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--episodes", type=int, default=640)
    p.add_argument("--trl-path", help="a directory holding trl==1.12.0 (default: install it on demand)")
    p.add_argument("--worker", nargs="*")
    a = p.parse_args()
    if a.worker:
        which, sft, rm, episodes, out = a.worker
        worker(which, sft, rm, int(episodes), out)
        return
    from ppo_throughput import ensure_pipeline, trl112_path

    sft, rm = ensure_pipeline()
    print(f"== parity: {a.episodes} episodes, settings {SETTINGS} (+ TRL 1.12's defaults on hfalign's side)")
    trl_dir = a.trl_path or trl112_path()
    if trl_dir is None:
        print("  TRL 1.12 cannot be had here: nothing to compare")
        return
    with tempfile.TemporaryDirectory() as tmp:
        ours = workers.run_worker(__file__, ["hfalign", sft, rm, str(a.episodes), f"{tmp}/h"], label="hfalign")
        theirs = workers.run_worker(__file__, ["trl", sft, rm, str(a.episodes), f"{tmp}/t"], {"PYTHONPATH": trl_dir},
                                    label="TRL 1.12")
    if ours and theirs:
        report(ours["history"], theirs["history"])


if __name__ == "__main__":
    main()
