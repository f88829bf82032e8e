"""hfalign's PPO: pure math in core.py, PPOConfig in config.py, the batch plan in plan.py, the four roles behind one module in
policy_value.py (assembled by build.py), sampling in generation.py, the rollout record in rollout.py, the loop in
trainer.py, files in saving.py."""

__all__ = ["PPOConfig", "PPOTrainer"]


def __getattr__(name):  # imported on first use: the pure modules (core, plan) stay free of transformers
    if name == "PPOConfig":
        from hfalign.ppo.config import PPOConfig

        return PPOConfig
    if name == "PPOTrainer":
        from hfalign.ppo.trainer import PPOTrainer

        return PPOTrainer
    raise AttributeError(name)
