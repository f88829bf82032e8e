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
    rollout_batch: int  # per process, prompts per PPO update (mini_batch * num_mini_batches)
    global_rollout_batch: int  # across processes
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
    return BatchPlan(world_size, args.per_device_train_batch_size, mini, rollout, global_rollout, updates, per_update,
                     updates * per_update, updates * global_rollout)


def plan_problem(p: BatchPlan, dataset_size: int) -> str | None:
    """Why this plan cannot run on `dataset_size` prompts, or None. One message that names every number."""
    per_process = dataset_size // p.world_size
    if per_process < p.rollout_batch:
        return (f"{dataset_size} prompts over {p.world_size} process(es) give {per_process} per process, fewer than one "
                f"rollout batch of {p.rollout_batch} (per_device_train_batch_size {p.micro_batch} x "
                f"gradient_accumulation_steps {p.mini_batch // p.micro_batch} x num_mini_batches "
                f"{p.rollout_batch // p.mini_batch})")
    return None
