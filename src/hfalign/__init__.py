"""hfalign: classic RLHF (SFT -> reward model -> PPO) on the current Hugging Face stack."""

__version__ = "0.1.0"
