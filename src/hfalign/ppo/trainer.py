"""hfalign's PPOTrainer: a transformers Trainer whose training loop is PPO.

    rollout (generate k per prompt) -> score -> old/ref logprobs (and values) -> advantages -> minibatch updates

Advantages come from GAE with a learned critic (PPO) or a critic-free estimator (RLOO, GRPO, REINFORCE++, ReMax:
ppo/estimate.py), the one switch `advantage_estimator`; without a critic no value model exists (build.py).

It calls `Trainer.__init__` and reuses the Trainer's machinery for the rest — accelerator and DeepSpeed setup,
optimizer and scheduler, callbacks and report_to, logging, checkpoint rotation, `save_model` under DDP and ZeRO-3
(TRL 1.12 skipped `Trainer.__init__` and broke saving: huggingface/trl#2885, #3301). A checkpoint holds the policy,
the value model (TRL 1.12 lost it: trl#3293), optimizer, scheduler, RNG, KL coefficient and episode counter.

Private transformers/accelerate API this module relies on (checked against transformers >=5.0,<6 and accelerate
>=1.10,<2, the ranges pyproject.toml pins); a new major version must be read against this list:
    Trainer._inner_training_loop      replaced: the PPO loop
    Trainer._prepare_for_training     called: accelerator/DeepSpeed wrapping, optimizer, scheduler, checkpoint load
    Trainer._load_from_checkpoint     replaced: non-DeepSpeed resume reads trainable.safetensors (checkpoint.py)
    Trainer._save_checkpoint          extended: writes hfalign_ppo_state.json beside Trainer's files (checkpoint.py)
    Trainer._save_rng_state           extended: a barrier after every rank's file
    Trainer.save_model(_internal_call)  replaced: policy and value files (saving.py); checkpoints: trainable once
    Trainer._load_rng_state, _load_callback_state, _load_scaler   called on resume / rollback (checkpoint.py)
    accelerator.gradient_state._set_sync_gradients   called: gradient accumulation in a custom loop
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch
from transformers import Trainer
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_utils import TrainOutput

from hfalign.ppo import checkpoint, core, graphs, guards, trl_compat
from hfalign.ppo.build import from_trl_args
from hfalign.ppo.config import PPOConfig
from hfalign.ppo.estimate import estimate
from hfalign.ppo.generation import make_generator, stop_token_ids
from hfalign.ppo.persistence import Persistence
from hfalign.ppo.plan import plan, plan_problem
from hfalign.ppo.policy_value import PolicyAndValue
from hfalign.ppo.rollout import (
    Rollout,
    call_reward_fn,
    encode_all,
    left_pad,
    originals,
    prompt_batches,
    reward_prompts,
    samples_of,
)
from hfalign.ppo.step_size import StepSizeControl
from hfalign.ppo.trl_compat import TRLSurface
from hfalign.rewards import RewardUnavailable


class PPOTrainer(TRLSurface, StepSizeControl, Persistence, Trainer):
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
        trl_compat.check_arguments(args, model, ref_model)
        self.reward_fn = reward_model if callable(reward_model) and not isinstance(reward_model, torch.nn.Module) else None
        if not isinstance(model, PolicyAndValue):
            torch.manual_seed(args.seed)  # a peft_config's adapters (and value head) start from the run's seed
            model = from_trl_args(model, ref_model, None if self.reward_fn else reward_model, value_model, peft_config,
                                  critic=args.advantage_estimator == "gae")
        if self.reward_fn is None and model.reward is None and model.reward_head is None:
            raise ValueError("PPOTrainer needs a reward: pass reward_model (a model or a function)")
        self.tokenizer = processing_class
        trl_compat.check_vocabulary(processing_class, model.policy)
        if args.stop_token_id is not None:  # TRL 1.12's single stop id joins hfalign's list
            args.stop_token_ids = list(dict.fromkeys([*(args.stop_token_ids or []), args.stop_token_id]))
        self.stop_ids = stop_token_ids(args, processing_class, model.policy)
        super().__init__(model=model, args=args, processing_class=processing_class, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, callbacks=callbacks, optimizers=optimizers)
        self.generator = make_generator(args, processing_class, self.stop_ids, model.policy,
                                        self.accelerator.device)  # the sampling seam (ppo/generation.py)
        say, limit = args.process_index == 0, args.max_prompt_length
        self.prompts = encode_all(processing_class, train_dataset, "train", limit, say)
        self.eval_prompts = encode_all(processing_class, eval_dataset, "eval", limit, say) if eval_dataset is not None else []
        self.originals = originals(train_dataset, self.prompts) | originals(eval_dataset, self.eval_prompts)
        self.kl_coef = args.kl_coef
        self.moments = core.RunningMoments()
        self.episode = 0
        self.lr_scale = 1.0  # the adaptive-lr controller's factor on the configured learning rate (and its schedule)
        self.vetted: set[int] = set()  # steps whose weights passed the guards (ppo/guards.py): rollback targets
        self.update_graph_problem: str | None = "the run has not started"  # None: micro-steps as CUDA graphs
        self._resolve_step_control(args, model.policy_is_adapter)
        self._note_not_acted_on()

    # -- rollout ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, queries: torch.Tensor, qmask: torch.Tensor, role: str = "policy", temperature=None,
                greedy: bool = False) -> Rollout:
        """Sample responses and compute everything PPO needs about them, at the sampling temperature (`temperature`:
        sample at another one, for display only: logprobs stay at the training temperature; `greedy`: argmax
        decoding, ReMax's baseline, scored only)."""
        a, model, timing = self.args, self.model_wrapped, {}
        t0 = time.perf_counter()
        responses = self.generator(model, self.accelerator, queries, qmask, role, temperature, greedy)
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
            if not greedy:  # a greedy baseline is scored only
                logits, vals = model(full[s], attn[s], pos[s], mode="train", logits_to_keep=keep)
                logprobs.append(core.logprobs_from_logits(logits[:, :-1], responses[s], a.temperature))
                values.append(vals[:, Q - 1:-1] if vals is not None else None)
                del logits  # one model's logits alive at a time (pitfall 18)
                ref_logits = model(full[s], attn[s], pos[s], mode="ref", logits_to_keep=keep)
                ref_logprobs.append(core.logprobs_from_logits(ref_logits[:, :-1], responses[s], a.temperature))
                del ref_logits
            if self.reward_fn is None:
                token_scores.append(model(full[s], attn[s], pos[s], mode="reward"))
        if self.reward_fn is None:  # the score at the last real token of prompt + response (pitfall 4)
            scores = torch.cat(token_scores)[torch.arange(len(full)), Q + last]
        else:
            prompts = reward_prompts(self.reward_fn, self.tokenizer, queries, qmask, self.originals)
            texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
            scores = call_reward_fn(self.reward_fn, prompts, texts, self.accelerator.device)
        timing["timing/score"] = time.perf_counter() - t0
        if greedy:
            return Rollout(queries, responses, full, attn, pos, mask, last, has_eos, None, None, None, scores.float())
        return Rollout(queries=queries, responses=responses, full=full, attn=attn, pos=pos, mask=mask, last=last,
                       has_eos=has_eos, logprobs=torch.cat(logprobs) * mask, ref_logprobs=torch.cat(ref_logprobs) * mask,
                       values=torch.cat(values) * mask if values[0] is not None else None, scores=scores.float(),
                       timing=timing)

    def shape_scores(self, scores: torch.Tensor, has_eos: torch.Tensor, update_moments: bool = True) -> torch.Tensor:
        """Missing-EOS penalty (on the response only: trl#6802), normalisation, clipping. `update_moments`: False
        for a baseline's scores (ReMax's greedy ones), normalised by the sampled responses' statistics."""
        a = self.args
        if a.missing_eos_penalty is not None:
            scores = scores - a.missing_eos_penalty * (~has_eos).float()
        if a.normalize_scores:
            if update_moments:
                self.moments.update(self.accelerator.gather(scores.to(self.accelerator.device)).cpu())
            scores = (scores - self.moments.mean) / self.moments.std
        if a.score_clip is not None:
            scores = scores.clamp(-a.score_clip, a.score_clip)
        return scores

    # -- update ----------------------------------------------------------------------------------------------------
    def ppo_update(self, r: Rollout, advantages: torch.Tensor, returns: torch.Tensor | None) -> tuple[dict, int]:
        """num_ppo_epochs x num_mini_batches optimizer steps, each over gradient_accumulation_steps micro-batches.
        Returns (mean stats, optimizer steps taken), counted explicitly (TRL 1.12 miscounted: PPO_NOTES #12).

        With adaptive_lr, every minibatch's forward measures how far the steps so far moved the policy (approx-KL to
        the rollout's): past early_stop_kl, the last step is undone (weights and optimizer state) and the update
        ends; otherwise the measurement sets the next step's learning rate (core.adaptive_lr_scale)."""
        a, p, acc, model = self.args, self.plan, self.accelerator, self.model_wrapped
        stats, steps, undo, limit, rejected = defaultdict(list), 0, None, a.early_stop_kl, False
        model.train()
        micro_step = self._micro_steps(model, r, advantages, returns)
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
                        stat = micro_step(order[micro_start:micro_start + p.micro_batch])
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

    def _micro_steps(self, model, r: Rollout, advantages: torch.Tensor, returns):
        """The update's micro-step as a function of a micro-batch's episode indices, replayed as a CUDA graph where
        it can be (ppo/graphs.py; not during the critic's warm-up, whose dropped policy gradients it cannot follow)."""
        sources = {"full": r.full, "attn": r.attn, "pos": r.pos, "responses": r.responses, "logprobs": r.logprobs,
                   "advantages": advantages, "mask": r.mask}
        sources |= {"values": r.values, "returns": returns} if returns is not None else {}
        sources |= {"ref_logprobs": r.ref_logprobs} if self.args.kl_placement == "in_loss" else {}
        graphed = self.update_graph_problem is None and not self._warming_up()
        return graphs.micro_steps(lambda b: self._micro_step(model, b), sources, self.model, graphed)

    def _micro_step(self, model, b: dict) -> dict:
        """Forward and backward of one micro-batch `b` (the rollout's tensors at its rows: _micro_steps); the loss is
        divided by the accumulation steps (value loss: with a critic; KL: with kl_placement in_loss). Stats stay on
        the device (detached): the update syncs once, at its end."""
        a, mask, T = self.args, b["mask"], b["mask"].shape[1]
        Q = b["full"].shape[1] - T
        logits, vpred = model(b["full"], b["attn"], b["pos"], mode="train", logits_to_keep=T + 1)
        logits = logits[:, :-1]
        new_logprobs, token_entropy = core.logprobs_and_entropy(logits, b["responses"], a.temperature)
        pg_loss, pg = core.policy_loss(new_logprobs, b["logprobs"], b["advantages"], mask, **a.loss_options)
        warming_up, stats = self._warming_up(), {}  # the policy's zero gradients are dropped before the step (ppo_update)
        loss = (0.0 if warming_up else 1.0) * pg_loss
        if "returns" in b:
            vf_loss, vf_clipfrac = core.value_loss(vpred[:, Q - 1:-1], b["values"], b["returns"], mask, a.cliprange_value)
            loss = loss + a.vf_coef * vf_loss
            stats |= {"loss/value_avg": vf_loss, "val/clipfrac_avg": vf_clipfrac}
        if a.kl_placement == "in_loss":  # GRPO: k3 KL of the policy being trained to the reference, in the loss
            kl_term = core.aggregate(core.kl_penalty(new_logprobs, b["ref_logprobs"], "k3"), mask, a.loss_aggregation,
                                     a.response_length)
            loss = loss + self.kl_coef * kl_term
            stats["loss/kl_avg"] = kl_term
        if a.entropy_coef and not warming_up:  # only then is entropy in the graph (its full-vocabulary temporaries)
            entropy = core.masked_mean(core.entropy_from_logits(logits, a.temperature), mask)
            loss = loss - a.entropy_coef * entropy
        else:
            entropy = core.masked_mean(token_entropy, mask)
        if self.vocab_kl_coef and not warming_up:  # the whole distribution, not only the sampled token, kept near ref
            with torch.no_grad():
                ref_logits = model(b["full"], b["attn"], b["pos"], mode="ref", logits_to_keep=T + 1)
            term = core.vocab_kl(logits, ref_logits[:, :-1], a.temperature) if a.vocab_kl_tail is None else \
                core.tail_kl(logits, ref_logits[:, :-1], a.vocab_kl_tail, a.temperature)
            vocab_kl = core.masked_mean(term, mask)
            del ref_logits
            loss = loss + self.vocab_kl_coef * vocab_kl
            stats["policy/vocab_kl"] = vocab_kl
        kwargs = {"scale_wrt_gas": False} if self.is_deepspeed_enabled else {}  # we scale; DeepSpeed must not again
        self.accelerator.backward(loss / a.gradient_accumulation_steps, **kwargs)
        stats |= {"policy/approxkl_avg": pg["approxkl"], "policy/clipfrac_avg": pg["clipfrac"], "loss/policy_avg": pg_loss,
                  "policy/entropy_avg": entropy, "val/ratio": pg["ratio"], "val/ratio_var": pg["ratio_var"]}
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
        trl_compat.fill_derived_fields(a, p)
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
        self.update_graph_problem = "train.update_graphs is off" if not (a.update_graphs and a.cuda_graphs) else \
            graphs.update_problem(self.model, acc.device, self.is_deepspeed_enabled, acc.num_processes,
                                  acc.mixed_precision)
        if resume_from_checkpoint:
            guards.load_state(self, checkpoint.resume(self, resume_from_checkpoint).get("guards", []))
            # this run's plan: a resume with more total_episodes goes on to the new end
            self.state.max_steps, self.state.logging_steps, self.state.save_steps = p.num_updates, a.logging_steps, a.save_steps
        self.state.episode = self.episode  # TRL 1.12's OnlineTrainerState field
        guards.prepare(self, resuming=bool(resume_from_checkpoint))
        if self.is_world_process_zero():
            print("hfalign ppo plan: " + ", ".join(f"{k}={v}" for k, v in vars(p).items()), flush=True)
            if acc.device.type == "cuda":
                print("hfalign ppo update: micro-steps " + ("replayed as CUDA graphs (recorded once per update)"
                      if self.update_graph_problem is None else f"op by op ({self.update_graph_problem})"), flush=True)
            self._say_step_control()
        self.control = self.callback_handler.on_train_begin(a, self.state, self.control)
        batches = prompt_batches(len(self.prompts), p.prompts_per_update, acc.process_index, acc.num_processes, a.seed)
        for _ in range(self.state.global_step):  # a resumed run continues with the prompts it had not seen
            next(batches)
        start, start_episode, history = time.perf_counter(), self.episode, defaultdict(list)
        while self.state.global_step < p.num_updates:
            self.control = self.callback_handler.on_step_begin(a, self.state, self.control)
            try:
                metrics = self._one_update(next(batches))
            except RewardUnavailable:  # a reward server down: stop at a checkpoint of the updates done, to resume
                if self.state.global_step and not checkpoint.exists(self, self.state.global_step):
                    self._save_checkpoint(self.model, trial=None)
                raise
            for k, v in metrics.items():
                history[k].append(v)
            self.state.global_step += 1
            self.state.episode = self.episode  # TRL 1.12's OnlineTrainerState field
            self.state.epoch = self.episode / a.num_generations / max(1, len(self.prompts))  # passes over the prompts
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
        queries, qmask = queries.to(acc.device), qmask.to(acc.device)
        k = a.num_generations  # a group: k rows in a row answer one prompt
        r = self.rollout(queries.repeat_interleave(k, 0), qmask.repeat_interleave(k, 0))
        by_source = dict(getattr(self.reward_fn, "metrics", None) or {})  # reward/<name> of combined rewards
        scores = self.shape_scores(r.scores, r.has_eos)
        greedy = None
        if a.advantage_estimator == "remax":  # the baseline: the greedy response's score, one per prompt
            g = self.rollout(queries, qmask, greedy=True)
            greedy = self.shape_scores(g.scores, g.has_eos, update_moments=False).repeat_interleave(k)
        kl = core.kl_penalty(r.logprobs, r.ref_logprobs, a.kl_estimator) * r.mask
        e = estimate(a, r, scores, kl, self.kl_coef, greedy)
        t0 = time.perf_counter()
        stats, steps = self.ppo_update(r, e.advantages, e.returns)
        value_stats = {} if e.returns is None else {"val/explained_variance": core.explained_variance(r.values, e.returns, r.mask)}
        metrics = {  # 0-d tensors on the device until _means: one sync for the whole update
            "objective/kl": kl.sum(1).mean(), "objective/kl_coef": self.kl_coef,
            "objective/entropy": (-r.logprobs).sum(1).mean(),
            "objective/non_score_reward": e.non_score.sum(1).mean(),
            "objective/rlhf_reward": (scores + e.non_score.sum(1)).mean(),
            "objective/scores": r.scores.mean(),
            **stats,
            "val/num_eos_tokens": r.has_eos.float().sum(),
            "val/truncated_frac": (~r.has_eos).float().mean(),
            "val/response_length": r.mask.sum(1).float().mean(),
            "val/repetition": core.repetition(r.responses, r.mask).mean(),  # share of repeated bigrams
            **value_stats,
            "train/optimizer_steps": steps,
            **by_source,
            **r.timing,
        }
        metrics = self._means(metrics)
        metrics["timing/update"] = time.perf_counter() - t0
        metrics["val/num_eos_tokens"] *= acc.num_processes  # a count, summed over processes
        self.episode += self.plan.global_rollout_batch
        if a.adaptive_kl:
            self.kl_coef = core.adaptive_kl_coef(self.kl_coef, metrics["objective/kl"], a.target_kl, a.kl_horizon,
                                                 self.plan.global_rollout_batch)
        # callbacks with an `on_rollout` method (the sample table) see the prompts, completions and raw scores
        for cb in [cb for cb in self.callback_handler.callbacks if hasattr(cb, "on_rollout")]:
            cb.on_rollout(a, self.state, self.control, samples=samples_of(r, self.tokenizer),
                          callbacks=self.callback_handler.callbacks)  # the trackers, for tables
        return metrics
