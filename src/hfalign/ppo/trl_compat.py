"""What a TRL 1.12 PPO script touches beyond the loop, so that it runs unchanged on hfalign's PPOTrainer: the argument
checks TRL made (in its words), the trainer attributes it read, the derived batch fields it filled in, the config
fields accepted and not acted on, and `generate_completions`. docs/migrating.md has the table.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from hfalign.ppo.config import NOT_ACTED_ON, PPOConfig
from hfalign.ppo.rollout import left_pad


def check_arguments(args: PPOConfig, model, ref_model) -> None:
    """TRL 1.12's refusals, before any model is touched."""
    if args.stop_token is not None and args.stop_token_id is not None:
        raise ValueError("You cannot set both `stop_token` and `stop_token_id`.")  # TRL 1.12's own words
    if ref_model is not None and ref_model is model:
        raise ValueError("`model` and `ref_model` cannot be the same object: pass a copy, or None with peft_config")
    if args.push_to_hub and _hub_offline():
        raise ValueError("push_to_hub=True needs the Hugging Face Hub, and HF_HUB_OFFLINE is set: unset one")


def check_vocabulary(tokenizer, policy) -> None:
    """A pad token added to the tokenizer and not to the model: ids past the embedding table would crash the rollout."""
    embedding = policy.get_input_embeddings()  # under PEFT's wrapper when the adapter trains token rows
    rows = getattr(getattr(embedding, "token_adapter", None), "base_layer", embedding).num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the policy's embedding {rows} rows: "
                         "token ids past the table would crash the rollout. After tokenizer.add_special_tokens, "
                         "call resize_token_embeddings(len(tokenizer)) on the policy, reference, reward and value "
                         "models (or reuse an existing token as pad)")


def fill_derived_fields(args: PPOConfig, p) -> None:
    """TRL 1.12's derived batch fields, filled in as its trainer did (hfalign's meaning:
    docs/migrating.md); world_size is TrainingArguments' own property (the process count)."""
    args.num_total_batches = p.num_updates
    args.micro_batch_size, args.local_batch_size, args.batch_size = p.micro_batch * p.world_size, p.rollout_batch, p.global_rollout_batch
    args.local_mini_batch_size, args.mini_batch_size = p.mini_batch, p.mini_batch * p.world_size


class TRLSurface:
    """PPOTrainer's TRL 1.12 attributes and methods (a mixin: it reads the trainer's model, args and rollout)."""

    @property
    def policy_model(self):
        """The policy (on a shared base: the PEFT model, with the policy adapter active while training)."""
        return self.model.policy

    @property
    def ref_model(self):
        """The frozen reference; None on a shared base, where it is the base with adapters off (as TRL with PEFT)."""
        return self.model.ref

    @property
    def reward_model(self):
        """The reward model, or the reward function; None on a shared base (the reward is an adapter stack there)."""
        return self.reward_fn if self.reward_fn is not None else self.model.reward

    @property
    def value_model(self):
        """The critic's model; on a shared base the PEFT model that carries the 'value' adapter (its head:
        trainer.model.value_head)."""
        return self.model.value_model if self.model.value_model is not None else self.model.policy

    def _note_not_acted_on(self) -> None:
        """TRL 1.12 fields this trainer accepts and does not use, said once each when set."""
        defaults = {f.name: f.default for f in dataclasses.fields(PPOConfig)}
        for name, why in NOT_ACTED_ON.items():
            if getattr(self.args, name) != defaults[name] and self.args.process_index == 0:
                print(f"hfalign: PPOConfig.{name}={getattr(self.args, name)!r} is accepted and not used by the trainer: "
                      f"{why}", flush=True)

    @torch.no_grad()
    def generate_completions(self, sampling: bool = False) -> list[dict]:
        """TRL 1.12's: the policy's completions of the eval prompts, near-greedy (temperature 0.01, as TRL), scored;
        seeded with args.seed (the training's random stream is left as it was); returns the rows {query,
        model response, score}, prints the first five, appends them to
        output_dir/completions.jsonl (with the step) and sends them to trackers that show tables. `sampling`: only
        the first batch of per_device_eval_batch_size prompts. No eval set: nothing (as TRL)."""
        from hfalign.callback_types import to_trackers

        if not self.eval_prompts:
            return []
        prompts = self.eval_prompts[:self.args.per_device_eval_batch_size] if sampling else self.eval_prompts
        rows, device, batch = [], self.accelerator.device, self.args.local_rollout_forward_batch_size
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # training's stream untouched
            torch.manual_seed(self.args.seed)
            for i in range(0, len(prompts), batch):
                q, m = left_pad(prompts[i:i + batch], self.tokenizer.pad_token_id)
                r = self.rollout(q.to(device), m.to(device), temperature=0.01 + 1e-7)
                for query, response, score in zip(self.tokenizer.batch_decode(q, skip_special_tokens=True),
                                                  self.tokenizer.batch_decode(r.responses, skip_special_tokens=True),
                                                  r.scores.tolist()):
                    rows.append({"query": query, "model response": response, "score": score})
        if self.is_world_process_zero():
            print("\n".join([f"hfalign completions (step {self.state.global_step}):",
                             *(f"  {row['query']!r} -> {row['model response']!r}  score {row['score']:.3f}" for row in rows[:5])]),
                  flush=True)
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, "completions.jsonl"), "a", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps({"step": self.state.global_step, **row}) + "\n")
            to_trackers(rows, self.state.global_step, self.callback_handler.callbacks)
        return rows


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
