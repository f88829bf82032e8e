"""What a PPO checkpoint holds beyond Trainer's own files, and the three ways back to one: resume (a new process goes
on), restore (a guard's rollback, in the same process) and the non-DeepSpeed weight load both use.

    checkpoint-N/hfalign_ppo_state.json   KL coefficient, episode, score moments, lr scale, vetted steps, guard states,
                                          batch shape (processes x prompts per process)
    checkpoint-N/trainable.safetensors    every trainable tensor (policy + value); under DeepSpeed its own global_stepN/
    checkpoint-N/optimizer.pt, scheduler.pt, rng_state[_R].pth    Trainer's
    checkpoint-N/trainer_state.json       written last by Trainer: the completeness marker (rundir.complete_checkpoint)

PPOTrainer's overrides of Trainer's checkpoint hooks call these; the guards (ppo/guards.py) keep their own state and
choose what to restore, this module only reads and writes.
"""

from __future__ import annotations

import json
import os

import torch

from hfalign.errors import UserError
from hfalign.ppo.saving import TRAINABLE, save_parts, save_trainable, state_to_save

PPO_STATE = "hfalign_ppo_state.json"


def batch_shape(plan) -> dict:
    """What a checkpoint's step count means: processes x prompts per process per update (x responses per prompt,
    written only when more than one, so checkpoints from before grouped rollouts still match)."""
    shape = {"processes": plan.world_size, "prompts_per_process": plan.prompts_per_update}
    return shape | ({"responses_per_prompt": plan.num_generations} if plan.num_generations > 1 else {})


def write_state(trainer, guard_states: list[dict]) -> None:
    """The PPO state into checkpoint-<global_step>/ (main process), before Trainer writes its files and, last, the
    marker: a kill at any moment leaves the checkpoint whole or ignored."""
    if not trainer.args.should_save:
        return
    path = os.path.join(trainer.args.output_dir, f"checkpoint-{trainer.state.global_step}", PPO_STATE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"kl_coef": trainer.kl_coef, "episode": trainer.episode, "moments": trainer.moments.state(),
                   "lr_scale": trainer.lr_scale, "vetted": sorted(trainer.vetted), "guards": guard_states,
                   "batch": batch_shape(trainer.plan), "advantage_estimator": trainer.args.advantage_estimator,
                   "reward": getattr(trainer.reward_fn, "state", dict)()}, f)  # combined rewards' statistics


def exists(trainer, step: int) -> bool:
    return os.path.isdir(os.path.join(trainer.args.output_dir, f"checkpoint-{step}"))


def read_state(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, PPO_STATE), encoding="utf-8") as f:
        return json.load(f)


def check_fits(trainer, checkpoint: str) -> None:
    """Before any weight loads: a checkpoint of another batch shape or of an estimator with(out) a critic is refused
    with what to do (its step count, data position and schedule mean that batch; its weights that model)."""
    from hfalign.ppo.plan import plan

    saved = read_state(checkpoint)
    ours = batch_shape(plan(trainer.args, trainer.accelerator.num_processes, len(trainer.prompts)))
    if saved.get("batch", ours) != ours:
        raise UserError(f"{checkpoint} was written by a run whose rollout batch was {saved['batch']}; this run's is "
                        f"{ours}. Its step count, data position and schedule mean that batch only, so it cannot go on "
                        "with another process count or batch size.",
                        fix="resume with the processes and batch settings the run started with (total_episodes may "
                            "grow), or start over with overwrite=true")
    estimator = saved.get("advantage_estimator", "gae")
    if (estimator == "gae") != (trainer.args.advantage_estimator == "gae"):
        raise UserError(f"{checkpoint} was written by a run with advantage_estimator {estimator}; this run's is "
                        f"{trainer.args.advantage_estimator}, and only one of them has a critic to restore.",
                        fix=f"resume with advantage_estimator: {estimator}, or start over with overwrite=true")


def resume(trainer, checkpoint: str) -> dict:
    """A new process goes on from `checkpoint` (its weights and optimizer already loaded by Trainer's
    _prepare_for_training, after check_fits): trainer state, callbacks' state, PPO state, RNG. Returns the saved PPO
    state (the caller hands the guards theirs)."""
    from transformers.trainer_callback import TrainerState

    trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    # the saved state is rank 0's: every rank would believe it is process zero (and write every log line)
    trainer.state.is_local_process_zero = trainer.is_local_process_zero()
    trainer.state.is_world_process_zero = trainer.is_world_process_zero()
    trainer._load_callback_state()
    saved = read_state(checkpoint)
    from hfalign.ppo import core

    trainer.kl_coef, trainer.episode = saved["kl_coef"], saved["episode"]
    trainer.moments = core.RunningMoments(**saved["moments"])
    trainer.lr_scale = saved.get("lr_scale", 1.0)  # the scaled rate itself comes back with optimizer and scheduler
    trainer.vetted = set(saved.get("vetted", [0]))
    if hasattr(trainer.reward_fn, "load_state"):
        trainer.reward_fn.load_state(saved.get("reward"))
    trainer._load_rng_state(checkpoint)
    return saved


def load_trainable(model, checkpoint: str) -> None:
    """Non-DeepSpeed: the wrapper's trainable weights (policy and value) from trainable.safetensors; a checkpoint of
    another model or adapter layout is refused (resuming would train from half-restored weights)."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(checkpoint, TRAINABLE))
    extra = set(state) - set(model.state_dict())
    missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(state)
    if extra or missing:
        raise UserError(f"checkpoint {checkpoint} does not fit this model: "
                        f"{len(missing)} trainable tensors missing (e.g. {sorted(missing)[:2]}), "
                        f"{len(extra)} unknown (e.g. {sorted(extra)[:2]}).",
                        fix="resume with the recipe that wrote it, or start over with overwrite=true")
    model.load_state_dict(state, strict=False)


def restore(trainer, checkpoint: str, kl_factor: float = 1.0, lr_factor: float = 1.0) -> None:
    """A rollback, in the running process: the checkpoint's trainable weights, optimizer moments, fp16 loss scale, KL
    coefficient and score statistics; then the KL coefficient times kl_factor and the learning rate times lr_factor.
    Step, episode, data position and the learning-rate schedule go on from where the run is (the rate the next step
    takes is today's schedule times the factors, not the checkpoint's): a rollback costs the updates since the
    checkpoint. Under DeepSpeed the engine loads its own checkpoint and the schedule is put back where it was."""
    from hfalign.ppo import core

    old_kl, schedule = trainer.kl_coef, trainer.lr_scheduler.state_dict()
    rates = [group["lr"] for group in trainer.optimizer.param_groups]
    if trainer.is_deepspeed_enabled:  # the engine's own checkpoint: weights, optimizer, its scheduler, on every rank
        from transformers.integrations.deepspeed import deepspeed_load_checkpoint

        deepspeed_load_checkpoint(trainer.model_wrapped, checkpoint, load_module_strict=False)
    else:
        load_trainable(trainer.model, checkpoint)
        trainer.optimizer.load_state_dict(torch.load(os.path.join(checkpoint, "optimizer.pt"),
                                                     map_location=trainer.args.device))
        trainer._load_scaler(checkpoint)  # fp16: the loss scale the checkpoint's steps ran at
    trainer.lr_scheduler.load_state_dict(schedule)
    for group, rate in zip(trainer.optimizer.param_groups, rates):
        group["lr"] = rate
    saved = read_state(checkpoint)
    trainer.kl_coef = max(saved["kl_coef"], old_kl) * kl_factor  # repeated rollbacks keep raising it
    trainer.moments = core.RunningMoments(**saved["moments"])
    trainer.multiply_lr(lr_factor)
    if trainer.is_world_process_zero():
        print(f"hfalign: rolled back to {checkpoint}; kl_coef {old_kl:.4g} -> {trainer.kl_coef:.4g}"
              + (f", learning rate x{lr_factor}" if lr_factor != 1.0 else ""), flush=True)


def save_model(trainer, output_dir: str | None, checkpoint: bool) -> None:
    """The result (policy + value as HF files), or for a checkpoint the trainable weights once: under DeepSpeed its
    own checkpoint holds them, so nothing is consolidated; elsewhere trainable.safetensors. Under ZeRO-3 only what
    is written is gathered, never the frozen reference or reward."""
    output_dir = output_dir or trainer.args.output_dir
    if checkpoint and trainer.is_deepspeed_enabled:
        return
    state = state_to_save(trainer.model, trainable_only=checkpoint, should_save=trainer.args.should_save)
    if not trainer.args.should_save:
        return
    if checkpoint:
        save_trainable(state, output_dir)
    else:
        save_parts(trainer.model, state, output_dir, trainer.tokenizer)
    torch.save(trainer.args, os.path.join(output_dir, "training_args.bin"))
