"""The critic-free estimators of ppo/advantages.py and the policy loss's knobs in ppo/core.py (loss aggregation,
clip-higher, dual clip) against numbers worked out by hand."""

import math

import pytest
import torch

from hfalign.ppo import advantages as adv
from hfalign.ppo import core

T = torch.tensor


def test_rloo_is_the_score_minus_the_mean_of_the_others():
    assert adv.rloo(T([1.0, 2.0, 3.0, 6.0]), k=2).tolist() == [-1.0, 1.0, -3.0, 3.0]
    # [0, 3, 6]: baselines (3+6)/2, (0+6)/2, (0+3)/2
    assert adv.rloo(T([0.0, 3.0, 6.0]), k=3).tolist() == [-4.5, 0.0, 4.5]
    with pytest.raises(ValueError, match="num_generations >= 2"):
        adv.rloo(T([1.0, 2.0]), k=1)
    with pytest.raises(ValueError, match="do not split into groups of num_generations=3"):
        adv.rloo(T([1.0, 2.0, 3.0, 4.0]), k=3)


def test_grpo_normalises_by_the_group_and_dr_grpo_only_centres():
    # group [0, 3, 6]: mean 3, unbiased std sqrt((9 + 0 + 9) / 2) = 3; group [2, 2, 2] ties: 0
    scores = T([0.0, 3.0, 6.0, 2.0, 2.0, 2.0])
    torch.testing.assert_close(adv.grpo(scores, k=3), T([-3 / (3 + 1e-6), 0.0, 3 / (3 + 1e-6), 0.0, 0.0, 0.0]))
    assert adv.grpo(scores, k=3, scale=False).tolist() == [-3.0, 0.0, 3.0, 0.0, 0.0, 0.0]


def test_returns_to_go_stop_at_the_response_end():
    rewards, mask = T([[1.0, 2.0, 3.0], [4.0, 5.0, 7.0]]), T([[1, 1, 1], [1, 1, 0]])
    assert adv.returns_to_go(rewards, mask).tolist() == [[6.0, 5.0, 3.0], [9.0, 5.0, 0.0]]  # the 7 is past the end
    assert adv.returns_to_go(rewards, mask, gamma=0.5)[0].tolist() == [2.75, 3.5, 3.0]  # 1 + .5 * (2 + .5 * 3)


def test_reinforce_pp_whitens_the_returns_over_the_batch():
    rewards, mask = T([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]]), T([[1, 1, 1], [1, 1, 0]])
    # returns 6 5 3 / 9 5: mean 5.6, unbiased var (0.16 + 0.36 + 6.76 + 11.56 + 0.36) / 4 = 4.8
    std = math.sqrt(4.8 + 1e-8)
    want = T([[0.4 / std, -0.6 / std, -2.6 / std], [3.4 / std, -0.6 / std, 0.0]])
    torch.testing.assert_close(adv.reinforce_pp(rewards, mask), want)


def test_remax_baseline_is_the_greedy_score():
    assert adv.remax(T([1.0, -2.0]), T([0.5, -3.0])).tolist() == [0.5, 1.0]


def test_loss_aggregations_by_hand():
    loss, mask = T([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]]), T([[1, 1, 1], [1, 0, 0]])
    assert core.aggregate(loss, mask, "token_mean").item() == 2.5  # (1+2+3+4) / 4 tokens
    assert core.aggregate(loss, mask, "seq_mean_token_mean").item() == 3.0  # (2 + 4) / 2
    assert core.aggregate(loss, mask, "seq_mean_token_sum").item() == 5.0  # (6 + 4) / 2
    assert core.aggregate(loss, mask, "seq_mean_token_sum_norm", norm_length=4).item() == 1.25  # 10 / (2 x 4)
    with pytest.raises(ValueError, match="unknown loss_aggregation 'mean'"):
        core.aggregate(loss, mask, "mean")


def test_clip_higher_and_dual_clip():
    log_ratio, a = torch.log(T([1.5, 0.5, 5.0, 1.1])), T([1.0, -1.0, -1.0, 1.0])
    loss, clipped = core.clipped_surrogate(log_ratio, a, clip_low=0.2, clip_high=0.28)
    # 1.5 with A=1: clipped at 1.28 -> -1.28; 0.5 with A=-1: clipped at 0.8 -> 0.8; 5.0 with A=-1: unclipped 5.0
    # (max of 5 and 1.28); 1.1 inside the range -> -1.1
    torch.testing.assert_close(loss, T([-1.28, 0.8, 5.0, -1.1]))
    assert clipped.tolist() == [True, True, False, False]
    loss, clipped = core.clipped_surrogate(log_ratio, a, 0.2, 0.28, dual_clip=3.0)
    torch.testing.assert_close(loss, T([-1.28, 0.8, 3.0, -1.1]))  # a negative advantage's loss capped at -A * 3
    assert clipped.tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        core.clipped_surrogate(log_ratio, a, 0.2, 0.2, dual_clip=0.5)


def test_policy_loss_defaults_are_the_plain_clipped_surrogate():
    """Without the knobs, core.policy_loss is TRL 1.12's token-mean clipped surrogate, number for number."""
    torch.manual_seed(0)
    new, old, a = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6)
    mask = (torch.arange(6) < torch.tensor([[6], [3], [1], [5]])).long()
    ratio = torch.exp(new - old)
    want = -torch.minimum(a * ratio, a * torch.clamp(ratio, 0.8, 1.2))  # the formula as TRL 1.12 wrote it
    loss, stats = core.policy_loss(new, old, a, mask, 0.2)
    torch.testing.assert_close(loss, (want * mask).sum() / mask.sum())
    torch.testing.assert_close(stats["clipfrac"], ((a * torch.clamp(ratio, 0.8, 1.2) < a * ratio).float() * mask).sum() / mask.sum())
    high, _ = core.policy_loss(new, old, a, mask, 0.2, cliprange_high=0.28, how="seq_mean_token_sum_norm", norm_length=6)
    want_high = -torch.minimum(a * ratio, a * torch.clamp(ratio, 0.8, 1.28))
    torch.testing.assert_close(high, (want_high * mask).sum() / (4 * 6))
