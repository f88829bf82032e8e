"""PPOTrainer's overrides of Trainer's checkpoint and saving hooks, as a mixin: what a save writes and what a resume
checks before any weight loads (ppo/checkpoint.py reads and writes the files; ppo/guards.py picks rollback targets).
Private transformers API: Trainer._save_checkpoint (extended), _save_rng_state (extended), _load_from_checkpoint and
save_model (replaced), as listed in ppo/trainer.py."""

from __future__ import annotations

from hfalign.ppo import checkpoint, guards


class Persistence:
    def _save_checkpoint(self, model, trial) -> None:
        """PPO's own state first: Trainer writes trainer_state.json last, and that file is what marks a checkpoint
        complete (rundir.complete_checkpoint), so a kill at any moment leaves a checkpoint whole or ignored."""
        checkpoint.write_state(self, guards.state(self))
        # rotation (save_total_limit) keeps the newest checkpoint and Trainer's "best" one: for PPO, the newest vetted
        self.state.best_model_checkpoint = guards.newest_vetted(self)
        super()._save_checkpoint(model, trial)

    def _save_rng_state(self, output_dir: str) -> None:
        """Every rank's rng_state_N.pth is on disk before rank 0 writes trainer_state.json, the file that marks the
        checkpoint complete (rundir.complete_checkpoint also asks for every rank's file)."""
        super()._save_rng_state(output_dir)
        self.accelerator.wait_for_everyone()

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Trainer.train; `resume_from_checkpoint=True` means the newest *complete* checkpoint (transformers' own
        choice is the highest-numbered one, torn or not)."""
        if resume_from_checkpoint is True:
            from pathlib import Path

            from hfalign.rundir import last_checkpoint

            resume_from_checkpoint = last_checkpoint(Path(self.args.output_dir))
            if resume_from_checkpoint is None:
                raise ValueError(f"no complete checkpoint in {self.args.output_dir} to resume from")
        if resume_from_checkpoint:
            checkpoint.check_fits(self, resume_from_checkpoint)  # before Trainer loads any weights
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Non-DeepSpeed resume: the trainable weights (policy and value) of the wrapper."""
        checkpoint.load_trainable(self.model, resume_from_checkpoint)

    def save_model(self, output_dir=None, _internal_call=False):
        """The result (policy + value as HF files); for a checkpoint (`_internal_call`) the trainable weights."""
        checkpoint.save_model(self, output_dir, checkpoint=_internal_call)
