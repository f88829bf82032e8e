"""Write a PolicyAndValue state dict as standard HF artefacts.

    output_dir/                 policy: full model (AutoModelForCausalLM) or LoRA adapter (PeftModel) + tokenizer
    output_dir/value/           critic: full scalar-head model, or the value adapter + value_head.safetensors
                                (absent when a critic-free estimator trained without one)
    checkpoint-N/trainable.safetensors  every trainable tensor, for non-DeepSpeed resume (DeepSpeed's own checkpoint
                                        holds them under DeepSpeed)

The state dict holds only what is written (gathered under ZeRO-3; the frozen reference and reward model never are);
the files must be non-empty and loadable (LoRA under ZeRO-3 wrote empty adapters elsewhere: peft#2500, trl#4416).
"""

from __future__ import annotations

import os

from safetensors.torch import save_file

from hfalign.ppo.policy_value import PolicyAndValue, gathered

TRAINABLE = "trainable.safetensors"  # a checkpoint's trainable weights (non-DeepSpeed)


def _contiguous(sd: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def state_to_save(model: PolicyAndValue, trainable_only: bool, should_save: bool) -> dict:
    """What a save writes, on CPU: every trainable tensor (a checkpoint), or the result's parts (critic and value
    head; the policy, or only its adapters on a shared base). Gathered under ZeRO-3 on every rank (a collective);
    kept only where `should_save`."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def wanted(name: str) -> bool:
        if trainable_only:
            return name in trainable
        if name.startswith(("critic.", "value_head.")):
            return True
        adapter = "lora_" in name or "trainable_tokens_delta" in name  # (an SFT adapter's token rows: hfalign.tokens)
        return name.startswith("policy.") and (not model.shared or adapter)  # shared: adapters only

    with gathered([p for n, p in model.named_parameters() if wanted(n)]):
        if not should_save:
            return {}
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if wanted(k)}


def save_parts(wrapper: PolicyAndValue, state_dict: dict, output_dir: str, tokenizer) -> None:
    """The run's result: policy (full model or adapter) + tokenizer at output_dir, the critic at output_dir/value."""
    os.makedirs(output_dir, exist_ok=True)
    policy_sd, value_sd = wrapper.split_state_dict(state_dict)
    value_dir = os.path.join(output_dir, "value")
    if wrapper.has_critic:  # a critic-free estimator's run has none to write
        os.makedirs(value_dir, exist_ok=True)
    if wrapper.shared:
        from peft.utils import get_peft_model_state_dict

        wrapper.policy.save_pretrained(output_dir, state_dict=_contiguous(policy_sd), selected_adapters=["default"])
        wrapper.policy.get_base_model().generation_config.save_pretrained(output_dir)
        if wrapper.critic is None and wrapper.has_critic:
            adapter = get_peft_model_state_dict(wrapper.policy, state_dict=policy_sd, adapter_name="value")
            save_file(_contiguous(adapter), os.path.join(value_dir, "adapter_model.safetensors"))
            wrapper.policy.peft_config["value"].save_pretrained(value_dir)
            head = {k[len("value_head."):]: v for k, v in value_sd.items() if k.startswith("value_head.")}
            save_file(_contiguous(head), os.path.join(value_dir, "value_head.safetensors"))
    else:
        wrapper.policy.save_pretrained(output_dir, state_dict=_contiguous(policy_sd))
    if wrapper.critic is not None:
        critic_sd = {k: v for k, v in value_sd.items() if not k.startswith("value_head.")}
        wrapper.critic.save_pretrained(value_dir, state_dict=_contiguous(critic_sd))
    tokenizer.save_pretrained(output_dir)


def save_trainable(state_dict: dict, output_dir: str) -> None:
    """A checkpoint's weights (non-DeepSpeed): every trainable tensor, policy and value, written once."""
    os.makedirs(output_dir, exist_ok=True)
    save_file(_contiguous(state_dict), os.path.join(output_dir, TRAINABLE))
