"""Critic-free advantage estimators, as pure functions over tensors (issue 19; GAE, the clipped surrogate with
clip-higher and dual clip, and the loss aggregations live in core.py). Imports only torch.

Grouped rollouts: `num_generations` = k responses per prompt, stored contiguously (rows i*k .. i*k+k-1 answer prompt
i), so a [B] score vector is a [B/k, k] table of groups. Token tensors are [B, T] with the response mask of core.py.

- RLOO (Ahmadian et al. 2024; TRL RLOOTrainer): baseline = the mean of the *other* k-1 scores of the group.
- GRPO (Shao et al. 2024): (score - group mean) / group std; Dr. GRPO (Liu et al. 2025): without the std.
- REINFORCE++ (Hu 2025; OpenRLHF `reinforce`): token rewards with the KL in them, returns summed to the end of the
  response, whitened over the batch; `reinforce_pp_baseline` subtracts the group mean from the scores first.
- ReMax (Li et al. 2023): the score of the greedy response to the same prompt is the baseline.
"""

from __future__ import annotations

import torch

from hfalign.ppo.core import masked_whiten

ESTIMATORS = ("gae", "rloo", "grpo", "dr_grpo", "reinforce_pp", "reinforce_pp_baseline", "remax")
CRITIC_FREE = ESTIMATORS[1:]


def groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[B] -> [B/k, k]; a clear error when B is not a multiple of k."""
    if k < 1 or scores.numel() % k:
        raise ValueError(f"{scores.numel()} scores do not split into groups of num_generations={k}")
    return scores.reshape(-1, k)


def rloo(scores: torch.Tensor, k: int) -> torch.Tensor:
    """score_i - mean of the other k-1 scores of its group (= k/(k-1) * (score_i - group mean)); needs k >= 2."""
    if k < 2:
        raise ValueError("rloo needs num_generations >= 2 (a leave-one-out baseline of no other sample)")
    g = groups(scores, k)
    return (g - (g.sum(1, keepdim=True) - g) / (k - 1)).reshape(-1)


def grpo(scores: torch.Tensor, k: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """(score - group mean) / (group std + eps) (unbiased std, as GRPO and TRL); scale=False: Dr. GRPO's
    score - group mean. A group whose scores all tie gets 0 advantage."""
    if k < 2:
        raise ValueError("grpo needs num_generations >= 2 (a group of one has no spread)")
    g = groups(scores, k)
    centred = g - g.mean(1, keepdim=True)
    return (centred / (g.std(1, keepdim=True) + eps) if scale else centred).reshape(-1)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s-t) r_s over each response's real tokens; zero after its end."""
    rewards = rewards * mask
    out, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return out * mask


def reinforce_pp(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++: the token rewards' (score on the last token, -beta * KL on every token) returns, whitened over
    every real token of the batch."""
    return masked_whiten(returns_to_go(rewards, mask, gamma), mask)


def remax(scores: torch.Tensor, greedy_scores: torch.Tensor) -> torch.Tensor:
    """score - the greedy response's score to the same prompt: the per-sequence reward ReMax puts on the last token."""
    return scores - greedy_scores


def adaptive_lambda(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """VAPO's length-adaptive GAE lambda per response: 1 - 1 / (alpha * length), within [0, 1] (a response of 1 /
    alpha tokens or fewer gets 0: its advantage is its one-step TD error)."""
    return (1.0 - 1.0 / (alpha * lengths.float().clamp(min=1))).clamp(0.0, 1.0)


def broadcast(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] per-response advantages -> [B, T]: the same value on every real token of the response."""
    return advantages[:, None] * mask
