"""PPO with hfalign's PPOTrainer: the SFT policy learns from the reward model under a KL leash to itself.

    hfalign train recipes/ppo.yaml
    accelerate launch --config_file accelerate_configs/zero3.yaml -m hfalign recipes/ppo.yaml

Ends with a before/after summary on held-out prompts (the SFT policy vs the PPO policy), printed and saved as
summary.json: mean reward score, the rule-based objective, share of well-formed answers, KL to the reference.
"""

from __future__ import annotations

import json
import os

from hfalign import models, rewards, trainargs
from hfalign.errors import UserError
from hfalign.recipe import Recipe, import_function

FORMATS = ("prompt",)


def config_class() -> type:
    from hfalign.ppo.config import PPOConfig

    return PPOConfig


def check(recipe: Recipe, rows: dict) -> None:
    """A reward source; a LoRA reward adapter on this base; the estimator's settings; batch arithmetic against the
    prompts and processes."""
    from hfalign.ppo.plan import estimator_problem, plan, plan_problem

    if recipe.reward is None:
        raise UserError("'reward' section is required for stage ppo.", fix="add reward: {model: outputs/rm}")
    if recipe.reward.model and recipe.lora.enabled:
        models.check_adapter_base(recipe.reward.model, recipe.model.name_or_path, "reward.model")
    value = recipe.value
    if recipe.quantization.enabled and value is not None and (value.model or not value.shared_base):
        raise UserError("a critic of its own under quantization would be a 4/8-bit model whose weights cannot train.",
                        fix="keep value.shared_base: true (the critic is a LoRA adapter on the shared quantized base), "
                            "or drop quantization")
    settings = trainargs.settings(recipe, config_class)
    if estimator_problem(settings):
        raise UserError(f"train: {estimator_problem(settings)}.", fix="see docs/estimators.md")
    note_unused_critic(recipe, settings)
    if rows["train"] is None:
        return  # a hub set: counted when loaded
    world, n = int(os.environ.get("WORLD_SIZE", "1")), len(rows["train"])
    problem = plan_problem(plan(settings, world, n), n)
    if problem:
        raise UserError(f"PPO batch does not fit the data: {problem}.",
                        fix="lower train.per_device_train_batch_size or train.num_mini_batches, or add prompts")


def describe(recipe: Recipe, rows: dict) -> str | None:
    """What `hfalign validate` adds: the batch plan in prompts and responses, and the estimator."""
    from hfalign.ppo.plan import plan

    if rows["train"] is None:
        return None
    s = trainargs.settings(recipe, config_class)
    p = plan(s, int(os.environ.get("WORLD_SIZE", "1")), len(rows["train"]))
    batch = f"{p.prompts_per_update} prompts x {p.num_generations} responses" if p.num_generations > 1 else \
        f"{p.rollout_batch} prompts, one response each"
    critic = "a learned critic" if s.advantage_estimator == "gae" else "no critic"
    return (f"plan: {p.num_updates} updates of {batch} per process, on {p.world_size} process(es): "
            f"{p.total_episodes} episodes (responses), {p.optimizer_steps_per_update} optimizer steps per update; "
            f"advantage_estimator {s.advantage_estimator} ({critic})")


CRITIC_KEYS = ("vf_coef", "cliprange_value", "lam", "lam_critic", "lam_actor", "lam_actor_alpha")


def note_unused_critic(recipe: Recipe, settings) -> None:
    """A critic-free estimator with critic settings that differ from their defaults (or a value: section): said once
    per check, on stdout, not an error -- a recipe extending a PPO one keeps working."""
    from hfalign import trainfields

    if settings.advantage_estimator == "gae" or int(os.environ.get("RANK", "0")) != 0:
        return
    defaults = {k: d for k, (_, d) in trainfields.spec(recipe.stage, config_class).items()}
    unused = [f"train.{k}" for k in CRITIC_KEYS if getattr(settings, k) != defaults[k]]
    unused += ["value"] if recipe.value is not None else []
    if unused:
        print(f"hfalign: advantage_estimator {settings.advantage_estimator} trains no critic, so {', '.join(unused)} "
              "has no effect (remove it, or use advantage_estimator: gae)", flush=True)


def trainer(recipe: Recipe, args, tokenizer, train_set, eval_set, callbacks):
    from hfalign.ppo.build import build
    from hfalign.ppo.trainer import PPOTrainer

    # Policy, reference, value and reward behind one module (full, or one base with adapters); prompts pad left
    tokenizer.padding_side = "left"
    model = build(recipe, tokenizer, critic=args.advantage_estimator == "gae")
    reward_fn = rewards.from_recipe(recipe, tokenizer, args.device)  # None: the reward model inside `model`
    return PPOTrainer(args=args, processing_class=tokenizer, model=model, reward_model=reward_fn,
                      train_dataset=train_set, eval_dataset=eval_set, callbacks=callbacks)


def summarize(recipe: Recipe, trainer, eval_set) -> dict:
    """Held-out prompts from the reference (= the SFT policy, frozen, so "before" needs no run of its own) and from
    the PPO policy, with the models as DeepSpeed holds them; printed and written to summary.json."""
    before, after = sample_stats(recipe, trainer, "ref"), sample_stats(recipe, trainer, "policy")
    summary = {"before (reference)": before, "after (policy)": after}
    if trainer.is_world_process_zero():
        with open(os.path.join(recipe.output_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        print(format_summary(before, after), flush=True)
    return summary


def sample_stats(recipe: Recipe, trainer, role: str) -> dict:
    s = sample(trainer, role, trainer.args.num_eval_prompts)
    n = len(s["completion"])
    out = {"prompts": n, "score": sum(s["score"]) / n, "kl": sum(s["kl"]) / n,
           "eos_rate": sum(s["has_eos"]) / n, "mean_chars": sum(len(c) for c in s["completion"]) / n}
    rules = recipe.summary
    if rules and rules.objective:
        fn = _rule(import_function(rules.objective, "summary.objective"))
        out["objective"] = sum(fn(c, p) for c, p in zip(s["completion"], s["prompt"])) / n
    if rules and rules.well_formed:
        fn = _rule(import_function(rules.well_formed, "summary.well_formed"))
        out["well_formed"] = sum(bool(fn(c, p)) and e for c, p, e in zip(s["completion"], s["prompt"], s["has_eos"])) / n
    out["examples"] = s["completion"][:3]
    return out


def sample(trainer, role: str, num_prompts: int) -> dict:
    """Completions of the held-out prompts (in order, from the first again while more are asked for than there are)
    from the policy or the reference, seeded, with scores and KL to the reference."""
    import torch

    from hfalign.ppo.rollout import left_pad

    prompts = trainer.eval_prompts or trainer.prompts
    prompts = (prompts * -(-num_prompts // len(prompts)))[:num_prompts]
    batch, device, tok = trainer.args.local_rollout_forward_batch_size, trainer.accelerator.device, trainer.tokenizer
    torch.manual_seed(trainer.args.seed)
    out = {"prompt": [], "completion": [], "score": [], "kl": [], "has_eos": []}
    for i in range(0, len(prompts), batch):
        q, m = left_pad(prompts[i:i + batch], tok.pad_token_id)
        r = trainer.rollout(q.to(device), m.to(device), role=role)
        out["prompt"] += tok.batch_decode(q, skip_special_tokens=True)
        out["completion"] += tok.batch_decode(r.responses, skip_special_tokens=True)
        out["score"] += r.scores.tolist()
        own = r.ref_logprobs if role == "ref" else r.logprobs  # KL of the sampling model to the reference
        out["kl"] += (own - r.ref_logprobs).sum(1).tolist()
        out["has_eos"] += r.has_eos.tolist()
    return out


def _rule(fn):
    """A rule takes (completion) or (completion, prompt): call it as the latter either way."""
    import inspect

    takes_prompt = len(inspect.signature(fn).parameters) >= 2
    return (lambda c, p: fn(c, p)) if takes_prompt else (lambda c, p: fn(c))


def format_summary(before: dict, after: dict) -> str:
    keys = [k for k in before if k not in ("examples", "prompts")]
    lines = [f"hfalign ppo summary on {before['prompts']} completions of held-out prompts", f"{'':14}{'SFT (ref)':>12}{'PPO':>12}"]
    lines += [f"{k:14}{before[k]:>12.3f}{after[k]:>12.3f}" for k in keys]
    lines += [f"example after: {after['examples'][0]!r}"]
    return "\n".join(lines)
