"""The step-size control of a PPO update: a trust region on how far each optimizer step moves the policy (on by
default for a LoRA policy, `adaptive_lr`). Every minibatch's forward measures the approx-KL of the policy to the
rollout's; the measurement sets the next step's learning rate (core.adaptive_lr_scale: lower when a step overshoots
adaptive_lr_target, higher when it undershoots), and a step that carried the policy past early_stop_kl is undone --
weights and optimizer state from a snapshot -- and the update ends. The learning rate's scale is saved with a
checkpoint (ppo/checkpoint.py), so a resumed run goes on at the same rate.

It also resolves the step controls a LoRA policy gets by default (adaptive_lr, and the reference-tail KL whose
term the micro-step adds) and says which are on. A mixin of PPOTrainer (it reads the trainer's model, optimizer,
scheduler and plan); the loop calls it from ppo_update."""

from __future__ import annotations

import torch

from hfalign.ppo import core
from hfalign.ppo.rollout import Rollout


class StepSizeControl:
    def _resolve_step_control(self, args, lora_policy: bool) -> None:
        """The acting defaults a LoRA policy gets (null in PPOConfig): the trust region, and its tail held to the
        reference's (vocab_kl_coef 10, docs/lora.md); full fine-tuning needs neither."""
        self.adaptive_lr = args.adaptive_lr if args.adaptive_lr is not None else lora_policy
        self.vocab_kl_coef = args.vocab_kl_coef if args.vocab_kl_coef is not None else (10.0 if lora_policy else 0.0)

    def _say_step_control(self) -> None:
        if self.adaptive_lr or self.vocab_kl_coef:  # said at the start, not hidden
            tail = self.args.vocab_kl_tail
            where = f"tokens the reference gives < {tail}" if tail else "the whole vocabulary"
            print(f"hfalign ppo step control: adaptive_lr {'on' if self.adaptive_lr else 'off'}, vocab_kl_coef "
                  f"{self.vocab_kl_coef:g}" + (f" (mass on {where})" if self.vocab_kl_coef else ""), flush=True)

    def scale_lr(self, factor: float) -> None:
        """Multiply the learning rate now and its schedule from here on (the scheduler's base rates) by `factor`; both
        are saved with a checkpoint, so a resumed run goes on at the same rate."""
        self.lr_scale *= factor
        self.multiply_lr(factor)

    def multiply_lr(self, factor: float) -> None:
        """The learning rate now and its schedule (the scheduler's base rates) times `factor`, the controller's scale
        untouched (a guard's rollback lowers the rate beneath it)."""
        if factor == 1.0:
            return
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
        self.lr_scheduler.base_lrs = [lr * factor for lr in self.lr_scheduler.base_lrs]

    def _step_snapshot(self) -> dict | None:
        """The trainable weights and optimizer state before a step, to undo it (None under DeepSpeed, whose engine
        owns both: there only the learning-rate control acts)."""
        if self.is_deepspeed_enabled:
            return None
        params = [q for q in self.model.parameters() if q.requires_grad]
        state = {id(q): {k: v.clone() if torch.is_tensor(v) else v for k, v in self.optimizer.state[q].items()}
                 for q in params if q in self.optimizer.state}
        return {"params": [(q, q.detach().clone()) for q in params], "state": state}

    def _undo_step(self, snapshot: dict) -> bool:
        """Back to the snapshot's weights and optimizer state, gradients dropped, the learning rate halved; True."""
        with torch.no_grad():
            for q, saved in snapshot["params"]:
                q.copy_(saved)
                if q in self.optimizer.state:
                    self.optimizer.state[q] = snapshot["state"].get(id(q), {})
        self.optimizer.zero_grad()
        self.scale_lr(max(0.5, 0.01 / self.lr_scale))
        return True

    @torch.no_grad()
    def _probe_kl(self, r: Rollout) -> float:
        """approx-KL of the current policy to the rollout's on one micro-batch (after an update's last step)."""
        idx = torch.arange(min(self.plan.micro_batch, len(r.full)))
        logits, _ = self.model_wrapped(r.full[idx], r.attn[idx], r.pos[idx], mode="train", logits_to_keep=r.mask.shape[1] + 1)
        new = core.logprobs_from_logits(logits[:, :-1], r.responses[idx], self.args.temperature)
        return self._mean(0.5 * core.masked_mean((new - r.logprobs[idx]) ** 2, r.mask[idx]))
