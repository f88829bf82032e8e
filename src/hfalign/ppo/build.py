"""The one assembler of PolicyAndValue, for both ways in:

    build(recipe, tokenizer, critic)  the recipe stage: full mode (four models) or LoRA shared-base mode (one base)
    from_trl_args(policy, ref_model, reward_model, value_model, peft_config, critic)   TRL 1.12's PPOTrainer arguments

`critic=False` (a critic-free advantage estimator): no critic model, value adapter or value head is built.

Both end in `assemble()`: the wrapper with dropout off everywhere (pitfall 2) and its trainable set remembered.
The part helpers (frozen models, fp32 scalar heads, adapter directories) are at the end of this module.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import torch
from torch import nn

from hfalign import models
from hfalign.ppo.policy_value import FP32Head, PolicyAndValue, gathered, unwrapped
from hfalign.recipe import Recipe, ValueSection


def assemble(policy, **parts) -> PolicyAndValue:
    """PolicyAndValue(policy, **parts), dropout off in all of it, its trainable parameters remembered."""
    wrapper = PolicyAndValue(policy, **parts)
    disable_dropout(wrapper)
    wrapper.remember_trainable()
    return wrapper


def build(recipe: Recipe, tokenizer, critic: bool = True) -> PolicyAndValue:
    if scores_text(recipe, tokenizer):  # the reward model is a scorer of text beside this module (hfalign.rewards)
        recipe = dataclasses.replace(recipe, reward=dataclasses.replace(recipe.reward, model=None))
    if not recipe.lora.enabled:
        return _build_full(recipe, tokenizer, critic)
    models.adapters_beside_token_rows()  # an SFT adapter may train token rows (hfalign.tokens)
    return _build_shared(recipe, tokenizer, critic)


def scores_text(recipe: Recipe, tokenizer) -> bool:
    """Does reward.model score decoded text through its own tokenizer (another tokenizer than the policy's, or
    reward.tokenizer set), rather than the policy's token ids inside the PPO model?"""
    r = recipe.reward
    return bool(r.model) and (r.tokenizer is not None or not same_tokenizer(r.model, tokenizer))


def same_tokenizer(reward_dir: str, tokenizer) -> bool:
    """The reward model reads the policy's token ids as they are only when it was trained with the same tokenizer
    (vocabulary and EOS) and its embedding covers it. A directory without tokenizer files (a LoRA adapter saved
    without them, a bare model) is taken to share the policy's."""
    import json

    from transformers import AutoTokenizer

    cfg = os.path.join(reward_dir, "config.json")
    if os.path.isfile(cfg):
        with open(cfg, encoding="utf-8") as f:
            vocab = json.load(f).get("vocab_size")
        if vocab and vocab < len(tokenizer):
            return False
    if not os.path.isfile(os.path.join(reward_dir, "tokenizer_config.json")):
        return True
    theirs = AutoTokenizer.from_pretrained(reward_dir)
    return theirs.get_vocab() == tokenizer.get_vocab() and theirs.eos_token_id == tokenizer.eos_token_id


def _trainable_critic(model):
    for p in model.parameters():
        p.requires_grad_(True)
    fp32_score_head(model)
    return model


def _seq_classifier(recipe: Recipe, tokenizer, path: str):
    """A scalar-head model from a full directory, or from base (+ its SFT adapter) + a LoRA reward adapter, merged."""
    m, q = recipe.model, recipe.quantization
    if not is_adapter_dir(path):
        return models.load_sequence_classifier(m, q, tokenizer, path=path)
    model = models.load_sequence_classifier(m, q, tokenizer)
    if adapter_base(path):
        model = models.apply_adapter(model, adapter_base(path), trainable=False)
    return models.apply_adapter(model, path, trainable=False)


def _build_full(recipe: Recipe, tokenizer, with_critic: bool = True) -> PolicyAndValue:
    m, q = recipe.model, recipe.quantization
    policy = models.load_causal_lm(m, q, tokenizer)
    ref = models.load_causal_lm(m, q, tokenizer)
    if m.adapter:  # full fine-tuning of an SFT LoRA run: merge the adapter into both, the reference is the SFT model
        policy = models.apply_adapter(policy, m.adapter, trainable=False)
        ref = models.apply_adapter(ref, m.adapter, trainable=False)
    reward = freeze(_seq_classifier(recipe, tokenizer, recipe.reward.model)) if recipe.reward.model else None
    if reward is not None:
        fp32_score_head(reward)
    if not with_critic:
        return assemble(policy, ref=freeze(ref), reward=reward)
    critic_from = (recipe.value.model if recipe.value and recipe.value.model else None) or recipe.reward.model
    if critic_from:
        critic = _seq_classifier(recipe, tokenizer, critic_from)
    else:  # no reward model to start from: the policy's weights with a fresh scalar head
        critic = models.load_sequence_classifier(m, q, tokenizer)
    return assemble(policy, critic=_trainable_critic(critic), ref=freeze(ref), reward=reward)


def _build_shared(recipe: Recipe, tokenizer, with_critic: bool = True) -> PolicyAndValue:
    from peft import PeftModel, get_peft_model

    m, q = recipe.model, recipe.quantization
    lora = dataclasses.replace(recipe.lora, dropout=0.0)
    base = models.prepare_quantized(models.load_causal_lm(m, q, tokenizer))
    hidden, head = base.config.get_text_config().hidden_size, models.family_of(base).head
    if m.adapter:
        policy = PeftModel.from_pretrained(base, m.adapter, adapter_name="default", is_trainable=True)
        policy.load_adapter(m.adapter, adapter_name="ref", is_trainable=False)
        ref_stack = ["ref"]
    else:
        policy = get_peft_model(base, models.lora_config(lora, base, "CAUSAL_LM"))
        ref_stack = None  # the raw base: adapters disabled
    stacks = {"policy": ["default"], "ref": ref_stack}
    below = list(ref_stack or [])  # what the value (and a same-base reward) adapter sits on

    reward_model = reward_head = None
    shared_reward = is_adapter_dir(recipe.reward.model) if recipe.reward.model else False
    if shared_reward:
        rm_base = adapter_base(recipe.reward.model)
        rm_below = []
        if rm_base and m.adapter and os.path.realpath(rm_base) == os.path.realpath(m.adapter):
            rm_below = ["ref"]
        elif rm_base:
            policy.load_adapter(rm_base, adapter_name="rm_base", is_trainable=False)
            rm_below = ["rm_base"]
        policy.load_adapter(recipe.reward.model, adapter_name="reward", is_trainable=False)
        stacks["reward"] = [*rm_below, "reward"]
        reward_head = freeze(linear_head(hidden, read_adapter_head(recipe.reward.model, head)))
    elif recipe.reward.model:
        reward_model = freeze(_seq_classifier(recipe, tokenizer, recipe.reward.model))
        fp32_score_head(reward_model)

    value = recipe.value or ValueSection()
    if not with_critic:
        value_head = critic_model = None
    elif value.model or not value.shared_base:  # a critic of its own, outside the shared base
        critic = _seq_classifier(recipe, tokenizer, value.model or recipe.reward.model or m.name_or_path)
        value_head, critic_model = None, _trainable_critic(critic)
    else:
        critic_model = None
        if shared_reward:  # InstructGPT: the critic starts as the reward model
            policy.load_adapter(recipe.reward.model, adapter_name="value", is_trainable=True)
            stacks["value"] = [*stacks["reward"][:-1], "value"]
            value_head = linear_head(hidden, read_adapter_head(recipe.reward.model, head))
        else:
            policy.add_adapter("value", models.lora_config(lora, base, "CAUSAL_LM"))
            stacks["value"] = [*below, "value"]
            value_head = linear_head(hidden)
    train_policy_and_value_adapters(policy)
    return assemble(policy, critic=critic_model, reward=reward_model, value_head=value_head, reward_head=reward_head,
                    stacks=stacks)


def from_trl_args(policy, ref_model, reward_model, value_model, peft_config, critic: bool = True) -> PolicyAndValue:
    """TRL-style arguments -> PolicyAndValue. With peft_config the reference is the base with the adapter off, and
    without a value_model the critic is a second adapter plus a fresh fp32 head on the same base. The heads of the
    given value and reward models become fp32 (pitfall 11), as on the recipe path. `critic=False`: no critic (a
    value_model passed anyway is not used, and said so)."""
    if not critic and value_model is not None:
        import warnings

        warnings.warn("value_model is not used: the advantage estimator needs no critic", stacklevel=3)
        value_model = None
    reward = freeze(reward_model) if reward_model is not None else None
    for model in (value_model, reward):
        if model is not None:
            fp32_score_head(model)
    if peft_config is not None:
        from peft import get_peft_model

        policy = get_peft_model(policy, peft_config)
        stacks, value_head = {"policy": ["default"], "ref": None}, None
        if value_model is None and critic:
            policy.add_adapter("value", copy.deepcopy(peft_config))
            stacks["value"] = ["value"]
            value_head = linear_head(policy.config.get_text_config().hidden_size)
            train_policy_and_value_adapters(policy)
        return assemble(policy, critic=value_model, reward=reward, value_head=value_head, stacks=stacks)
    if value_model is None and critic:
        raise ValueError("full fine-tuning needs value_model (e.g. the reward model's architecture with num_labels=1)")
    ref = freeze(ref_model if ref_model is not None else copy.deepcopy(policy))
    return assemble(policy, critic=value_model, ref=ref, reward=reward)


# -- the parts: loaded, frozen, given fp32 heads ------------------------------------------------------------------
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (pitfall 2): nn.Dropout modules and attention-dropout floats."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def train_policy_and_value_adapters(policy) -> None:
    """Shared base: the policy adapter is active, and only the policy (`default`) and `value` adapters train."""
    policy.base_model.set_adapter(["default"])
    for name, p in policy.named_parameters():
        p.requires_grad_(".default." in name or ".value." in name)


def linear_head(hidden_size: int, weight: torch.Tensor | None = None) -> FP32Head:
    head = FP32Head(hidden_size, 1, bias=False, dtype=torch.float32)
    with torch.no_grad():
        if weight is None:
            head.weight.zero_()  # a fresh critic predicts 0 everywhere and learns from the returns
        else:
            head.weight.copy_(weight.reshape(1, hidden_size).float())
    return head


def fp32_score_head(model: nn.Module) -> None:
    """Replace a scalar-head model's head (the family's `score`/`classifier_head`) by an fp32 FP32Head copy.
    Under ZeRO-3 the weight is partitioned at load time, so it is gathered for the copy."""
    inner, name = unwrapped(model), models.family_of(model).head
    head = getattr(inner, name, None)
    if not isinstance(head, nn.Linear) or isinstance(head, FP32Head):
        return
    with gathered(list(head.parameters())):
        new = FP32Head(head.in_features, head.out_features, bias=head.bias is not None, dtype=torch.float32)
        with torch.no_grad():
            new.weight.copy_(head.weight.float())
            if head.bias is not None:
                new.bias.copy_(head.bias.float())
    new.requires_grad_(head.weight.requires_grad)
    setattr(inner, name, new)


def read_adapter_head(path: str, head: str) -> torch.Tensor | None:
    """The scalar head saved with a sequence-classification LoRA adapter (modules_to_save: the family's head)."""
    from safetensors.torch import load_file

    weights = load_file(os.path.join(path, "adapter_model.safetensors"))
    for key, value in weights.items():
        if key.endswith(f"{head}.weight"):
            return value
    return None


def adapter_base(path: str) -> str | None:
    """The SFT adapter a reward adapter was trained on top of, read from its run's resolved recipe."""
    resolved = os.path.join(path, "recipe.resolved.yaml")
    if not os.path.isfile(resolved):
        return None
    import yaml

    with open(resolved, encoding="utf-8") as f:
        return (yaml.safe_load(f).get("model") or {}).get("adapter")
