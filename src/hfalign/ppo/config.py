"""PPOConfig: TrainingArguments plus the PPO fields. Every field of TRL 1.12's PPOConfig is here under its name and
meaning (a TRL script parses this class with HfArgumentParser unchanged); where hfalign's default differs, docs/ppo-defaults.md
says why and TRL_1_12_DEFAULTS holds TRL's. The batch plan derived from it is in plan.py (no torch
import: validation uses it)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments


@dataclass
class PPOConfig(TrainingArguments):
    # Defaults that differ from TrainingArguments
    learning_rate: float = field(default=3e-6, metadata={"help": "AdamW learning rate."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N PPO updates (rollout batches)."})
    save_steps: float = field(default=20, metadata={"help": "Checkpoint every N PPO updates."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Integrations to report to."})  # noqa: RUF036 (None first, as TrainingArguments: HfArgumentParser needs it)

    # Rollout
    total_episodes: int | None = field(default=None, metadata={"help": "Episodes (prompts) to train on; default num_train_epochs * dataset size."})
    response_length: int = field(default=53, metadata={"help": "Maximum new tokens per response."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature; logprobs use the same one."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (1.0 = off)."})
    stop_tokens: list[str] | None = field(default=None, metadata={"help": "Tokens that end a response besides EOS, by name (e.g. ['<|eot_id|>']). null: the family's end-of-turn tokens the tokenizer has (models.FAMILIES)."})
    stop_token_ids: list[int] | None = field(default=None, metadata={"help": "The same by id; joins stop_tokens."})
    max_prompt_length: int | None = field(default=1024, metadata={"help": "Longer prompts lose their beginning (tokens cut on the left; counted in the log). null: no limit."})
    local_rollout_forward_batch_size: int = field(default=64, metadata={"help": "Per-process batch of no-grad forward passes in the rollout."})
    ds3_gather_for_generation: bool = field(default=True, metadata={"help": "ZeRO-3: gather weights for generation (faster) instead of generating sharded."})
    generation: Literal["auto", "hf", "static"] = field(default="auto", metadata={"help": "How responses are sampled. hf: transformers' generate (a dynamic KV cache, Python per token). static: hfalign's static-cache decoder (a preallocated KV cache, the decode step replayed as a CUDA graph on GPU, the same draws as generate: docs/ppo.md, Sampling speed). auto: static on CUDA with cuda_graphs where transformers gives the model a static cache (LLaMA, Qwen2, GLM-4, ...; not quantized weights), else hf."})
    cuda_graphs: bool = field(default=True, metadata={"help": "With the static decoder on CUDA, replay each decode step as a CUDA graph (captured per call, so adapters, ZeRO-3 gathering and weight updates are safe). false: the same loop, launched op by op; also turns update_graphs off."})
    update_graphs: bool = field(default=True, metadata={"help": "With cuda_graphs, replay the PPO update's micro-step (policy and critic forward, loss, backward) as a CUDA graph, recorded once per update: on one CUDA process without DeepSpeed, activation checkpointing or quantized weights, for models transformers can trace (LLaMA, Qwen2, GLM-4, ...; not remote-code ChatGLM), and under bf16/fp16 autocast only with the weights stored in that dtype (not fp32 LoRA adapters, yet); elsewhere the update runs op by op, as with false. docs/ppo.md, Update speed."})

    # Score
    missing_eos_penalty: float | None = field(default=1.0, metadata={"help": "Subtracted from the score of a truncated response (no EOS or stop token within response_length): a cut-off answer is not a finished one (pitfall 8). null: no penalty."})
    score_clip: float | None = field(default=None, metadata={"help": "Clip scores to [-score_clip, score_clip]."})
    normalize_scores: bool = field(default=True, metadata={"help": "Normalise scores by their running mean and std, so the KL coefficient means the same whatever the reward model's scale (OpenAI lm-human-preferences normalises its reward model; 'Secrets of RLHF' PPO-max). TRL 1.12: false."})

    # KL
    kl_coef: float = field(default=0.2, metadata={"help": "Initial KL coefficient beta in r_t = -beta * KL_t. TRL 1.12's 0.05 let reward hacking through on the robustness tasks (docs/robustness.md); lm-human-preferences starts at 0.15."})
    kl_estimator: Literal["k1", "k3"] = field(default="k1", metadata={"help": "Per-token KL estimator."})
    adaptive_kl: bool = field(default=True, metadata={"help": "Adapt beta towards target_kl (Ziegler et al. 2019): a long run's KL settles near the target instead of drifting. TRL 1.12: false."})
    target_kl: float = field(default=3.0, metadata={"help": "Adaptive KL target (per-response KL, nats). Ziegler et al. used 6; every robustness run that held stayed at KL 1-3 and the runs that collapsed went past 7."})
    kl_horizon: int = field(default=10000, metadata={"help": "Adaptive KL horizon (episodes; Ziegler et al.): beta moves at most 0.2 x rollout batch / horizon per update."})

    # Advantages and updates
    advantage_estimator: Literal["gae", "rloo", "grpo", "dr_grpo", "reinforce_pp", "reinforce_pp_baseline", "remax"] = field(default="gae", metadata={"help": "How a response's advantage is estimated (docs/estimators.md). gae: a learned critic (PPO). Critic-free, no value model built or trained: rloo (leave-one-out mean of the other num_generations responses to the prompt), grpo (group mean and std), dr_grpo (group mean only; pair with loss_aggregation: seq_mean_token_sum_norm), reinforce_pp (token returns with the KL in them, whitened over the batch), reinforce_pp_baseline (group mean subtracted first), remax (the greedy response's score as baseline)."})
    num_generations: int = field(default=1, metadata={"help": "Responses sampled per prompt in one rollout (a group). The batch sizes count responses: a rollout batch of 32 with 4 holds 8 prompts x 4, and total_episodes counts responses. rloo, grpo, dr_grpo and reinforce_pp_baseline need >= 2."})
    kl_placement: Literal["in_reward", "in_loss"] = field(default="in_reward", metadata={"help": "Where the KL to the reference acts: in_reward (-kl_coef x per-token KL in the reward; InstructGPT, TRL 1.12) or in_loss (kl_coef x the k3 KL of the policy being trained added to the loss, aggregated like the policy loss; GRPO)."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda (actor and critic, unless lam_actor / lam_critic set them apart)."})
    lam_critic: float | None = field(default=None, metadata={"help": "GAE lambda of the critic's returns (VAPO's decoupled GAE: 1.0, unbiased value targets); null: lam."})
    lam_actor: float | None = field(default=None, metadata={"help": "GAE lambda of the policy's advantages; null: lam."})
    lam_actor_alpha: float | None = field(default=None, metadata={"help": "Length-adaptive actor lambda (VAPO): each response's lambda = 1 - 1 / (alpha x its length), so long responses keep their reward signal; VAPO uses 0.05. Overrides lam_actor; null: off."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten per-token rewards before GAE."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Whiten advantages over each batch."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    num_mini_batches: int = field(default=1, metadata={"help": "Minibatches per rollout batch; one optimizer step each."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip."})
    cliprange_low: float | None = field(default=None, metadata={"help": "The ratio's lower clip, 1 - cliprange_low; null: cliprange."})
    cliprange_high: float | None = field(default=None, metadata={"help": "The ratio's upper clip, 1 + cliprange_high; null: cliprange. Above cliprange_low: DAPO's clip-higher (0.28 with 0.2), room for unlikely tokens to gain."})
    dual_clip: float | None = field(default=None, metadata={"help": "c > 1: a token with a negative advantage loses at most c x |A| (dual-clip PPO, Ye et al. 2020): a ratio far above 1 on a bad token cannot blow the loss up. null: off."})
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"] = field(default="token_mean", metadata={"help": "How per-token policy losses become one number: token_mean (every token of the micro-batch alike; TRL 1.12), seq_mean_token_mean (every response alike), seq_mean_token_sum, seq_mean_token_sum_norm (token sum / response_length, a constant: Dr. GRPO, no length bias)."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip around the rollout values."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss coefficient."})
    entropy_coef: float = field(default=0.0, metadata={"help": "Entropy bonus coefficient."})
    early_stop_kl: float | None = field(default=0.02, metadata={"help": "Stop a batch's PPO epochs once their mean approx-KL exceeds this (seen as fewer train/optimizer_steps): a safety net against one bad batch moving the policy far (Spinning Up stops at 1.5 x 0.01). Healthy updates stay near 1e-3. null: never. TRL 1.12: never."})
    adaptive_lr: bool | None = field(default=None, metadata={"help": "A trust region on the measured approx-KL: every minibatch's forward measures how far the update's steps so far moved the policy from the one that sampled the rollout. Past early_stop_kl, the last optimizer step is undone (weights and optimizer state; not under DeepSpeed, whose engine owns them), the update ends and the learning rate is halved; otherwise the rate follows rl_games' adaptive schedule (/ 1.5 above 2 x adaptive_lr_target, x 1.5 below half of it, within 1%..100% of the configured rate, checkpointed). null: on when the policy trains a LoRA adapter (a single LoRA step can move near-certain tokens by several nats: its learning rate was a knife edge), off for full fine-tuning. TRL 1.12: no."})
    adaptive_lr_target: float = field(default=0.01, metadata={"help": "The approx-KL per optimizer step adaptive_lr steers to (healthy updates here measure 1e-3..1e-2)."})
    vocab_kl_coef: float | None = field(default=None, metadata={"help": "Adds this x a KL to the reference computed over the whole vocabulary, at every response position of the rollout, to the loss (one more reference forward per micro-batch; logged as policy/vocab_kl). The per-token KL in the reward sees only the sampled token, so mass creeping onto tokens the reference never samples (garbage tails: a LoRA adapter moves the hidden state under a frozen output layer) is penalised only once sampled; this term sees it at once. null: 10 when the policy trains a LoRA adapter (with vocab_kl_tail 0.001; the LoRA suite, docs/robustness.md: 4/9 without it), 0 (off) for full fine-tuning. TRL 1.12: no."})
    vocab_kl_tail: float | None = field(default=0.001, metadata={"help": "Which KL vocab_kl_coef weighs: a probability tau -> the KL of the two-part split {tokens the reference gives < tau, the rest}: mass the policy moves onto the reference's tail costs, reshaping among the tokens the reference finds plausible is free (it holds the form without holding back learning); null -> the exact KL over every token (holds the form, and learning with it)."})
    value_warmup_updates: int = field(default=0, metadata={"help": "Critic warm-up: for the first N updates only the value loss trains (the policy stays as it is)."})

    # Evaluation
    num_eval_prompts: int = field(default=64, metadata={"help": "Completions in the before/after summary: the held-out prompts in order, each again (a new draw) while more are asked for than there are."})
    num_sample_generations: int = field(default=0, metadata={"help": "TRL 1.12: call generate_completions(sampling=True) this many times during training (every num_total_batches // N updates; needs an eval set). hfalign's sample table (samples.jsonl) records rollouts anyway, so 0 by default; TRL 1.12: 10."})

    # TRL 1.12's remaining fields, same names and meaning
    stop_token: Literal["eos"] | None = field(default=None, metadata={"help": "TRL 1.12: 'eos' ends responses at the tokenizer's EOS. hfalign always does (plus stop_tokens / the family's end-of-turn tokens), so 'eos' and null behave alike here; TRL 1.12 with null scored the whole response_length (docs/migrating.md)."})
    stop_token_id: int | None = field(default=None, metadata={"help": "TRL 1.12: a token id that ends responses; joins stop_token_ids."})
    sft_model_path: str = field(default="EleutherAI/pythia-160m", metadata={"help": "TRL 1.12's example scripts: the policy to load. Read by your script; the trainer takes models, as TRL's did."})
    reward_model_path: str = field(default="EleutherAI/pythia-160m", metadata={"help": "TRL 1.12's example scripts: the reward model to load. Read by your script, as in TRL."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "TRL 1.12's example scripts: processes for dataset.map. hfalign's trainer encodes prompts itself and does not use it."})
    model_adapter_name: str | None = field(default=None, metadata={"help": "TRL 1.12: the policy's adapter in a PEFT model with several. Not acted on: hfalign names the policy adapter 'default' (a note says so when set)."})
    ref_adapter_name: str | None = field(default=None, metadata={"help": "TRL 1.12: the adapter that makes the reference. Not acted on: with peft_config the reference is the base with the adapter off (a note says so when set)."})
    # world_size: TrainingArguments' own property (the process count), what TRL 1.12's trainer wrote into its field
    num_total_batches: int | None = field(default=None, metadata={"help": "Filled in by the trainer: PPO updates (rollout batches) in the run."})
    micro_batch_size: int | None = field(default=None, metadata={"help": "Filled in by the trainer: per_device_train_batch_size x world_size."})
    local_batch_size: int | None = field(default=None, metadata={"help": "Filled in by the trainer: prompts per update per process (hfalign: mini-batch x num_mini_batches; TRL 1.12: per_device_train_batch_size x gradient_accumulation_steps)."})
    batch_size: int | None = field(default=None, metadata={"help": "Filled in by the trainer: prompts per update, all processes."})
    local_mini_batch_size: int | None = field(default=None, metadata={"help": "Filled in by the trainer: prompts per optimizer step per process."})
    mini_batch_size: int | None = field(default=None, metadata={"help": "Filled in by the trainer: prompts per optimizer step, all processes."})


    def __post_init__(self):
        # Launched on CPU with several processes (accelerate launch, DeepSpeed): without gloo, accelerate and DeepSpeed
        # see world_size 1 and DeepSpeed's batch assert fires. The recipe path sets it in trainargs.build; a TRL-style
        # script constructs PPOConfig itself, so the default is decided here too.
        import torch

        if self.ddp_backend is None and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            self.ddp_backend = "gloo"
        if self.vocab_kl_tail is not None and not 0 < self.vocab_kl_tail < 1:
            raise ValueError(f"vocab_kl_tail is a probability in (0, 1), got {self.vocab_kl_tail}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (a multiple of |advantage|), got {self.dual_clip}; null turns it off")
        if self.cliprange_low is not None and not 0 <= self.cliprange_low < 1:
            raise ValueError(f"cliprange_low must be in [0, 1), got {self.cliprange_low}")
        if self.cliprange_high is not None and self.cliprange_high < 0:
            raise ValueError(f"cliprange_high must be >= 0, got {self.cliprange_high}")
        from hfalign.ppo.plan import estimator_problem

        if estimator_problem(self):
            raise ValueError(estimator_problem(self))
        super().__post_init__()

    @property
    def loss_options(self) -> dict:
        """The policy loss's settings, as core.policy_loss takes them."""
        return {"cliprange": self.cliprange if self.cliprange_low is None else self.cliprange_low,
                "cliprange_high": self.cliprange if self.cliprange_high is None else self.cliprange_high,
                "dual_clip": self.dual_clip, "how": self.loss_aggregation, "norm_length": self.response_length}

# TRL 1.12's PPOConfig defaults where hfalign's differ (docs/ppo-defaults.md says why): PPOConfig(**TRL_1_12_DEFAULTS,
# ...) runs TRL 1.12's PPO settings on hfalign's trainer (benchmarks/trl_parity.py does).
TRL_1_12_DEFAULTS = {"kl_coef": 0.05, "adaptive_kl": False, "normalize_scores": False, "early_stop_kl": None,
                     "missing_eos_penalty": None, "max_prompt_length": None, "logging_steps": 10, "save_steps": 500,
                     "num_sample_generations": 10, "adaptive_lr": False,
                     "vocab_kl_coef": 0.0}

# Fields TRL's example scripts or models read, which hfalign's trainer does not act on: a one-time note when set.
NOT_ACTED_ON = {"model_adapter_name": "the policy adapter is 'default'",
                "ref_adapter_name": "with peft_config the reference is the base with the adapter off",
                "dataset_num_proc": "prompts are encoded by the trainer (your script's dataset.map may use it)",
                "sft_model_path": "read by your script (the trainer takes the models you pass, as TRL's did)",
                "reward_model_path": "read by your script (the trainer takes the models you pass, as TRL's did)"}
