"""recipe -> the stage's trainer config (trl.SFTConfig, trl.RewardConfig, hfalign PPOConfig).

`check()` types and range-checks the recipe's `train:` mapping against the config class's fields (preflight runs it;
the fields come from hfalign.trainfields, so no trainer library is imported), then, unless told not to, lets the class
judge the whole (its __post_init__ rules: that import costs ~4 s, which `hfalign validate` skips);
`settings()` is the recipe's train values over the class defaults, for checks that need numbers only;
`build()` makes the config object: the user's values plus what hfalign decides (output_dir, backend, reporting).
"""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

from hfalign import trainfields
from hfalign.errors import UserError
from hfalign.recipe import Recipe
from hfalign.schema import check_keys, check_value

CLASS_NAMES = {"sft": "SFTConfig", "rm": "RewardConfig", "ppo": "PPOConfig"}  # as messages name them

# Keys hfalign owns elsewhere in the recipe; setting them under train: would be ambiguous.
OWNED_KEYS = {
    "output_dir": "set the top-level 'output_dir' instead",
    "model_init_kwargs": "use the 'model' section (dtype, attn_implementation, revision)",
    "trust_remote_code": "set 'model.trust_remote_code'",
    "chat_template_path": "set 'model.chat_template'",
    "pad_token": "set 'model.pad_token'",
    "resume_from_checkpoint": "set the top-level 'resume' (true resumes from the run directory's last checkpoint)",
    "overwrite_output_dir": "set the top-level 'overwrite'",
}

# Keys that older recipes (transformers 4, older TRL) carry: say what replaced them instead of "unknown key".
RENAMED = {
    "evaluation_strategy": "renamed to 'eval_strategy' in transformers 5",
    "logging_dir": "removed in transformers 5: TensorBoard writes under output_dir/runs, or set TENSORBOARD_LOGGING_DIR",
    "max_seq_length": "renamed to 'max_length' in TRL",
    "torch_dtype": "set 'model.dtype'",
    "tokenizer": "set 'model.tokenizer'",
}

POSITIVE = ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
            "gradient_accumulation_steps", "max_length", "logging_steps", "save_steps", "eval_steps",
            "num_ppo_epochs", "num_mini_batches", "response_length", "temperature", "local_rollout_forward_batch_size",
            "max_prompt_length")
NON_NEGATIVE = ("weight_decay", "warmup_steps", "max_grad_norm", "kl_coef", "cliprange", "cliprange_value", "vf_coef",
                "entropy_coef", "save_total_limit", "warmup_ratio", "vocab_kl_coef")


def check(recipe: Recipe, config_class, judge: bool = True) -> None:
    """Check `train:` against the fields of the recipe stage's config class (`config_class`: the stage module's
    function that imports it): known keys, types, ranges; then (`judge`) let the class itself judge. Replaces
    recipe.train by the typed values (YAML 1.1's '1e-5' string becomes a float)."""
    stage = recipe.stage
    fields = trainfields.spec(stage, config_class)
    types_ = {name: tp for name, (tp, _) in fields.items()}
    allowed, name = list(fields), CLASS_NAMES[stage]
    train = recipe.train
    for key in train:
        if key in OWNED_KEYS:
            raise UserError(f"'train.{key}' is set by hfalign.", fix=OWNED_KEYS[key])
        if key in RENAMED and key not in allowed:
            raise UserError(f"'train.{key}' is not a {name} field.", fix=RENAMED[key])
    check_keys(train, allowed, "train")
    checked = {key: check_value(value, types_[key], f"train.{key}") for key, value in train.items()}
    for key in POSITIVE:
        if key in checked and checked[key] is not None and checked[key] <= 0:
            raise UserError(f"'train.{key}' must be > 0, got {checked[key]}.", fix=f"set train.{key} to a positive number")
    for key in NON_NEGATIVE:
        if key in checked and checked[key] is not None and checked[key] < 0:
            raise UserError(f"'train.{key}' must be >= 0, got {checked[key]}.", fix=f"set train.{key} to 0 or more")
    recipe.train = checked
    precision(recipe)  # the launch's mixed precision against the recipe's
    if not judge:
        return
    try:
        build(recipe, config_class(), probe=True)
    except (ValueError, TypeError) as e:
        raise UserError(f"train: {name} rejects these settings: {e}", fix="adjust the train: section") from None


def settings(recipe: Recipe, config_class) -> SimpleNamespace:
    """The recipe's (checked) train values over the config class's defaults, as attributes: numbers for checks that
    need no config object (PPO's batch plan)."""
    return SimpleNamespace(**{**{k: d for k, (_, d) in trainfields.spec(recipe.stage, config_class).items()}, **recipe.train})


def precision(recipe: Recipe) -> str:
    """'no' | 'bf16' | 'fp16', the same rule for every stage: the recipe's train.bf16 / train.fp16 when it sets one,
    else the launch's (accelerate config or `accelerate launch --mixed_precision`), else 'no' (compute in the weights'
    dtype, model.dtype). Under DeepSpeed the two must agree (DeepSpeed's config is built from the launch's)."""
    train = recipe.train
    asked = "bf16" if train.get("bf16") else "fp16" if train.get("fp16") else \
        "no" if train.get("bf16") is False or train.get("fp16") is False else None
    launch = os.environ.get("ACCELERATE_MIXED_PRECISION")  # accelerate launch sets it, from its config or flag
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" or train.get("deepspeed")
    if asked and launch and asked != launch and deepspeed:
        raise UserError(f"the launch asks for mixed precision {launch!r} (accelerate config or --mixed_precision), the "
                        f"recipe's train.bf16/train.fp16 for {asked!r}, and DeepSpeed needs one answer.",
                        fix=f"remove train.bf16/train.fp16 (the launch decides), or launch with --mixed_precision {asked}")
    return asked or launch or "no"


def build(recipe: Recipe, cls: type, probe: bool = False):
    """The stage's config object. `probe`: for checks only (no distributed state is touched)."""
    import torch

    kwargs = dict(recipe.train)
    kwargs["output_dir"] = recipe.output_dir
    mixed = precision(recipe)
    kwargs["bf16"], kwargs["fp16"] = mixed == "bf16", mixed == "fp16"
    if not torch.cuda.is_available():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not probe:
            # Launched on CPU: without gloo, accelerate/DeepSpeed see world_size 1 and DeepSpeed's batch assert fires.
            kwargs.setdefault("ddp_backend", "gloo")
        if mixed == "bf16":
            kwargs.setdefault("use_cpu", True)  # transformers takes bf16 autocast on a CPU only when told it is one
    kwargs.setdefault("report_to", "none")
    kwargs.setdefault("disable_tqdm", True)  # the metrics callback prints one concise line per log instead
    if recipe.model.trust_remote_code and "trust_remote_code" in {f.name for f in dataclasses.fields(cls)}:
        kwargs["trust_remote_code"] = True
    if probe:
        kwargs.pop("deepspeed", None)  # the DeepSpeed plugin would initialise distributed state; checked at train time
    return cls(**kwargs)
