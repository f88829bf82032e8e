"""hfalign's PPO: pure math in core.py, PPOConfig in config.py, the batch plan in plan.py, the four roles behind one
module in policy_value.py (its parts loaded and assembled by build.py), sampling in generation.py, the rollout record
and prompt batches in rollout.py, the loop in trainer.py with its step-size control in step_size.py, checkpoints and
resume in checkpoint.py (files in saving.py), guards (watching and acting) in guards.py, and what TRL 1.12 scripts
touch beyond the loop in trl_compat.py."""

__all__ = ["PPOConfig", "PPOTrainer"]


def __getattr__(name):  # imported on first use: the pure modules (core, plan) stay free of transformers
    if name == "PPOConfig":
        from hfalign.ppo.config import PPOConfig

        return PPOConfig
    if name == "PPOTrainer":
        from hfalign.ppo.trainer import PPOTrainer

        return PPOTrainer
    raise AttributeError(name)
