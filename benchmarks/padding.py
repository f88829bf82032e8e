"""How much of a PPO update's compute is padding, and what trimming it would save (issue 20, item 3).

    python benchmarks/padding.py --run outputs/ppo        # after make ppo: its sample table's prompts and responses

A rollout is left-padded to its longest prompt and right-padded to its longest response; every forward (old, ref,
value, reward) and every micro-step of the update computes that whole rectangle. From the run's sample table
(prompt and completion texts, tokenized with the run's tokenizer) this draws rollout batches and micro-batches as the
run's recipe sizes them, and prints the token positions computed, relative to today's rectangle, for:
  now        the rollout's rectangle (what hfalign computes)
  trim       each micro-batch cut to its own longest prompt and response (random micro-batches, as PPO draws them)
  sorted     micro-batches of similar length (length-sorted, then cut): changes which episodes share a step
  real       the real tokens alone (packed sequences: the floor)
No model runs: it is the arithmetic of the shapes.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def shares(prompts: list[int], responses: list[int], rollout: int, micro: int, draws: int = 2000) -> dict:
    rng, total = random.Random(0), dict(now=0, trim=0, sorted=0, real=0)
    for _ in range(draws):
        batch = [rng.randrange(len(prompts)) for _ in range(rollout)]
        total["now"] += rollout * (max(prompts[i] for i in batch) + max(responses[i] for i in batch))
        total["real"] += sum(prompts[i] + responses[i] for i in batch)
        for key, order in (("trim", rng.sample(batch, len(batch))),
                           ("sorted", sorted(batch, key=lambda i: prompts[i] + responses[i]))):
            for s in range(0, rollout, micro):
                m = order[s:s + micro]
                total[key] += len(m) * (max(prompts[i] for i in m) + max(responses[i] for i in m))
    return {k: v / total["now"] for k, v in total.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", default="outputs/ppo", help="a finished PPO run directory (samples.jsonl, the tokenizer)")
    a = p.parse_args()
    import yaml
    from transformers import AutoTokenizer

    run = Path(a.run)
    tok = AutoTokenizer.from_pretrained(run)
    train = yaml.safe_load((run / "recipe.resolved.yaml").read_text())["train"]
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    length = train.get("response_length", 53)
    prompts = [len(tok(r["prompt"]).input_ids) for r in rows]
    responses = [min(length, len(tok(r["completion"], add_special_tokens=False).input_ids) + 1) for r in rows]  # + stop
    micro = train.get("per_device_train_batch_size", 1)
    rollout = micro * train.get("gradient_accumulation_steps", 1) * train.get("num_mini_batches", 1)
    print(f"{run}: {len(rows)} sampled episodes; prompt tokens {min(prompts)}-{max(prompts)}, response tokens "
          f"{min(responses)}-{max(responses)} (mean {sum(responses) / len(responses):.1f}); rollout {rollout}, "
          f"micro-batch {micro}")
    for k, v in shares(prompts, responses, rollout, micro).items():
        print(f"  {k:7} {v:6.3f} of today's token positions")


if __name__ == "__main__":
    main()
