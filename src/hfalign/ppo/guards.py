"""Acting on PPO guards (callbacks that answer `trip(metrics)`, see hfalign.callback_types.Guard): warn, stop with a
checkpoint, or roll back to the newest checkpoint and go on more carefully (higher KL coefficient, lower lr)."""

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
    if rollback and not resuming:
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
    checkpoint = _newest_checkpoint(trainer)
    if guard.rollbacks >= guard.max_rollbacks or checkpoint is None:
        # giving up: the run ends on the last checkpoint the guards let through, not on the weights just judged broken
        if trainer.is_world_process_zero():
            print(f"hfalign: {guard.name}: {guard.rollbacks} rollbacks already; stopping on "
                  f"{checkpoint or 'the current weights (no checkpoint)'} and saving", flush=True)
        if checkpoint is not None:
            restore(trainer, checkpoint)
        trainer.control.should_save = trainer.control.should_training_stop = True
        trainer._save_checkpoint(trainer.model, trial=None)
        return
    restore(trainer, checkpoint, kl_factor=guard.kl_factor, lr_factor=guard.lr_factor)
    for g in rollback:
        g.rollbacks += 1


def restore(trainer, checkpoint: str, kl_factor: float = 1.0, lr_factor: float = 1.0) -> None:
    """The checkpoint's trainable weights, optimizer state, KL coefficient and score statistics; then the KL
    coefficient times kl_factor and the learning rate (and its schedule) times lr_factor. Step, episode and data
    position go on: a rollback costs the updates since the checkpoint. Under DeepSpeed the engine loads its own
    checkpoint (its scheduler too, so the schedule resumes from the checkpoint's step)."""
    from hfalign.ppo import core

    old_kl = trainer.kl_coef
    if trainer.is_deepspeed_enabled:  # the engine's own checkpoint: weights, optimizer, scheduler, on every rank
        from transformers.integrations.deepspeed import deepspeed_load_checkpoint

        deepspeed_load_checkpoint(trainer.model_wrapped, checkpoint, load_module_strict=False)
    else:
        trainer._load_from_checkpoint(checkpoint)
        optimizer_file = os.path.join(checkpoint, "optimizer.pt")
        if os.path.isfile(optimizer_file):
            trainer.optimizer.load_state_dict(torch.load(optimizer_file, map_location=trainer.args.device))
    with open(os.path.join(checkpoint, "hfalign_ppo_state.json"), encoding="utf-8") as f:
        saved = json.load(f)
    trainer.kl_coef = max(saved["kl_coef"], old_kl) * kl_factor  # repeated rollbacks keep raising it
    trainer.moments = core.RunningMoments(**saved["moments"])
    if trainer.is_deepspeed_enabled:  # its scheduler came back with the checkpoint's rates: so does adaptive_lr's scale
        trainer.lr_scale = saved.get("lr_scale", trainer.lr_scale)
    trainer.multiply_lr(lr_factor)
    if trainer.is_world_process_zero():
        print(f"hfalign: rolled back to {checkpoint}; kl_coef {old_kl:.4g} -> {trainer.kl_coef:.4g}"
              + (f", learning rate x{lr_factor}" if lr_factor != 1.0 else ""), flush=True)


def _newest_checkpoint(trainer) -> str | None:
    from hfalign.rundir import last_checkpoint

    return last_checkpoint(Path(trainer.args.output_dir))
