"""What one PPO update samples and computes, as a typed record, and the prompts that feed it: encoded, batched, padded."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Rollout:
    """One batch of B prompts (Q tokens, left-padded) with T response tokens each; every [B, T] tensor is 0 after a
    response's end (mask), and logprobs/values are taken at the sampling temperature."""

    queries: torch.Tensor  # [B, Q] prompt ids, left-padded
    responses: torch.Tensor  # [B, T] sampled ids; pad after the end
    full: torch.Tensor  # [B, Q+T] queries + responses, what every forward pass reads
    attn: torch.Tensor  # [B, Q+T] attention mask: prompt padding and post-end tokens are 0
    pos: torch.Tensor  # [B, Q+T] position ids counted over real tokens (pitfall 3)
    mask: torch.Tensor  # [B, T] 1 on real response tokens (through EOS, or to the end when truncated)
    last: torch.Tensor  # [B] index of the last real response token: where the score lands (pitfall 4)
    has_eos: torch.Tensor  # [B] bool: the response ended with EOS (else truncated)
    logprobs: torch.Tensor | None  # [B, T] log pi_old(token) of the sampling policy (None: a greedy baseline)
    ref_logprobs: torch.Tensor | None  # [B, T] log pi_ref(token)
    values: torch.Tensor | None  # [B, T] critic values, fp32 (None: no critic)
    scores: torch.Tensor  # [B] raw reward scores, fp32 (before penalties, normalisation, clipping)
    timing: dict[str, float] = field(default_factory=dict)  # seconds per phase: timing/generate, timing/score

    @property
    def prompt_width(self) -> int:
        return self.queries.shape[1]


def prompt_batches(n: int, batch: int, rank: int, world: int, seed: int):
    """Endless per-process index batches: a fresh seeded permutation per pass, cut to a multiple of the process count
    and sharded by rank (as DistributedSampler with drop_last), so every rank has as many prompts, all ranks walk the
    same pass in step, and no update holds a prompt twice; full batches only."""
    epoch = 0
    while True:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        mine = perm[:n - n % world][rank::world]
        for start in range(0, len(mine) - batch + 1, batch):
            yield mine[start:start + batch]
        epoch += 1
        if len(mine) < batch:
            raise ValueError(f"{n} prompts cannot fill one batch of {batch} per process on {world} processes")


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def encode_all(tokenizer, dataset, name: str, limit: int | None, say: bool) -> list[list[int]]:
    """Token ids of every prompt: TRL-style `input_ids` as they are (where `attention_mask` is 0, dropped), else
    `prompt` encoded (a conversation with the chat template, ending with the assistant's turn opener). Longer than
    `limit` (max_prompt_length) -> cut on the left (the end of a prompt, where the generation prompt is, is what the
    policy continues), and said once (`say`: on the main process)."""
    columns = getattr(dataset, "column_names", None) or list(dataset[0])
    if "input_ids" in columns:
        ids = [list(x) for x in dataset["input_ids"]]
        if "attention_mask" in columns:
            ids = [[t for t, m in zip(x, mask) if m] for x, mask in zip(ids, dataset["attention_mask"])]
    elif "prompt" in columns:
        ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
               if isinstance(p, list) else tokenizer(p)["input_ids"] for p in dataset["prompt"]]
    else:
        raise ValueError(f"the {name} dataset needs an 'input_ids' column (token ids, TRL style) or a 'prompt' column "
                         f"(text or conversation); it has {columns}")
    cut = sum(len(x) > limit for x in ids) if limit else 0
    if cut and say:
        print(f"hfalign: {cut} of {len(ids)} {name} prompts are longer than max_prompt_length {limit} tokens; "
              "their beginning is cut off", flush=True)
    return [x[-limit:] for x in ids] if limit else ids


def call_reward_fn(fn, prompts: list[str], texts: list[str], device) -> torch.Tensor:
    """A reward function's scores as a float32 tensor on `device` (where every rollout tensor lives), or a clear
    error when it does not return one number per completion."""
    from hfalign.errors import UserError

    name = getattr(fn, "__qualname__", repr(fn))
    out = fn(prompts, texts)
    try:
        scores = torch.tensor([float(x) for x in out], dtype=torch.float32, device=device)
    except (TypeError, ValueError):
        raise UserError(f"reward function {name} must return a list of numbers, got {type(out).__name__}.",
                        fix="return one float per completion") from None
    if len(scores) != len(texts):
        raise UserError(f"reward function {name} returned {len(scores)} scores for {len(texts)} completions.",
                        fix="return one float per completion, in order")
    return scores


def samples_of(r: Rollout, tokenizer) -> dict:
    """A rollout as the sample table reads it: prompts, completions, raw scores (read at the response's last token:
    the stop token where it has one) and the token each ended with (None: cut at the length)."""
    ends = r.responses.gather(1, r.last[:, None])[:, 0].tolist()
    return {"prompt": tokenizer.batch_decode(r.queries, skip_special_tokens=True),
            "completion": tokenizer.batch_decode(r.responses, skip_special_tokens=True),
            "score": r.scores.tolist(),
            "ended_with": [tokenizer.convert_ids_to_tokens(t) if eos else None for t, eos in zip(ends, r.has_eos.tolist())]}


def originals(dataset, encoded: list[list[int]]) -> dict[tuple, object]:
    """Encoded prompt ids -> the prompt as the dataset held it (text, or a conversation's messages), for scorers that
    render prompts themselves (hfalign.rewards: a reward model with its own chat template); {} for token-id datasets."""
    if dataset is None:
        return {}
    columns = getattr(dataset, "column_names", None) or list(dataset[0])
    if "input_ids" in columns or "prompt" not in columns:
        return {}
    return {tuple(ids): prompt for ids, prompt in zip(encoded, dataset["prompt"])}


def reward_prompts(fn, tokenizer, queries: torch.Tensor, qmask: torch.Tensor, known: dict) -> list:
    """The prompts a reward function is given: decoded text, or -- for a scorer with `takes_messages` -- each prompt
    as the dataset held it where known (a conversation stays a list of messages)."""
    texts = tokenizer.batch_decode(queries, skip_special_tokens=True)
    if not getattr(fn, "takes_messages", False) or not known:
        return texts
    rows = [q[m.bool()].tolist() for q, m in zip(queries.cpu(), qmask.cpu())]
    return [known.get(tuple(ids), text) for ids, text in zip(rows, texts)]
