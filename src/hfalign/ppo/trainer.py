"""hfalign's PPOTrainer: a transformers Trainer whose training loop is PPO.

    rollout (generate) -> score -> old/ref logprobs and values -> KL-penalised rewards -> GAE -> minibatch updates

It calls `Trainer.__init__` and reuses the Trainer's machinery for the rest — accelerator and DeepSpeed setup,
optimizer and scheduler, callbacks and report_to, logging, checkpoint rotation, `save_model` under DDP and ZeRO-3
(TRL 1.12 skipped `Trainer.__init__` and broke saving: huggingface/trl#2885, #3301). A checkpoint holds the policy,
the value model (TRL 1.12 lost it: trl#3293), optimizer, scheduler, RNG, KL coefficient and episode counter.

Private transformers/accelerate API this module relies on (checked against transformers >=5.0,<6 and accelerate
>=1.10,<2, the ranges pyproject.toml pins); a new major version must be read against this list:
    Trainer._inner_training_loop      replaced: the PPO loop
    Trainer._prepare_for_training     called: accelerator/DeepSpeed wrapping, optimizer, scheduler, checkpoint load
    Trainer._load_from_checkpoint     replaced: non-DeepSpeed resume reads trainable.safetensors
    Trainer._save_checkpoint          extended: writes hfalign_ppo_state.json beside Trainer's files
    Trainer.save_model(_internal_call)  replaced: policy and value files (saving.py); checkpoints: trainable once
    Trainer._load_rng_state           called on resume
    Trainer._load_callback_state      called on resume (ExportableState callbacks)
    accelerator.gradient_state._set_sync_gradients   called: gradient accumulation in a custom loop
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections import defaultdict

import torch
from transformers import Trainer
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_utils import TrainOutput

from hfalign.errors import UserError
from hfalign.ppo import core, guards
from hfalign.ppo.build import from_trl_args
from hfalign.ppo.config import NOT_ACTED_ON, PPOConfig
from hfalign.ppo.generation import HFGenerator, stop_token_ids
from hfalign.ppo.plan import plan, plan_problem
from hfalign.ppo.policy_value import PolicyAndValue
from hfalign.ppo.rollout import Rollout, left_pad, prompt_batches

PPO_STATE = "hfalign_ppo_state.json"
TRAINABLE = "trainable.safetensors"


class PPOTrainer(Trainer):
    def __init__(self, args: PPOConfig, processing_class, model, ref_model=None, reward_model=None, train_dataset=None,
                 value_model=None, data_collator=None, eval_dataset=None, optimizers=(None, None), callbacks=None,
                 peft_config=None):
        """TRL 1.12's signature, argument for argument. `model` is a causal LM (assembled here, TRL-style) or a ready
        PolicyAndValue (what the recipe stage builds). `reward_model` is a scalar-head model or a function
        `(prompts, completions) -> list[float]`. Datasets hold `input_ids` (TRL style, pre-tokenized; `attention_mask`
        honoured), or a text or conversational `prompt`. `data_collator` is accepted and not needed (prompts are
        padded here)."""
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        if args.stop_token is not None and args.stop_token_id is not None:
            raise ValueError("You cannot set both `stop_token` and `stop_token_id`.")  # TRL 1.12's own words
        if ref_model is not None and ref_model is model:
            raise ValueError("`model` and `ref_model` cannot be the same object: pass a copy, or None with peft_config")
        if args.push_to_hub and _hub_offline():
            raise ValueError("push_to_hub=True needs the Hugging Face Hub, and HF_HUB_OFFLINE is set: unset one")
        self.reward_fn = reward_model if callable(reward_model) and not isinstance(reward_model, torch.nn.Module) else None
        if not isinstance(model, PolicyAndValue):
            model = from_trl_args(model, ref_model, None if self.reward_fn else reward_model, value_model, peft_config)
        if self.reward_fn is None and model.reward is None and model.reward_head is None:
            raise ValueError("PPOTrainer needs a reward: pass reward_model (a model or a function)")
        self.tokenizer = processing_class
        embedding = model.policy.get_input_embeddings()  # under PEFT's wrapper when the adapter trains token rows
        rows = getattr(getattr(embedding, "token_adapter", None), "base_layer", embedding).num_embeddings
        if len(processing_class) > rows:  # a pad token added to the tokenizer, not to the model: ids past the table
            raise ValueError(f"the tokenizer has {len(processing_class)} tokens, the policy's embedding {rows} rows: "
                             "token ids past the table would crash the rollout. After tokenizer.add_special_tokens, "
                             "call resize_token_embeddings(len(tokenizer)) on the policy, reference, reward and value "
                             "models (or reuse an existing token as pad)")
        if args.stop_token_id is not None:  # TRL 1.12's single stop id joins hfalign's list
            args.stop_token_ids = list(dict.fromkeys([*(args.stop_token_ids or []), args.stop_token_id]))
        self.stop_ids = stop_token_ids(args, processing_class, model.policy)
        self.generator = HFGenerator(args, processing_class, self.stop_ids)  # the sampling seam (ppo/generation.py)
        super().__init__(model=model, args=args, processing_class=processing_class, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, callbacks=callbacks, optimizers=optimizers)
        self.prompts = self._encode_all(train_dataset, "train")
        self.eval_prompts = self._encode_all(eval_dataset, "eval") if eval_dataset is not None else []
        self.kl_coef = args.kl_coef
        self.moments = core.RunningMoments()
        self.episode = 0
        self.lr_scale = 1.0  # the adaptive-lr controller's factor on the configured learning rate (and its schedule)
        self.vetted: set[int] = set()  # steps whose weights passed the guards (ppo/guards.py): rollback targets
        self.adaptive_lr = args.adaptive_lr if args.adaptive_lr is not None else model.policy_is_adapter
        self._note_not_acted_on()

    # -- TRL 1.12's attributes, for scripts that read them ---------------------------------------------------------
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

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, list):  # conversational: the chat template ends with the assistant's turn opener
            return self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        return self.tokenizer(prompt)["input_ids"]

    def _encode_all(self, dataset, name: str) -> list[list[int]]:
        """Token ids of every prompt: TRL-style `input_ids` as they are (where `attention_mask` is 0, dropped), else
        `prompt` encoded. Longer than max_prompt_length -> cut on the left (the end of a prompt, where the generation
        prompt is, is what the policy continues), and said once."""
        columns = getattr(dataset, "column_names", None) or list(dataset[0])
        if "input_ids" in columns:
            ids = [list(x) for x in dataset["input_ids"]]
            if "attention_mask" in columns:
                ids = [[t for t, m in zip(x, mask) if m] for x, mask in zip(ids, dataset["attention_mask"])]
        elif "prompt" in columns:
            ids = [self._encode(p) for p in dataset["prompt"]]
        else:
            raise ValueError(f"the {name} dataset needs an 'input_ids' column (token ids, TRL style) or a 'prompt' column "
                             f"(text or conversation); it has {columns}")
        limit = self.args.max_prompt_length
        cut = sum(len(x) > limit for x in ids) if limit else 0
        if cut and self.args.process_index == 0:
            print(f"hfalign: {cut} of {len(ids)} {name} prompts are longer than max_prompt_length {limit} tokens; "
                  "their beginning is cut off", flush=True)
        return [x[-limit:] for x in ids] if limit else ids

    # -- rollout ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, queries: torch.Tensor, qmask: torch.Tensor, role: str = "policy", temperature=None) -> Rollout:
        """Sample responses and compute everything PPO needs about them, at the sampling temperature (`temperature`:
        sample at another one, for display only: logprobs stay at the training temperature)."""
        a, model, timing = self.args, self.model_wrapped, {}
        t0 = time.perf_counter()
        responses = self.generator(model, self.accelerator, queries, qmask, role, temperature)
        timing["timing/generate"] = time.perf_counter() - t0
        mask, last, has_eos = core.response_mask(responses, self.stop_ids)
        responses = torch.where(mask.bool(), responses, self.tokenizer.pad_token_id)
        full = torch.cat([queries, responses], 1)
        attn = torch.cat([qmask, mask], 1)
        pos = core.position_ids(attn)
        Q, keep = queries.shape[1], responses.shape[1] + 1  # logits only where a response token is predicted

        t0 = time.perf_counter()
        logprobs, ref_logprobs, values, token_scores = [], [], [], []
        for i in range(0, len(full), a.local_rollout_forward_batch_size):
            s = slice(i, i + a.local_rollout_forward_batch_size)
            logits, vals = model(full[s], attn[s], pos[s], mode="train", logits_to_keep=keep)
            logprobs.append(core.logprobs_from_logits(logits[:, :-1], responses[s], a.temperature))
            values.append(vals[:, Q - 1:-1])
            del logits  # one model's logits alive at a time (pitfall 18)
            ref_logits = model(full[s], attn[s], pos[s], mode="ref", logits_to_keep=keep)
            ref_logprobs.append(core.logprobs_from_logits(ref_logits[:, :-1], responses[s], a.temperature))
            del ref_logits
            if self.reward_fn is None:
                token_scores.append(model(full[s], attn[s], pos[s], mode="reward"))
        if self.reward_fn is None:  # the score at the last real token of prompt + response (pitfall 4)
            scores = torch.cat(token_scores)[torch.arange(len(full)), Q + last]
        else:
            prompts = self.tokenizer.batch_decode(queries, skip_special_tokens=True)
            texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
            scores = self._call_reward_fn(prompts, texts)
        timing["timing/score"] = time.perf_counter() - t0
        return Rollout(queries=queries, responses=responses, full=full, attn=attn, pos=pos, mask=mask, last=last,
                       has_eos=has_eos, logprobs=torch.cat(logprobs) * mask, ref_logprobs=torch.cat(ref_logprobs) * mask,
                       values=torch.cat(values) * mask, scores=scores.float(), timing=timing)

    def _call_reward_fn(self, prompts: list[str], texts: list[str]) -> torch.Tensor:
        name = getattr(self.reward_fn, "__qualname__", repr(self.reward_fn))
        out = self.reward_fn(prompts, texts)
        try:  # every rollout tensor lives on the accelerator's device, the function's scores too
            scores = torch.tensor([float(x) for x in out], dtype=torch.float32, device=self.accelerator.device)
        except (TypeError, ValueError):
            raise UserError(f"reward function {name} must return a list of numbers, got {type(out).__name__}.",
                            fix="return one float per completion") from None
        if len(scores) != len(texts):
            raise UserError(f"reward function {name} returned {len(scores)} scores for {len(texts)} completions.",
                            fix="return one float per completion, in order")
        return scores

    def shape_scores(self, scores: torch.Tensor, has_eos: torch.Tensor) -> torch.Tensor:
        """Missing-EOS penalty (on the response only: trl#6802), normalisation, clipping."""
        a = self.args
        if a.missing_eos_penalty is not None:
            scores = scores - a.missing_eos_penalty * (~has_eos).float()
        if a.normalize_scores:
            self.moments.update(self.accelerator.gather(scores.to(self.accelerator.device)).cpu())
            scores = (scores - self.moments.mean) / self.moments.std
        if a.score_clip is not None:
            scores = scores.clamp(-a.score_clip, a.score_clip)
        return scores

    # -- update ----------------------------------------------------------------------------------------------------
    def ppo_update(self, r: Rollout, advantages: torch.Tensor, returns: torch.Tensor) -> tuple[dict, int]:
        """num_ppo_epochs x num_mini_batches optimizer steps, each over gradient_accumulation_steps micro-batches.
        Returns (mean stats, optimizer steps taken), counted explicitly (TRL 1.12 miscounted: PPO_NOTES #12).

        With adaptive_lr, every minibatch's forward measures how far the steps so far moved the policy (approx-KL to
        the rollout's): past early_stop_kl, the last step is undone (weights and optimizer state) and the update
        ends; otherwise the measurement sets the next step's learning rate (core.adaptive_lr_scale)."""
        a, p, acc, model = self.args, self.plan, self.accelerator, self.model_wrapped
        stats, steps, undo, limit, rejected = defaultdict(list), 0, None, a.early_stop_kl, False
        model.train()
        for _ in range(a.num_ppo_epochs):
            order = torch.randperm(p.rollout_batch, device=r.full.device)  # on the device: indexing never syncs
            epoch_kl = []
            for mb_start in range(0, p.rollout_batch, p.mini_batch):
                micro_starts = range(mb_start, mb_start + p.mini_batch, p.micro_batch)
                for j, micro_start in enumerate(micro_starts):
                    # Accumulate like Trainer does (accelerate runs with GAS=1): sync on the last micro-batch only.
                    sync = j == len(micro_starts) - 1
                    acc.gradient_state._set_sync_gradients(sync)
                    no_sync = not sync and not self.is_deepspeed_enabled
                    with acc.no_sync(model) if no_sync else contextlib.nullcontext():
                        stat = self._micro_step(model, r, order[micro_start:micro_start + p.micro_batch], advantages, returns)
                    for k, v in stat.items():
                        stats[k].append(v)
                    epoch_kl.append(stat["policy/approxkl_avg"])
                if self.adaptive_lr:  # one sync per optimizer step
                    moved = self._mean(torch.stack(epoch_kl[-len(micro_starts):]).mean())
                    if undo is not None and limit is not None and moved > limit:
                        rejected = self._undo_step(undo)
                        break
                    if steps:  # the update's first minibatch measures the rollout's own weights (KL 0): no evidence
                        self.scale_lr(core.adaptive_lr_scale(self.lr_scale, moved, a.adaptive_lr_target) / self.lr_scale)
                    undo = self._step_snapshot()
                if self._warming_up() and not self.is_deepspeed_enabled:
                    # critic warm-up: the policy's gradients are zeros (DDP needs every parameter in the graph); as
                    # None instead, AdamW skips them -- no step count, no moments, no weight decay -- so the policy
                    # does not move and its optimizer state starts clean after the warm-up
                    for q in self.model.policy_parameters():
                        q.grad = None
                if a.max_grad_norm:
                    acc.clip_grad_norm_(model.parameters(), a.max_grad_norm)
                self.optimizer.step()
                if not acc.optimizer_step_was_skipped:
                    self.lr_scheduler.step()
                self.optimizer.zero_grad()
                steps += 1
            if rejected or (limit is not None and self._mean(torch.stack(epoch_kl).mean()) > limit):
                break
        if undo is not None and not rejected and limit is not None and self._probe_kl(r) > limit:  # the last step
            rejected = self._undo_step(undo)
        for _ in range(p.optimizer_steps_per_update - steps):  # the schedule follows the plan, early stop or not
            self.lr_scheduler.step()
        model.eval()
        means = {k: torch.stack(v).mean() for k, v in stats.items()}
        if self.adaptive_lr:
            means["train/rejected_steps"] = torch.tensor(float(rejected))
        return means, steps - int(rejected)

    def _warming_up(self) -> bool:
        return self.state.global_step < self.args.value_warmup_updates

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

    def _micro_step(self, model, r: Rollout, idx: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor) -> dict:
        """Forward and backward of one micro-batch; the loss is divided by the accumulation steps. Stats stay on the
        device (detached): the update syncs once, at its end."""
        a, Q, mask = self.args, r.prompt_width, r.mask[idx]
        assert idx.device == r.full.device, "a host-side index would sync the device at every micro-step"
        logits, vpred = model(r.full[idx], r.attn[idx], r.pos[idx], mode="train", logits_to_keep=r.mask.shape[1] + 1)
        logits = logits[:, :-1]
        new_logprobs, token_entropy = core.logprobs_and_entropy(logits, r.responses[idx], a.temperature)
        pg_loss, pg = core.policy_loss(new_logprobs, r.logprobs[idx], advantages[idx], mask, a.cliprange)
        vf_loss, vf_clipfrac = core.value_loss(vpred[:, Q - 1:-1], r.values[idx], returns[idx], mask, a.cliprange_value)
        warming_up = self._warming_up()  # the policy's zero gradients are dropped before the step (ppo_update)
        loss = (0.0 if warming_up else 1.0) * pg_loss + a.vf_coef * vf_loss
        if a.entropy_coef and not warming_up:  # only then is entropy in the graph (its full-vocabulary temporaries)
            entropy = core.masked_mean(core.entropy_from_logits(logits, a.temperature), mask)
            loss = loss - a.entropy_coef * entropy
        else:
            entropy = core.masked_mean(token_entropy, mask)
        stats = {}
        if a.vocab_kl_coef and not warming_up:  # the whole distribution, not only the sampled token, kept near ref
            with torch.no_grad():
                ref_logits = model(r.full[idx], r.attn[idx], r.pos[idx], mode="ref", logits_to_keep=r.mask.shape[1] + 1)
            vocab_kl = core.masked_mean(core.vocab_kl(logits, ref_logits[:, :-1], a.temperature), mask)
            del ref_logits
            loss = loss + a.vocab_kl_coef * vocab_kl
            stats["policy/vocab_kl"] = vocab_kl
        kwargs = {"scale_wrt_gas": False} if self.is_deepspeed_enabled else {}  # we scale; DeepSpeed must not again
        self.accelerator.backward(loss / a.gradient_accumulation_steps, **kwargs)
        stats |= {"policy/approxkl_avg": pg["approxkl"], "policy/clipfrac_avg": pg["clipfrac"], "loss/policy_avg": pg_loss,
                 "loss/value_avg": vf_loss, "val/clipfrac_avg": vf_clipfrac, "policy/entropy_avg": entropy,
                 "val/ratio": pg["ratio"], "val/ratio_var": pg["ratio_var"]}
        return {k: v.detach().float() for k, v in stats.items()}

    def _mean(self, value) -> float:
        return self._means({"x": value})["x"]

    def _means(self, metrics: dict) -> dict:
        """Means over processes of numbers or 0-d tensors, in one collective and one device sync."""
        keys, device = list(metrics), self.accelerator.device
        t = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float64, device=device).reshape(()) for k in keys])
        return dict(zip(keys, self.accelerator.reduce(t, reduction="mean").tolist()))

    # -- the loop --------------------------------------------------------------------------------------------------
    def _inner_training_loop(self, batch_size=None, args=None, resume_from_checkpoint=None, trial=None,
                             ignore_keys_for_eval=None):
        a, acc = self.args, self.accelerator
        self.plan = p = plan(a, acc.num_processes, len(self.prompts))
        if plan_problem(p, len(self.prompts)):
            raise ValueError(plan_problem(p, len(self.prompts)))
        # TRL 1.12's derived fields, filled in as its trainer did (hfalign's meaning: README "Migrating from TRL 1.12")
        a.num_total_batches = p.num_updates  # (world_size is TrainingArguments' property: the process count)
        a.micro_batch_size, a.local_batch_size, a.batch_size = p.micro_batch * p.world_size, p.rollout_batch, p.global_rollout_batch
        a.local_mini_batch_size, a.mini_batch_size = p.mini_batch, p.mini_batch * p.world_size
        sample_every = max(1, p.num_updates // a.num_sample_generations) if a.num_sample_generations > 0 else 0
        self.state = TrainerState(stateful_callbacks=[cb for cb in [*self.callback_handler.callbacks, self.control]
                                                      if isinstance(cb, ExportableState)])
        self.state.max_steps, self.state.logging_steps, self.state.save_steps = p.num_updates, a.logging_steps, a.save_steps
        self.state.train_batch_size = p.global_rollout_batch
        self.state.is_local_process_zero, self.state.is_world_process_zero = self.is_local_process_zero(), self.is_world_process_zero()
        self.model.wrap_checkpointed_layers()  # a model that arrived checkpointed, not through args
        if self.is_deepspeed_enabled and (a.bf16 or a.fp16):
            self.model.store_heads_as(torch.bfloat16 if a.bf16 else torch.float16)
        model, _ = self._prepare_for_training(p.total_optimizer_steps, None, resume_from_checkpoint)
        model.eval()  # dropout is off anyway; eval() also keeps any remaining stochastic layers deterministic
        if resume_from_checkpoint:
            self._resume(resume_from_checkpoint)
            # this run's plan: a resume with more total_episodes goes on to the new end
            self.state.max_steps, self.state.logging_steps, self.state.save_steps = p.num_updates, a.logging_steps, a.save_steps
        self.state.episode = self.episode  # TRL 1.12's OnlineTrainerState field
        guards.prepare(self, resuming=bool(resume_from_checkpoint))
        if self.is_world_process_zero():
            print("hfalign ppo plan: " + ", ".join(f"{k}={v}" for k, v in vars(p).items()), flush=True)
        self.control = self.callback_handler.on_train_begin(a, self.state, self.control)
        batches = prompt_batches(len(self.prompts), p.rollout_batch, acc.process_index, acc.num_processes, a.seed)
        for _ in range(self.state.global_step):  # a resumed run continues with the prompts it had not seen
            next(batches)
        start, start_episode, history = time.perf_counter(), self.episode, defaultdict(list)
        while self.state.global_step < p.num_updates:
            self.control = self.callback_handler.on_step_begin(a, self.state, self.control)
            metrics = self._one_update(next(batches))
            for k, v in metrics.items():
                history[k].append(v)
            self.state.global_step += 1
            self.state.episode = self.episode  # TRL 1.12's OnlineTrainerState field
            self.state.epoch = self.episode / max(1, len(self.prompts))
            eps = (self.episode - start_episode) / (time.perf_counter() - start)  # this process's run, not a resumed one's
            metrics.update({"eps": eps, "episode": self.episode,
                            "lr": self.lr_scheduler.get_last_lr()[0], "train/lr_scale": self.lr_scale})
            self.control = self.callback_handler.on_step_end(a, self.state, self.control)
            tripped = guards.check(self, metrics)  # may ask to stop (and save) or to skip this save for a rollback
            if self.control.should_log:
                self.log(metrics)
            if self.control.should_save:
                self._save_checkpoint(self.model, trial=None)
                self.control = self.callback_handler.on_save(a, self.state, self.control)
            guards.act(self, tripped)
            if sample_every and (self.state.global_step - 1) % sample_every == 0:  # TRL 1.12's num_sample_generations
                self.generate_completions(sampling=True)
            if self.control.should_training_stop:
                break
        self.control = self.callback_handler.on_train_end(a, self.state, self.control)
        summary = {k: sum(v) / len(v) for k, v in history.items()}
        return TrainOutput(self.state.global_step, summary.get("loss/policy_avg", 0.0), summary)

    def _one_update(self, indices: list[int]) -> dict:
        a, acc = self.args, self.accelerator
        queries, qmask = left_pad([self.prompts[i] for i in indices], self.tokenizer.pad_token_id)
        r = self.rollout(queries.to(acc.device), qmask.to(acc.device))
        scores = self.shape_scores(r.scores, r.has_eos)
        kl = core.kl_penalty(r.logprobs, r.ref_logprobs, a.kl_estimator) * r.mask
        rewards, non_score = core.token_rewards(scores, kl, self.kl_coef, r.last, r.mask)
        if a.whiten_rewards:
            rewards = core.masked_whiten(rewards, r.mask, shift_mean=False)
        advantages, returns = core.gae(rewards, r.values, r.mask, a.gamma, a.lam)
        if a.whiten_advantages:
            advantages = core.masked_whiten(advantages, r.mask)
        t0 = time.perf_counter()
        stats, steps = self.ppo_update(r, advantages, returns)
        metrics = {  # 0-d tensors on the device until _means: one sync for the whole update
            "objective/kl": kl.sum(1).mean(), "objective/kl_coef": self.kl_coef,
            "objective/entropy": (-r.logprobs).sum(1).mean(),
            "objective/non_score_reward": non_score.sum(1).mean(),
            "objective/rlhf_reward": (scores + non_score.sum(1)).mean(),
            "objective/scores": r.scores.mean(),
            **stats,
            "val/num_eos_tokens": r.has_eos.float().sum(),
            "val/truncated_frac": (~r.has_eos).float().mean(),
            "val/response_length": r.mask.sum(1).float().mean(),
            "val/repetition": core.repetition(r.responses, r.mask).mean(),  # share of repeated bigrams
            "val/explained_variance": core.explained_variance(r.values, returns, r.mask),
            "train/optimizer_steps": steps,
            **r.timing,
        }
        metrics = self._means(metrics)
        metrics["timing/update"] = time.perf_counter() - t0
        metrics["val/num_eos_tokens"] *= acc.num_processes  # a count, summed over processes
        self.episode += self.plan.global_rollout_batch
        if a.adaptive_kl:
            self.kl_coef = core.adaptive_kl_coef(self.kl_coef, metrics["objective/kl"], a.target_kl, a.kl_horizon,
                                                 self.plan.global_rollout_batch)
        self._notify_rollout(r, r.scores)  # the sample table shows what the reward model or function said
        return metrics

    def _notify_rollout(self, r: Rollout, scores: torch.Tensor) -> None:
        """Callbacks with an `on_rollout` method (the sample table) see this update's prompts, completions, scores."""
        listeners = [cb for cb in self.callback_handler.callbacks if hasattr(cb, "on_rollout")]
        if not listeners:
            return
        ends = r.responses.gather(1, r.last[:, None])[:, 0].tolist()
        samples = {"prompt": self.tokenizer.batch_decode(r.queries, skip_special_tokens=True),
                   "completion": self.tokenizer.batch_decode(r.responses, skip_special_tokens=True),
                   "score": scores.tolist(),  # read at the response's last token: the stop token where it has one
                   "ended_with": [self.tokenizer.convert_ids_to_tokens(t) if eos else None  # None: cut at the length
                                  for t, eos in zip(ends, r.has_eos.tolist())]}
        for cb in listeners:
            cb.on_rollout(self.args, self.state, self.control, samples=samples,
                          callbacks=self.callback_handler.callbacks)  # the trackers, for tables

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

    # -- checkpoints and saving ------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        """PPO's own state first: Trainer writes trainer_state.json last, and that file is what marks a checkpoint
        complete (rundir.complete_checkpoint), so a kill at any moment leaves a checkpoint whole or ignored."""
        if self.args.should_save:
            path = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}", PPO_STATE)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                json.dump({"kl_coef": self.kl_coef, "episode": self.episode, "moments": self.moments.state(),
                           "lr_scale": self.lr_scale, "vetted": sorted(self.vetted), "guards": guards.state(self),
                           "batch": _batch_shape(self.plan)}, f)
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
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    def _resume(self, checkpoint: str) -> None:
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
        # the saved state is rank 0's: every rank would believe it is process zero (and write every log line)
        self.state.is_local_process_zero, self.state.is_world_process_zero = self.is_local_process_zero(), self.is_world_process_zero()
        self._load_callback_state()
        with open(os.path.join(checkpoint, PPO_STATE), encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("batch", _batch_shape(self.plan)) != _batch_shape(self.plan):
            raise UserError(f"{checkpoint} was written by a run whose rollout batch was {saved['batch']}; this run's is "
                            f"{_batch_shape(self.plan)}. Its step count, data position and schedule mean that batch "
                            "only, so it cannot go on with another process count or batch size.",
                            fix="resume with the processes and batch settings the run started with (total_episodes "
                                "may grow), or start over with overwrite=true")
        self.kl_coef, self.episode = saved["kl_coef"], saved["episode"]
        self.moments = core.RunningMoments(**saved["moments"])
        self.lr_scale = saved.get("lr_scale", 1.0)  # the scaled rate itself comes back with optimizer and scheduler
        self.vetted = set(saved.get("vetted", [0]))
        guards.load_state(self, saved.get("guards", []))
        self._load_rng_state(checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Non-DeepSpeed resume: the trainable weights (policy and value) of the wrapper."""
        from safetensors.torch import load_file

        state = load_file(os.path.join(resume_from_checkpoint, TRAINABLE))
        extra = set(state) - set(self.model.state_dict())
        missing = {n for n, p in self.model.named_parameters() if p.requires_grad} - set(state)
        if extra or missing:  # a different model or adapter layout: resuming would train from half-restored weights
            raise UserError(f"checkpoint {resume_from_checkpoint} does not fit this model: "
                            f"{len(missing)} trainable tensors missing (e.g. {sorted(missing)[:2]}), "
                            f"{len(extra)} unknown (e.g. {sorted(extra)[:2]}).",
                            fix="resume with the recipe that wrote it, or start over with overwrite=true")
        self.model.load_state_dict(state, strict=False)

    def save_model(self, output_dir=None, _internal_call=False):
        """The result (policy + value as HF files), or for a checkpoint (`_internal_call`) the trainable weights
        once: under DeepSpeed its own checkpoint holds them, so nothing is consolidated; elsewhere
        trainable.safetensors. Under ZeRO-3 only what is written is gathered, never the frozen reference or reward."""
        from hfalign.ppo.saving import save_parts, save_trainable, state_to_save

        output_dir = output_dir or self.args.output_dir
        if _internal_call and self.is_deepspeed_enabled:
            return
        state = state_to_save(self.model, trainable_only=_internal_call, should_save=self.args.should_save)
        if not self.args.should_save:
            return
        if _internal_call:
            save_trainable(state, output_dir)
        else:
            save_parts(self.model, state, output_dir, self.tokenizer)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    # -- summary ---------------------------------------------------------------------------------------------------
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
        rows = []
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # seeded, so repeatable; training's random stream untouched
            torch.manual_seed(self.args.seed)
            for i in range(0, len(prompts), self.args.local_rollout_forward_batch_size):
                q, m = left_pad(prompts[i:i + self.args.local_rollout_forward_batch_size], self.tokenizer.pad_token_id)
                r = self.rollout(q.to(self.accelerator.device), m.to(self.accelerator.device), temperature=0.01 + 1e-7)
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

    @torch.no_grad()
    def sample(self, role: str, num_prompts: int) -> dict:
        """Completions of the held-out prompts (in order, from the first again while more are asked for than there are)
        from the policy or the reference, with scores and KL to the reference."""
        prompts = self.eval_prompts or self.prompts
        prompts = (prompts * -(-num_prompts // len(prompts)))[:num_prompts]
        torch.manual_seed(self.args.seed)
        out = {"prompt": [], "completion": [], "score": [], "kl": [], "has_eos": []}
        for i in range(0, len(prompts), self.args.local_rollout_forward_batch_size):
            q, m = left_pad(prompts[i:i + self.args.local_rollout_forward_batch_size], self.tokenizer.pad_token_id)
            r = self.rollout(q.to(self.accelerator.device), m.to(self.accelerator.device), role=role)
            out["prompt"] += self.tokenizer.batch_decode(q, skip_special_tokens=True)
            out["completion"] += self.tokenizer.batch_decode(r.responses, skip_special_tokens=True)
            out["score"] += r.scores.tolist()
            own = r.ref_logprobs if role == "ref" else r.logprobs  # KL of the sampling model to the reference
            out["kl"] += (own - r.ref_logprobs).sum(1).tolist()
            out["has_eos"] += r.has_eos.tolist()
        return out


def _batch_shape(p) -> dict:
    """What a checkpoint's step count means: processes x prompts per process per update."""
    return {"processes": p.world_size, "prompts_per_process": p.rollout_batch}


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
