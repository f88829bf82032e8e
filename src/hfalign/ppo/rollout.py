"""What one PPO update samples and computes, as a typed record, and the prompt batching that feeds it."""

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
    logprobs: torch.Tensor  # [B, T] log pi_old(token) of the sampling policy
    ref_logprobs: torch.Tensor  # [B, T] log pi_ref(token)
    values: torch.Tensor  # [B, T] critic values, fp32
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
