"""The four PPO models behind one nn.Module, so the Trainer, accelerate and DeepSpeed see one model, one optimizer
and one engine (frozen parts are sharded by ZeRO-3 too).

Full mode: separate policy, reference, critic (scalar-head model) and reward model.
LoRA shared-base mode: ONE base model carrying adapters — `default` (policy, trainable), `ref` (the SFT adapter,
frozen; or adapters disabled when the policy starts from the raw base), `value` (trainable, + fp32 head) and
`reward` (frozen, + head) — so the base weights exist once. An adapter *stack* (e.g. ref + reward) reproduces a
reward adapter trained on the SFT-merged base exactly: LoRA deltas add up.

This is the runtime module (forward per role, adapters, heads, checkpointing); ppo/build.py loads and prepares the
parts and assembles them.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from hfalign.models import family_of


def backbone(model: nn.Module) -> nn.Module:
    """The transformer body of a *ForCausalLM / *ForSequenceClassification (through a PeftModel too)."""
    inner = unwrapped(model)
    return getattr(inner, inner.base_model_prefix)


def unwrapped(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head_from(model: nn.Module) -> nn.Module:
    """The scalar head of a sequence classifier, by the name its family gives it (models.FAMILIES)."""
    inner, name = unwrapped(model), family_of(model).head
    if not hasattr(inner, name):
        raise ValueError(f"{type(inner).__name__} has no scalar head '{name}' (the name models.FAMILIES gives its family)")
    return getattr(inner, name)


class PolicyAndValue(nn.Module):
    """forward(mode=...): 'train' -> (logits, values; None without a critic); 'ref' -> logits; 'reward' -> per-token
    scores. Without a critic (a critic-free advantage estimator) there is no critic model, value adapter or head.

    Per-token values and scores come from a head applied to every hidden state, in fp32 (pitfall 11). Logits are
    returned for the last `logits_to_keep` positions only when asked (pitfall 18: prompt positions are never used)."""

    def __init__(self, policy, critic=None, ref=None, reward=None, value_head=None, reward_head=None, stacks=None):
        super().__init__()
        self.policy, self.critic, self.ref, self.reward = policy, critic, ref, reward
        self.value_head, self.reward_head = value_head, reward_head
        self.stacks = stacks or {}  # shared mode: adapter stack per role; "ref": None means adapters disabled
        self._trainable: set[int] = set()
        self._role = "policy"  # the role whose adapter stack is active now
        self._checkpointing = False  # activation checkpointing of the trainable models
        self.config = getattr(policy, "config", None)  # Trainer and accelerate read model.config

    @property
    def policy_is_adapter(self) -> bool:
        """Does the policy train a PEFT adapter (LoRA, QLoRA) rather than its full weights?"""
        return hasattr(self.policy, "peft_config")

    @property
    def has_critic(self) -> bool:
        return self.critic is not None or "value" in self.stacks

    @property
    def value_model(self):
        """TRL 1.12's name for the critic (`trainer.model.value_model`): the critic model; None on a shared base, where
        the critic is the policy's 'value' adapter plus `value_head`."""
        return self.critic

    # -- activation checkpointing of the trainable models (Trainer enables it from args.activation_checkpointing) --
    @property
    def is_activation_checkpointing(self) -> bool:
        return self._checkpointing

    is_gradient_checkpointing = is_activation_checkpointing

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        self._checkpointing = True
        for m in (self.policy, self.critic):
            if m is not None:
                m.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)
        self.wrap_checkpointed_layers()

    def wrap_checkpointed_layers(self) -> None:
        """Make every checkpointed layer of the shared base role-aware (pitfall 17) -- also layers that arrived
        checkpointed (PEFT's prepare_model_for_kbit_training turns checkpointing on by default), which
        activation_checkpointing_enable never saw."""
        for module in self.policy.modules():
            fn = getattr(module, "_gradient_checkpointing_func", None)
            if fn is not None and getattr(module, "gradient_checkpointing", False):
                self._checkpointing = True
                if self.shared and not getattr(fn, "role_aware", False):
                    module._gradient_checkpointing_func = self._role_aware(fn)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):  # the pre-5 name
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self):
        self._checkpointing = False
        for m in (self.policy, self.critic):
            if m is not None:
                m.activation_checkpointing_disable()

    gradient_checkpointing_disable = activation_checkpointing_disable

    def _role_aware(self, checkpoint_fn):
        """Shared base, pitfall 17: a checkpointed layer is recomputed during backward with whatever adapter is active
        *then* (the policy's), not the one its forward ran under (e.g. the value stack). Recompute under the same."""

        def checkpointed(function, *args, **kwargs):
            role = self._role

            def replay(*a, **k):
                if self._role == role:  # the forward itself, or a replay under the right stack already
                    return function(*a, **k)
                with self.adapters(role):
                    return function(*a, **k)

            return checkpoint_fn(replay, *args, **kwargs)

        checkpointed.role_aware = True
        return checkpointed

    # -- adapter stacks (shared base) ------------------------------------------------------------------------------
    @property
    def shared(self) -> bool:
        return bool(self.stacks)

    def remember_trainable(self) -> None:
        self._trainable = {id(p) for p in self.parameters() if p.requires_grad}

    def _activate(self, role: str) -> None:
        """Make `role`'s adapter stack the active one; keep which parameters train (PEFT's set_adapter would mark
        every active adapter trainable)."""
        self.policy.base_model.set_adapter(self.stacks[role])
        for p in self.policy.parameters():
            p.requires_grad_(id(p) in self._trainable)
        self._role = role

    @contextlib.contextmanager
    def adapters(self, role: str):
        """Activate a role's adapter stack on the shared base for the block, then restore the one active before."""
        if not self.shared or role == self._role:
            yield
            return
        previous = self._role
        if self.stacks.get(role) is None:  # the raw base
            self._role = role
            try:
                with self.policy.disable_adapter():
                    yield
            finally:
                self._role = previous
                # re-enabling the layers runs PEFT's set_adapter, which marks every inactive adapter frozen (the
                # value adapter): a backward after a reference pass would leave the critic's adapter untrained
                for p in self.policy.parameters():
                    p.requires_grad_(id(p) in self._trainable)
            return
        self._activate(role)
        try:
            yield
        finally:
            self._activate(previous)

    # -- the passes --------------------------------------------------------------------------------------------------
    def _hidden(self, model, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """[batch, seq, hidden], whatever layout the family's backbone returns."""
        out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        hidden = out.last_hidden_state
        return hidden.transpose(0, 1) if family_of(model).hidden_layout == "seq_first" else hidden

    def _logits(self, model, role, input_ids, attention_mask, position_ids, logits_to_keep: int | None) -> torch.Tensor:
        kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        with self.adapters(role):
            return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                         **kwargs).logits

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

    def forward(self, input_ids, attention_mask, position_ids, mode: str = "train", logits_to_keep: int | None = None):
        if mode == "train":
            logits = self._logits(self.policy, "policy", input_ids, attention_mask, position_ids, logits_to_keep)
            return logits, self.values(input_ids, attention_mask, position_ids) if self.has_critic else None
        if mode == "ref":
            model = self.ref if self.ref is not None else self.policy
            return self._logits(model, "ref", input_ids, attention_mask, position_ids, logits_to_keep)
        if mode == "reward":
            return self.reward_scores(input_ids, attention_mask, position_ids)
        raise ValueError(f"unknown mode {mode!r}")

    def store_heads_as(self, dtype: torch.dtype) -> None:
        """DeepSpeed with bf16/fp16 keeps every trainable parameter in that dtype (ZeRO-3 refuses mixed dtypes) and
        fp32 master copies in its optimizer: the heads follow; FP32Head still computes in fp32."""
        for module in self.modules():
            if isinstance(module, FP32Head):
                module.to(dtype)

    def generator(self, role: str = "policy"):
        """(model, context) to sample from: the policy, or the reference for the before/after summary."""
        if role == "ref" and self.ref is not None:
            return self.ref, contextlib.nullcontext()
        return self.policy, self.adapters(role)

    def policy_parameters(self) -> list[nn.Parameter]:
        """The policy's trainable parameters: its own model's, or on a shared base the policy adapter's (every
        trainable base parameter that is not the value adapter's)."""
        if not self.shared:
            return [p for p in self.policy.parameters() if p.requires_grad]
        return [p for n, p in self.policy.named_parameters()
                if p.requires_grad and ".value." not in n and not n.endswith(".value")]

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


class FP32Head(nn.Linear):
    """A scalar head computed in fp32 whatever surrounds it (pitfall 11): bf16 autocast is off inside it, and under
    DeepSpeed bf16 (which stores every parameter in bf16 and keeps fp32 master copies in the optimizer) the weight
    is upcast for the product. Called as a module, so ZeRO-3 gathers its weight."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return nn.functional.linear(hidden.float(), self.weight.float(), bias)


def _apply_head(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Per-token scalars in fp32: FP32Head computes in fp32; any other head runs in its own dtype, then upcast."""
    if not isinstance(head, FP32Head):
        hidden = hidden.to(head.weight.dtype)
    return head(hidden).float().squeeze(-1)


def gathered(params):
    """ZeRO-3: the full tensors of `params` inside the block (a collective: every rank enters it)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled() and any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return contextlib.nullcontext()
