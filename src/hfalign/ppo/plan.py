"""The one pure function that derives PPO's batch sizes and step counts from a PPOConfig (or anything with its
attributes: validation passes trainargs.settings(), so no trainer library is imported)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPlan:
    """Every derived number, computed once and logged once (never written back into the user's config)."""

    world_size: int
    micro_batch: int  # per process, one forward/backward
    mini_batch: int  # per process, one optimizer step (micro_batch * gradient_accumulation_steps)
    rollout_batch: int  # per process, responses per PPO update (mini_batch * num_mini_batches)
    global_rollout_batch: int  # across processes
    num_generations: int  # responses per prompt (a group; groups never straddle processes)
    prompts_per_update: int  # per process: rollout_batch / num_generations
    num_updates: int  # rollout batches in the run
    optimizer_steps_per_update: int  # num_ppo_epochs * num_mini_batches
    total_optimizer_steps: int
    total_episodes: int


def plan(args, world_size: int, dataset_size: int) -> BatchPlan:
    mini = args.per_device_train_batch_size * args.gradient_accumulation_steps
    rollout = mini * args.num_mini_batches
    global_rollout = rollout * world_size
    episodes = args.total_episodes or int(args.num_train_epochs * dataset_size)
    updates = max(1, math.ceil(episodes / global_rollout))
    if args.max_steps and args.max_steps > 0:
        updates = args.max_steps
    per_update = args.num_ppo_epochs * args.num_mini_batches
    k = getattr(args, "num_generations", 1) or 1
    return BatchPlan(world_size, args.per_device_train_batch_size, mini, rollout, global_rollout, k, rollout // k,
                     updates, per_update, updates * per_update, updates * global_rollout)


def plan_problem(p: BatchPlan, dataset_size: int) -> str | None:
    """Why this plan cannot run on `dataset_size` prompts, or None. One message that names every number."""
    per_process = dataset_size // p.world_size
    batch = (f"rollout batch of {p.rollout_batch} (per_device_train_batch_size {p.micro_batch} x "
             f"gradient_accumulation_steps {p.mini_batch // p.micro_batch} x num_mini_batches "
             f"{p.rollout_batch // p.mini_batch})")
    if p.rollout_batch % p.num_generations:
        return (f"a {batch} does not split into groups of num_generations {p.num_generations} responses per prompt; "
                f"make it a multiple of {p.num_generations}")
    if per_process < p.prompts_per_update:
        groups = f" = {p.prompts_per_update} prompts x {p.num_generations} responses" if p.num_generations > 1 else ""
        return (f"{dataset_size} prompts over {p.world_size} process(es) give {per_process} per process, fewer than "
                f"one {batch}{groups}")
    return None


GROUPED = ("rloo", "grpo", "dr_grpo", "reinforce_pp_baseline")  # estimators whose baseline is the prompt's group


def estimator_problem(args) -> str | None:
    """What makes the estimator settings unusable, or None (PPOConfig raises it; validation says it first)."""
    k, est = getattr(args, "num_generations", 1), getattr(args, "advantage_estimator", "gae")
    if k < 1:
        return f"num_generations must be >= 1, got {k}"
    if est in GROUPED and k < 2:
        return (f"advantage_estimator {est} compares the responses to one prompt, so it needs num_generations >= 2 "
                f"(got {k}); 4-8 is usual")
    if est != "gae" and getattr(args, "value_warmup_updates", 0):
        return (f"value_warmup_updates trains a critic alone first; advantage_estimator {est} has no critic "
                "(set value_warmup_updates: 0, or advantage_estimator: gae)")
    for name in ("lam_critic", "lam_actor"):
        value = getattr(args, name, None)
        if value is not None and not 0 <= value <= 1:
            return f"{name} must be in [0, 1], got {value}"
    alpha = getattr(args, "lam_actor_alpha", None)
    if alpha is not None and alpha <= 0:
        return f"lam_actor_alpha must be > 0, got {alpha}"
    return None
