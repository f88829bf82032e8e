"""hfalign's PPO: pure math in core.py, PPOConfig and the batch plan in config.py, the four roles behind one module in
policy_value.py (assembled by build.py), sampling in generation.py, the rollout record in rollout.py, the loop in
trainer.py, files in saving.py."""

from hfalign.ppo.config import PPOConfig

__all__ = ["PPOConfig", "PPOTrainer"]


def __getattr__(name):
    if name == "PPOTrainer":
        from hfalign.ppo.trainer import PPOTrainer

        return PPOTrainer
    raise AttributeError(name)
