"""The four PPO models behind one nn.Module, so the Trainer, accelerate and DeepSpeed see one model, one optimizer
and one engine (frozen parts are sharded by ZeRO-3 too).

Full mode: separate policy, reference, critic (scalar-head model) and reward model.
LoRA shared-base mode: ONE base model carrying adapters — `default` (policy, trainable), `ref` (the SFT adapter,
frozen; or adapters disabled when the policy starts from the raw base), `value` (trainable, + fp32 head) and
`reward` (frozen, + head) — so the base weights exist once. An adapter *stack* (e.g. ref + reward) reproduces a
reward adapter trained on the SFT-merged base exactly: LoRA deltas add up.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from hfalign.models import family_of

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


def backbone(model: nn.Module) -> nn.Module:
    """The transformer body of a *ForCausalLM / *ForSequenceClassification (through a PeftModel too)."""
    inner = _inner(model)
    return getattr(inner, inner.base_model_prefix)


def _inner(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head_from(model: nn.Module) -> nn.Module:
    """The scalar head of a sequence classifier, by the name its family gives it (models.FAMILIES)."""
    inner, name = _inner(model), family_of(model).head
    if not hasattr(inner, name):
        raise ValueError(f"{type(inner).__name__} has no scalar head '{name}' (the name models.FAMILIES gives its family)")
    return getattr(inner, name)


class PolicyAndValue(nn.Module):
    """forward(mode=...): 'train' -> (logits, values); 'ref' -> logits; 'reward' -> per-token scores.

    Per-token values and scores come from a head applied to every hidden state, in fp32 (pitfall 11)."""

    def __init__(self, policy, critic=None, ref=None, reward=None, value_head=None, reward_head=None, stacks=None):
        super().__init__()
        self.policy, self.critic, self.ref, self.reward = policy, critic, ref, reward
        self.value_head, self.reward_head = value_head, reward_head
        self.stacks = stacks or {}  # shared mode: adapter stack per role; "ref": None means adapters disabled
        self._trainable: set[int] = set()
        self.config = getattr(policy, "config", None)  # Trainer and accelerate read model.config

    # Gradient checkpointing applies to the trainable models (trl's unwrap_model_for_generation toggles it).
    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.policy, "is_gradient_checkpointing", False))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        for m in (self.policy, self.critic):
            if m is not None:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self):
        for m in (self.policy, self.critic):
            if m is not None:
                m.gradient_checkpointing_disable()

    @property
    def shared(self) -> bool:
        return bool(self.stacks)

    def remember_trainable(self) -> None:
        self._trainable = {id(p) for p in self.parameters() if p.requires_grad}

    @contextlib.contextmanager
    def adapters(self, role: str):
        """Activate a role's adapter stack on the shared base; restore which parameters train afterwards
        (PEFT's set_adapter marks every active adapter trainable)."""
        if not self.shared:
            yield
            return
        stack = self.stacks.get(role)
        if stack is None:
            with self.policy.disable_adapter():
                yield
            return
        self.policy.base_model.set_adapter(stack)
        for p in self.policy.parameters():
            p.requires_grad_(id(p) in self._trainable)
        try:
            yield
        finally:
            self.policy.base_model.set_adapter(self.stacks["policy"])
            for p in self.policy.parameters():
                p.requires_grad_(id(p) in self._trainable)

    def _hidden(self, model, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """[batch, seq, hidden], whatever layout the family's backbone returns."""
        out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        hidden = out.last_hidden_state
        return hidden.transpose(0, 1) if family_of(model).hidden_layout == "seq_first" else hidden

    def _logits(self, model, role, input_ids, attention_mask, position_ids) -> torch.Tensor:
        with self.adapters(role):
            return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits

    def values(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        if self.critic is not None:
            hidden = self._hidden(self.critic, input_ids, attention_mask, position_ids)
            head = self.value_head if self.value_head is not None else head_from(self.critic)
        else:
            with self.adapters("value"):
                hidden = self._hidden(self.policy, input_ids, attention_mask, position_ids)
            head = self.value_head
        return _apply_head(head, hidden)

    def reward_scores(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        if self.reward is not None:
            return _apply_head(head_from(self.reward), self._hidden(self.reward, input_ids, attention_mask, position_ids))
        with self.adapters("reward"):
            hidden = self._hidden(self.policy, input_ids, attention_mask, position_ids)
        return _apply_head(self.reward_head, hidden)

    def forward(self, input_ids, attention_mask, position_ids, mode: str = "train"):
        if mode == "train":
            logits = self._logits(self.policy, "policy", input_ids, attention_mask, position_ids)
            return logits, self.values(input_ids, attention_mask, position_ids)
        if mode == "ref":
            return self._logits(self.ref if self.ref is not None else self.policy, "ref", input_ids, attention_mask, position_ids)
        if mode == "reward":
            return self.reward_scores(input_ids, attention_mask, position_ids)
        raise ValueError(f"unknown mode {mode!r}")

    def generator(self, role: str = "policy"):
        """(model, context) to sample from: the policy, or the reference for the before/after summary."""
        if role == "ref" and self.ref is not None:
            return self.ref, contextlib.nullcontext()
        return self.policy, self.adapters(role)

    # -- saving ------------------------------------------------------------------------------------------------
    def split_state_dict(self, state_dict: dict) -> tuple[dict, dict]:
        """(policy, value) parts of a full wrapper state dict, keys relative to each part."""
        policy = {k[len("policy."):]: v for k, v in state_dict.items() if k.startswith("policy.")}
        if self.critic is not None:
            value = {k[len("critic."):]: v for k, v in state_dict.items() if k.startswith("critic.")}
        else:
            value = {k: v for k, v in policy.items() if ".value." in k or k.endswith(".value")}
        if self.value_head is not None:
            value.update({f"value_head.{k[len('value_head.'):]}": v for k, v in state_dict.items() if k.startswith("value_head.")})
        return policy, value


def train_policy_and_value_adapters(policy) -> None:
    """Shared base: the policy adapter is active, and only the policy (`default`) and `value` adapters train."""
    policy.base_model.set_adapter(["default"])
    for name, p in policy.named_parameters():
        p.requires_grad_(".default." in name or ".value." in name)


def _apply_head(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Call the head module (so ZeRO-3 gathers its weight); every head is fp32 (fp32_score_head), so are the values."""
    return head(hidden.to(head.weight.dtype)).float().squeeze(-1)


def linear_head(hidden_size: int, weight: torch.Tensor | None = None) -> nn.Linear:
    head = nn.Linear(hidden_size, 1, bias=False, dtype=torch.float32)
    with torch.no_grad():
        if weight is None:
            head.weight.zero_()  # a fresh critic predicts 0 everywhere and learns from the returns
        else:
            head.weight.copy_(weight.reshape(1, hidden_size).float())
    return head


def fp32_score_head(model: nn.Module) -> None:
    """Replace a scalar-head model's low-precision `score` head by an fp32 copy (pitfall 11: bf16 values are noisy).
    Under ZeRO-3 the weight is partitioned at load time, so it is gathered for the copy."""
    inner, name = _inner(model), family_of(model).head
    head = getattr(inner, name, None)
    if not isinstance(head, nn.Linear) or head.weight.dtype == torch.float32:
        return
    with _gathered(list(head.parameters())):
        new = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, dtype=torch.float32)
        with torch.no_grad():
            new.weight.copy_(head.weight.float())
            if head.bias is not None:
                new.bias.copy_(head.bias.float())
    new.requires_grad_(head.weight.requires_grad)
    setattr(inner, name, new)


def _gathered(params):
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled() and any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return contextlib.nullcontext()


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

