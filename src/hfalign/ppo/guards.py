"""Acting on PPO guards (callbacks that answer `trip(metrics)`, see hfalign.callback_types.Guard): warn, stop with a
checkpoint, or roll back to the newest *vetted* checkpoint and go on more carefully (higher KL coefficient, lower lr).

A guard at update s judges the rollout sampled from the weights after update s-1. So checkpoint-k (the weights after
update k) is vetted only once update k+1's rollout has passed every acting guard; until then it is unjudged, and a
rollback never restores it. checkpoint-0 (the run's start, saved when a rollback guard is on) is vetted by definition.
The trainer keeps the vetted steps (`trainer.vetted`) and every guard's state in each checkpoint, so a resumed run
judges and rolls back exactly as the uninterrupted one would."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def guards(trainer) -> list:
    return [cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "trip")]


def prepare(trainer, resuming: bool) -> None:
    """A run with a rollback guard has something to roll back to from the start: checkpoint-0."""
    rollback = [g for g in guards(trainer) if g.action == "rollback"]
    if rollback and trainer.args.save_only_model:
        raise ValueError(f"the {rollback[0].name} rolls back to checkpoints, and save_only_model=True writes them without "
                         "optimizer state: set save_only_model to false, or the guard's action to stop or warn")
    if rollback and not resuming:
        trainer.vetted.add(0)
        trainer._save_checkpoint(trainer.model, trial=None)


def check(trainer, metrics: dict) -> list[tuple]:
    """(guard, reason) for every guard this update trips; their names go into the update's metrics."""
    tripped = []
    for guard in guards(trainer):
        reason = guard.trip(metrics)
        if reason:
            tripped.append((guard, reason))
            metrics[f"guard/{guard.name.replace(' ', '_')}"] = 1.0
            if trainer.is_world_process_zero():
                print(f"hfalign: {guard.name}: {reason} at update {trainer.state.global_step} "
                      f"({ {'warn': 'warning only', 'stop': 'stopping and saving', 'rollback': 'rolling back'}[guard.action]})",
                      flush=True)
    if not any(g.action in ("stop", "rollback") for g, _ in tripped):
        trainer.vetted.add(trainer.state.global_step - 1)  # the weights this rollout was sampled from passed
    if any(g.action == "stop" for g, _ in tripped):
        trainer.control.should_save = trainer.control.should_training_stop = True
    elif any(g.action == "rollback" for g, _ in tripped):
        trainer.control.should_save = False  # this update's weights are the ones being rolled back
    return tripped


def act(trainer, tripped: list[tuple]) -> None:
    """After the update is logged: roll back once for all rollback guards that tripped -- also on the run's last
    update (the Trainer has set should_training_stop at max_steps: the run then ends on the restored weights); not
    when a stop guard tripped too (it ends the run where it is, saved)."""
    rollback = [g for g, _ in tripped if g.action == "rollback"]
    if not rollback or any(g.action == "stop" for g, _ in tripped):
        return
    guard = rollback[0]
    checkpoint = newest_vetted(trainer)
    if guard.rollbacks >= guard.max_rollbacks or checkpoint is None:
        # giving up: the run ends on the last checkpoint the guards let through, not on the weights just judged broken
        if trainer.is_world_process_zero():
            print(f"hfalign: {guard.name}: {guard.rollbacks} rollbacks already; stopping on "
                  f"{checkpoint or 'the current weights (no checkpoint)'} and saving", flush=True)
        if checkpoint is not None:
            restore(trainer, checkpoint)
            trainer.vetted.add(trainer.state.global_step)  # the checkpoint below holds those vetted weights
        trainer.control.should_save = trainer.control.should_training_stop = True
        trainer._save_checkpoint(trainer.model, trial=None)
        return
    restore(trainer, checkpoint, kl_factor=guard.kl_factor, lr_factor=guard.lr_factor)
    for g in rollback:
        g.rollbacks += 1
    if trainer.args.save_strategy != "no":  # (a str enum)
        # The restored weights, the raised KL coefficient and the guards' counts as the newest checkpoint: a kill from
        # here resumes where the rollback left the run, never from a checkpoint of the trajectory it abandoned.
        trainer.vetted.add(trainer.state.global_step)
        trainer._save_checkpoint(trainer.model, trial=None)


def restore(trainer, checkpoint: str, kl_factor: float = 1.0, lr_factor: float = 1.0) -> None:
    """The checkpoint's trainable weights, optimizer moments, fp16 loss scale, KL coefficient and score statistics;
    then the KL coefficient times kl_factor and the learning rate times lr_factor. Step, episode, data position and
    the learning-rate schedule go on from where the run is (the rate the next step takes is today's schedule times
    the factors, not the checkpoint's): a rollback costs the updates since the checkpoint. Under DeepSpeed the
    engine loads its own checkpoint and the schedule is put back where it was."""
    from hfalign.ppo import core

    old_kl, schedule = trainer.kl_coef, trainer.lr_scheduler.state_dict()
    rates = [group["lr"] for group in trainer.optimizer.param_groups]
    if trainer.is_deepspeed_enabled:  # the engine's own checkpoint: weights, optimizer, its scheduler, on every rank
        from transformers.integrations.deepspeed import deepspeed_load_checkpoint

        deepspeed_load_checkpoint(trainer.model_wrapped, checkpoint, load_module_strict=False)
    else:
        trainer._load_from_checkpoint(checkpoint)
        trainer.optimizer.load_state_dict(torch.load(os.path.join(checkpoint, "optimizer.pt"),
                                                     map_location=trainer.args.device))
        trainer._load_scaler(checkpoint)  # fp16: the loss scale the checkpoint's steps ran at
    trainer.lr_scheduler.load_state_dict(schedule)
    for group, rate in zip(trainer.optimizer.param_groups, rates):
        group["lr"] = rate
    with open(os.path.join(checkpoint, "hfalign_ppo_state.json"), encoding="utf-8") as f:
        saved = json.load(f)
    trainer.kl_coef = max(saved["kl_coef"], old_kl) * kl_factor  # repeated rollbacks keep raising it
    trainer.moments = core.RunningMoments(**saved["moments"])
    trainer.multiply_lr(lr_factor)
    if trainer.is_world_process_zero():
        print(f"hfalign: rolled back to {checkpoint}; kl_coef {old_kl:.4g} -> {trainer.kl_coef:.4g}"
              + (f", learning rate x{lr_factor}" if lr_factor != 1.0 else ""), flush=True)


def newest_vetted(trainer) -> str | None:
    """The newest complete checkpoint whose weights passed the guards (None: there is none)."""
    from hfalign.rundir import complete_checkpoint

    for step in sorted(trainer.vetted, reverse=True):
        path = Path(trainer.args.output_dir) / f"checkpoint-{step}"
        if complete_checkpoint(path):
            return str(path)
    return None


def state(trainer) -> list[dict]:
    """Every guard's state (rollbacks taken, a collapse guard's early window), for a checkpoint."""
    return [{"name": g.name, **g.state_dict()} for g in guards(trainer)]


def load_state(trainer, saved: list[dict]) -> None:
    """A checkpoint's guard states back into this run's guards (the same guards, in the same order); a guard the
    checkpoint does not know starts fresh, and says so."""
    for i, g in enumerate(guards(trainer)):
        if i < len(saved) and saved[i].get("name") == g.name:
            g.load_state_dict(saved[i])
        elif trainer.is_world_process_zero():
            print(f"hfalign: {g.name} is not in the checkpoint's guards; it starts afresh", flush=True)
