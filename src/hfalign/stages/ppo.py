"""PPO with hfalign's PPOTrainer: the SFT policy learns from the reward model under a KL leash to itself.

    hfalign train recipes/ppo.yaml
    accelerate launch --config_file accelerate_configs/zero3.yaml -m hfalign recipes/ppo.yaml

Ends with a before/after summary on held-out prompts (the SFT policy vs the PPO policy), printed and saved as
summary.json: mean reward score, the rule-based objective, share of well-formed answers, KL to the reference.
"""

from __future__ import annotations

import json
import os

from hfalign import callbacks, data, models, rundir
from hfalign.recipe import Recipe, build_train_args, import_function


def run(recipe: Recipe) -> dict:
    from hfalign.ppo.build import build
    from hfalign.ppo.trainer import PPOTrainer

    # 1. Run directory (refuse clobber; find the checkpoint to resume from)
    args = build_train_args(recipe)
    resume_from = rundir.prepare(recipe, is_main=args.process_index == 0)

    # 2. Tokenizer (left padding: prompts are generated from)
    tokenizer = models.load_tokenizer(recipe.model)
    tokenizer.padding_side = "left"

    # 3. Models: policy, reference, value, reward (full, or one base with adapters)
    model = build(recipe, tokenizer)
    reward_fn = import_function(recipe.reward.function, "reward.function") if recipe.reward.function else None

    # 4. Data (prompts; data.eval holds the held-out prompts of the summary)
    train_set, eval_set = data.load(recipe.data, "ppo")

    # 5. Trainer with callbacks
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=model, reward_model=reward_fn,
                         train_dataset=train_set, eval_dataset=eval_set, callbacks=callbacks.build(recipe))
    callbacks.quiet_printer(trainer)

    # 6. Train (resumes when a checkpoint exists); then held-out prompts from the reference (= the SFT policy,
    #    frozen, so "before" needs no run of its own) and from the PPO policy, with the models as DeepSpeed holds them
    trainer.train(resume_from_checkpoint=resume_from)
    before, after = summarize(recipe, trainer, "ref"), summarize(recipe, trainer, "policy")

    # 7. Save and finish
    trainer.save_model(recipe.output_dir)
    summary = {"before (reference)": before, "after (policy)": after}
    if trainer.is_world_process_zero():
        with open(os.path.join(recipe.output_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        print(format_summary(before, after), flush=True)
    rundir.finish(recipe, trainer.is_world_process_zero(), summary)
    return summary


def summarize(recipe: Recipe, trainer, role: str) -> dict:
    s = trainer.sample(role, trainer.args.num_eval_prompts)
    n = len(s["completion"])
    out = {"prompts": n, "score": sum(s["score"]) / n, "kl": sum(s["kl"]) / n,
           "eos_rate": sum(s["has_eos"]) / n, "mean_chars": sum(len(c) for c in s["completion"]) / n}
    rules = recipe.summary
    if rules and rules.objective:
        fn = import_function(rules.objective, "summary.objective")
        out["objective"] = sum(fn(c) for c in s["completion"]) / n
    if rules and rules.well_formed:
        fn = import_function(rules.well_formed, "summary.well_formed")
        out["well_formed"] = sum(bool(fn(c)) and e for c, e in zip(s["completion"], s["has_eos"])) / n
    out["examples"] = s["completion"][:3]
    return out


def format_summary(before: dict, after: dict) -> str:
    keys = [k for k in before if k not in ("examples", "prompts")]
    lines = [f"hfalign ppo summary on {before['prompts']} held-out prompts", f"{'':14}{'SFT (ref)':>12}{'PPO':>12}"]
    lines += [f"{k:14}{before[k]:>12.3f}{after[k]:>12.3f}" for k in keys]
    lines += [f"example after: {after['examples'][0]!r}"]
    return "\n".join(lines)
