"""One rollout's advantages, by `train.advantage_estimator` (the math: core.py for GAE, advantages.py for the rest).

    shaped scores [B] + per-token KL [B, T] -> Estimate(advantages [B, T], returns [B, T] or None, non_score [B, T])

gae keeps the order of operations it always had (a test holds its metrics to numbers recorded before estimators
existed). The critic-free estimators read the B = prompts x num_generations responses as groups of k rows.

With `kl_placement: in_reward` the KL is in the reward every estimator sees: per token for gae, reinforce_pp and
remax, summed over the response for rloo, grpo and dr_grpo (their reward is one number per response, as in TRL's
RLOOTrainer). With `in_loss` the reward is the score alone and the micro-step adds kl_coef x k3 KL to the loss.

Whitening over the batch: gae, rloo and remax follow `whiten_advantages`; reinforce_pp(_baseline) always whiten
(that is the estimator); grpo and dr_grpo never (a group's own normalisation is the estimator: Dr. GRPO's point is
that no std rescales it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hfalign.ppo import advantages as adv
from hfalign.ppo import core
from hfalign.ppo.rollout import Rollout


@dataclass
class Estimate:
    advantages: torch.Tensor  # [B, T], 0 after each response's end
    returns: torch.Tensor | None  # [B, T] the critic's targets (gae only)
    non_score: torch.Tensor  # [B, T] the KL part of the reward, -kl_coef x KL (0 with kl_placement in_loss)


def estimate(a, r: Rollout, scores: torch.Tensor, kl: torch.Tensor, kl_coef: float,
             greedy_scores: torch.Tensor | None = None) -> Estimate:
    """`a`: the PPOConfig; `scores`: shaped (penalties, normalisation, clip); `kl`: per-token KL, masked;
    `greedy_scores`: remax's baseline, shaped the same way."""
    est, k, mask = a.advantage_estimator, a.num_generations, r.mask
    beta = kl_coef if a.kl_placement == "in_reward" else 0.0
    if est == "gae":
        return _gae(a, r, scores, kl, beta)
    if est == "reinforce_pp_baseline":
        scores = scores - adv.groups(scores, k).mean(1, keepdim=True).expand(-1, k).reshape(-1)
    rewards, non_score = core.token_rewards(scores, kl, beta, r.last, mask)
    if est in ("reinforce_pp", "reinforce_pp_baseline"):
        return Estimate(adv.reinforce_pp(rewards, mask, a.gamma), None, non_score)
    if est == "remax":
        advantages = (adv.returns_to_go(rewards, mask, a.gamma) - greedy_scores[:, None]) * mask
    else:
        sequence = scores + non_score.sum(1)
        per_response = {"rloo": lambda: adv.rloo(sequence, k), "grpo": lambda: adv.grpo(sequence, k),
                        "dr_grpo": lambda: adv.grpo(sequence, k, scale=False)}[est]()
        advantages = adv.broadcast(per_response, mask)
        if est != "rloo":
            return Estimate(advantages, None, non_score)
    if a.whiten_advantages:
        advantages = core.masked_whiten(advantages, mask)
    return Estimate(advantages, None, non_score)


def _gae(a, r: Rollout, scores: torch.Tensor, kl: torch.Tensor, beta: float) -> Estimate:
    rewards, non_score = core.token_rewards(scores, kl, beta, r.last, r.mask)
    if a.whiten_rewards:
        rewards = core.masked_whiten(rewards, r.mask, shift_mean=False)
    lam_actor = a.lam if a.lam_actor is None else a.lam_actor
    if a.lam_actor_alpha is not None:
        lam_actor = adv.adaptive_lambda(r.mask.sum(1), a.lam_actor_alpha)
    lam_critic = a.lam if a.lam_critic is None else a.lam_critic
    advantages, returns = core.gae(rewards, r.values, r.mask, a.gamma, lam_critic)
    if not (isinstance(lam_actor, float) and lam_actor == lam_critic):  # VAPO: the actor's own lambda
        advantages, _ = core.gae(rewards, r.values, r.mask, a.gamma, lam_actor)
    if a.whiten_advantages:
        advantages = core.masked_whiten(advantages, r.mask)
    return Estimate(advantages, returns, non_score)
