"""The seam through which PPO samples, on the generating role's model only (gathered under ZeRO-3): Hugging Face
`generate` (HFGenerator, train.generation: hf) or hfalign's static-cache decoder with CUDA graphs (StaticGenerator,
ppo/decode.py; the default on CUDA). A faster backend (vLLM, SGLang) plugs in here by answering the same call:
left-padded prompts in, right-padded responses out.

On-policy sampling (pitfall 16): transformers fills every sampling field left unset from the checkpoint's
generation_config.json and then from library defaults (top_k=50), while PPO's logprobs describe the plain softmax at
the temperature. So generation runs with a config hfalign owns entirely (the checkpoint's is swapped out for the
call, and top_k=0 is explicit); a checkpoint whose generation_config asks for other sampling is told, once, that it is
ignored. top_k / top_p from the recipe are honoured, and said to be off-policy: sampling draws from the truncated
distribution while the logprobs stay those of the full softmax (docs/ppo.md: On-policy sampling).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import GenerationConfig

from hfalign.ppo.policy_value import unwrapped

# Sampling fields of a checkpoint's generation_config that would change what is sampled, with their neutral values.
NEUTRAL = {"top_k": 50, "top_p": 1.0, "temperature": 1.0, "typical_p": 1.0, "min_p": None, "repetition_penalty": 1.0,
           "no_repeat_ngram_size": 0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "bad_words_ids": None,
           "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None, "min_length": 0,
           "min_new_tokens": None, "forced_eos_token_id": None, "exponential_decay_length_penalty": None}


def ignored_sampling_fields(model) -> dict:
    """What the checkpoint's generation_config sets that PPO's sampling will not use."""
    gen = getattr(unwrapped(model), "generation_config", None)
    if gen is None:
        return {}
    return {k: getattr(gen, k, None) for k, neutral in NEUTRAL.items()
            if getattr(gen, k, None) not in (None, neutral) and k not in ("temperature",)}


def stop_token_ids(args, tokenizer, model) -> list[int]:
    """EOS first, then the recipe's stop tokens (names and ids), or else the family's end-of-turn tokens that this
    tokenizer has (LLaMA-3 chat ends a turn with <|eot_id|>, GLM-4 with <|user|>: models.FAMILIES)."""
    from hfalign.errors import UserError
    from hfalign.models import family_of

    vocab = tokenizer.get_vocab()
    names = args.stop_tokens
    if names is None and args.stop_token_ids is None:
        names = [t for t in family_of(model).stop_tokens if t in vocab]
    for name in names or []:
        if name not in vocab:
            raise UserError(f"train.stop_tokens names {name!r}, which is not a token of this tokenizer.",
                            fix="use the exact token text (e.g. '<|eot_id|>'), or train.stop_token_ids")
    ids = [tokenizer.eos_token_id, *(vocab[n] for n in names or []), *(args.stop_token_ids or [])]
    return list(dict.fromkeys(i for i in ids if i is not None))


class HFGenerator:
    """Sample responses with `model.generate`, in chunks of `local_rollout_forward_batch_size` prompts."""

    def __init__(self, args, tokenizer, stop_ids: list[int]):
        self.args, self.tokenizer, self.stop_ids = args, tokenizer, stop_ids
        self._told = False

    def generation_config(self, temperature: float | None = None, greedy: bool = False) -> GenerationConfig:
        a, ids = self.args, {"eos_token_id": self.stop_ids, "pad_token_id": self.tokenizer.pad_token_id,
                             "bos_token_id": self.tokenizer.bos_token_id}
        if greedy:  # argmax decoding (ReMax's baseline)
            return GenerationConfig(max_new_tokens=a.response_length, do_sample=False, **ids)
        return GenerationConfig(max_new_tokens=a.response_length, do_sample=True, temperature=temperature or a.temperature,
                                top_k=a.top_k, top_p=a.top_p, **ids)

    @torch.no_grad()
    def __call__(self, model_wrapped, accelerator, queries: torch.Tensor, qmask: torch.Tensor, role: str,
                 temperature: float | None = None, greedy: bool = False) -> torch.Tensor:
        """Responses [B, T] for left-padded `queries`, from `role` ('policy' or 'ref') of the wrapped PolicyAndValue;
        T is the longest response, shorter ones padded with the pad token. `temperature`: other than the training one
        (generate_completions' near-greedy display); `greedy`: argmax decoding."""
        config, chunk = self.generation_config(temperature, greedy), self.args.local_rollout_forward_batch_size
        outs = []
        with _generating(model_wrapped, accelerator, role, self.args.ds3_gather_for_generation) as (model, synced):
            self._tell_once(model)
            with _owned_generation_config(model, config):
                for i in range(0, len(queries), chunk):
                    outs.append(self.sample(model, queries[i:i + chunk], qmask[i:i + chunk], config, synced))
        width = max(o.shape[1] for o in outs)
        pad = self.tokenizer.pad_token_id
        return torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1]), value=pad) for o in outs])

    def sample(self, model, ids: torch.Tensor, mask: torch.Tensor, config: GenerationConfig, synced: bool) -> torch.Tensor:
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=synced)[:, ids.shape[1]:]

    def _tell_once(self, model) -> None:
        if self._told or self.args.process_index != 0:
            self._told = True
            return
        a, ignored = self.args, ignored_sampling_fields(model)
        truncated = [f"{k}={v}" for k, v in (("top_k", a.top_k), ("top_p", a.top_p)) if v not in (0, None, 1.0)]
        if ignored:
            print(f"hfalign: the checkpoint's generation_config sets {ignored}; PPO ignores it and samples from the "
                  "softmax at train.temperature" + (" (truncated, see below)" if truncated else ", so logprobs "
                                                    "describe what was sampled"), flush=True)
        if truncated:
            print(f"hfalign: train.{' and train.'.join(truncated)} truncates sampling, while logprobs and KL are "
                  "those of the full softmax: the update is off-policy, and tokens outside the cut are never sampled, "
                  "so never pushed down. Leave them unset to sample on-policy (docs/ppo.md: On-policy sampling)", flush=True)
        self._told = True


class StaticGenerator(HFGenerator):
    """The same call through hfalign's static-cache decoder (ppo/decode.py; train.generation: static): a
    preallocated KV cache, the decode step replayed as a CUDA graph on GPU, the same draws as `generate`. Sharded
    ZeRO-3 generation (ds3_gather_for_generation: false, every rank stepping in lockstep) stays with `generate`."""

    def sample(self, model, ids, mask, config, synced):
        if synced:
            return super().sample(model, ids, mask, config, synced)
        from hfalign.ppo.decode import static_decode

        return static_decode(model, ids, mask, max_new=config.max_new_tokens, stop_ids=self.stop_ids,
                             pad_id=self.tokenizer.pad_token_id, temperature=config.temperature or 1.0,
                             top_k=config.top_k or 0, top_p=1.0 if config.top_p is None else config.top_p,
                             greedy=not config.do_sample, cuda_graphs=self.args.cuda_graphs)


def make_generator(args, tokenizer, stop_ids: list[int], model, device: torch.device) -> HFGenerator:
    """The sampler train.generation asks for: hf, static, or auto -- static on CUDA where the model allows it and
    its decode step can be a CUDA graph (op by op the static loop is no faster than generate: 27.9 vs 17.0 ms per
    token step for the 0.7B benchmark on an H200; quantized weights are never captured)."""
    from hfalign.errors import UserError
    from hfalign.ppo.decode import unsupported
    from hfalign.ppo.graphs import graphs_allowed

    why = unsupported(model)
    if args.generation == "static" and why:
        raise UserError(f"train.generation: static cannot run this model: {why}.", fix="set train.generation: hf (or auto)")
    graphs = device.type == "cuda" and args.cuda_graphs and graphs_allowed(model)
    static = args.generation == "static" or (args.generation == "auto" and graphs and why is None)
    return (StaticGenerator if static else HFGenerator)(args, tokenizer, stop_ids)


@contextlib.contextmanager
def _owned_generation_config(model, config: GenerationConfig):
    """Swap the checkpoint's generation_config out for the call, so none of its fields fill ours."""
    inner = unwrapped(model)
    saved = inner.generation_config
    inner.generation_config = config
    try:
        yield
    finally:
        inner.generation_config = saved


@contextlib.contextmanager
def _generating(model_wrapped, accelerator, role: str, gather: bool):
    """(the generating model, synced_gpus). Under ZeRO-3 only that model's parameters are gathered (pitfall 10; not
    the reference, critic or reward model beside it), and DeepSpeed's fetch hooks are lifted while it generates."""
    wrapper = accelerator.unwrap_model(model_wrapped)
    model, role_context = wrapper.generator(role)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    zero3 = plugin is not None and plugin.zero_stage == 3
    if not zero3:
        with role_context:
            yield model, False
        return
    if not gather:  # sharded generation: every rank keeps stepping until all are done
        with role_context:
            yield model, accelerator.num_processes > 1
        return
    import deepspeed
    from trl.models.utils import add_hooks, remove_hooks

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        remove_hooks(model_wrapped)
        try:
            with role_context:
                yield model, False
        finally:
            add_hooks(model_wrapped)
