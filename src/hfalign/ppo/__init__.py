"""hfalign's PPO: pure math in core.py, PPOConfig in config.py, the trainer in trainer.py."""

from hfalign.ppo.config import PPOConfig

__all__ = ["PPOConfig", "PPOTrainer"]


def __getattr__(name):
    if name == "PPOTrainer":
        from hfalign.ppo.trainer import PPOTrainer

        return PPOTrainer
    raise AttributeError(name)
