"""Assemble PolicyAndValue from a recipe: full mode (four models) or LoRA shared-base mode (one base, adapters)."""

from __future__ import annotations

import dataclasses
import os

from hfalign import models
from hfalign.ppo.models import (
    PolicyAndValue,
    adapter_base,
    disable_dropout,
    fp32_score_head,
    freeze,
    is_adapter_dir,
    linear_head,
    read_adapter_head,
    train_policy_and_value_adapters,
)
from hfalign.recipe import Recipe, ValueSection


def build(recipe: Recipe, tokenizer) -> PolicyAndValue:
    wrapper = _build_shared(recipe, tokenizer) if recipe.lora.enabled else _build_full(recipe, tokenizer)
    disable_dropout(wrapper)
    wrapper.remember_trainable()
    return wrapper


def _seq_classifier(recipe: Recipe, tokenizer, path: str):
    """A scalar-head model from a full directory, or from base (+ its SFT adapter) + a LoRA reward adapter, merged."""
    m, q = recipe.model, recipe.quantization
    if not is_adapter_dir(path):
        return models.load_sequence_classifier(m, q, tokenizer, path=path)
    model = models.load_sequence_classifier(m, q, tokenizer)
    if adapter_base(path):
        model = models.apply_adapter(model, adapter_base(path), trainable=False)
    return models.apply_adapter(model, path, trainable=False)


def _build_full(recipe: Recipe, tokenizer) -> PolicyAndValue:
    m, q = recipe.model, recipe.quantization
    policy = models.load_causal_lm(m, q, tokenizer)
    ref = models.load_causal_lm(m, q, tokenizer)
    if m.adapter:  # full fine-tuning of an SFT LoRA run: merge the adapter into both, the reference is the SFT model
        policy = models.apply_adapter(policy, m.adapter, trainable=False)
        ref = models.apply_adapter(ref, m.adapter, trainable=False)
    reward = freeze(_seq_classifier(recipe, tokenizer, recipe.reward.model)) if recipe.reward.model else None
    critic_from = (recipe.value.model if recipe.value and recipe.value.model else None) or recipe.reward.model
    if critic_from:
        critic = _seq_classifier(recipe, tokenizer, critic_from)
    else:  # no reward model to start from: the policy's weights with a fresh scalar head
        critic = models.load_sequence_classifier(m, q, tokenizer)
    for p in critic.parameters():
        p.requires_grad_(True)
    for model in (critic, reward):
        if model is not None:
            fp32_score_head(model)
    return PolicyAndValue(policy, critic=critic, ref=freeze(ref), reward=reward)


def _build_shared(recipe: Recipe, tokenizer) -> PolicyAndValue:
    from peft import PeftModel, get_peft_model

    m, q = recipe.model, recipe.quantization
    lora = dataclasses.replace(recipe.lora, dropout=0.0)
    base = models.prepare_quantized(models.load_causal_lm(m, q, tokenizer))
    hidden = base.config.get_text_config().hidden_size
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
        reward_head = freeze(linear_head(hidden, read_adapter_head(recipe.reward.model)))
    elif recipe.reward.model:
        reward_model = freeze(_seq_classifier(recipe, tokenizer, recipe.reward.model))
        fp32_score_head(reward_model)

    value = recipe.value or ValueSection()
    if value.model or not value.shared_base:  # a critic of its own, outside the shared base
        critic = _seq_classifier(recipe, tokenizer, value.model or recipe.reward.model or m.name_or_path)
        for p in critic.parameters():
            p.requires_grad_(True)
        fp32_score_head(critic)
        value_head, critic_model = None, critic
    else:
        critic_model = None
        if shared_reward:  # InstructGPT: the critic starts as the reward model
            policy.load_adapter(recipe.reward.model, adapter_name="value", is_trainable=True)
            stacks["value"] = [*stacks["reward"][:-1], "value"]
            value_head = linear_head(hidden, read_adapter_head(recipe.reward.model))
        else:
            policy.add_adapter("value", models.lora_config(lora, base, "CAUSAL_LM"))
            stacks["value"] = [*below, "value"]
            value_head = linear_head(hidden)
    train_policy_and_value_adapters(policy)
    return PolicyAndValue(policy, critic=critic_model, reward=reward_model, value_head=value_head,
                          reward_head=reward_head, stacks=stacks)
