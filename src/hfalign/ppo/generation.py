"""The seam through which PPO samples. Today: Hugging Face `generate` on the policy (gathered under ZeRO-3); a
faster backend (vLLM, SGLang) plugs in here by answering the same call: prompts in, right-padded responses out.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig


class HFGenerator:
    """Sample responses with `model.generate`, in chunks of `local_rollout_forward_batch_size` prompts."""

    def __init__(self, args, tokenizer):
        self.args, self.tokenizer = args, tokenizer

    def generation_config(self) -> GenerationConfig:
        a = self.args
        return GenerationConfig(max_new_tokens=a.response_length, do_sample=True, temperature=a.temperature,
                                top_k=a.top_k or None, top_p=a.top_p, eos_token_id=self.tokenizer.eos_token_id,
                                pad_token_id=self.tokenizer.pad_token_id)

    @torch.no_grad()
    def __call__(self, model_wrapped, accelerator, queries: torch.Tensor, qmask: torch.Tensor, role: str) -> torch.Tensor:
        """Responses [B, T] for left-padded `queries`, from `role` ('policy' or 'ref') of the wrapped PolicyAndValue;
        T is the longest response, shorter ones padded with the pad token."""
        from trl.models.utils import unwrap_model_for_generation

        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        zero3 = plugin is not None and plugin.zero_stage == 3
        gather = self.args.ds3_gather_for_generation
        chunk = self.args.local_rollout_forward_batch_size
        outs = []
        with unwrap_model_for_generation(model_wrapped, accelerator, gather_deepspeed3_params=gather) as unwrapped:
            gen_model, ctx = unwrapped.generator(role)
            with ctx:
                for i in range(0, len(queries), chunk):
                    seq = gen_model.generate(input_ids=queries[i:i + chunk], attention_mask=qmask[i:i + chunk],
                                             generation_config=self.generation_config(),
                                             synced_gpus=zero3 and not gather and accelerator.num_processes > 1)
                    outs.append(seq[:, queries.shape[1]:])
        width = max(o.shape[1] for o in outs)
        pad = self.tokenizer.pad_token_id
        return torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1]), value=pad) for o in outs])
