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


# -- ppo/estimate.py: each estimator as the trainer composes it (KL placement, groups, whitening) --------------------
def _rollout(mask, values=None):
    from types import SimpleNamespace

    mask = T(mask)
    last = mask.sum(1).long() - 1
    return SimpleNamespace(mask=mask, last=last, values=torch.zeros_like(mask) if values is None else T(values))


def _args(estimator, k=2, **kw):
    from types import SimpleNamespace

    base = dict(advantage_estimator=estimator, num_generations=k, kl_placement="in_reward", gamma=1.0, lam=0.95,
                lam_actor=None, lam_critic=None, lam_actor_alpha=None, whiten_rewards=False, whiten_advantages=False)
    return SimpleNamespace(**{**base, **kw})


def test_rloo_in_reward_sums_the_kl_into_each_response_reward():
    from hfalign.ppo.estimate import estimate

    r, kl = _rollout([[1.0, 1.0], [1.0, 1.0]]), T([[0.5, 0.5], [0.0, 1.0]])
    # sequence rewards 1 - 0.2 * 1 = 0.8 and 3 - 0.2 * 1 = 2.8; leave-one-out: -2 and 2 on every token
    e = estimate(_args("rloo"), r, T([1.0, 3.0]), kl, 0.2)
    torch.testing.assert_close(e.advantages, T([[-2.0, -2.0], [2.0, 2.0]]))
    assert e.returns is None
    torch.testing.assert_close(e.non_score, T([[-0.1, -0.1], [0.0, -0.2]]))


def test_grpo_with_kl_in_loss_sees_the_score_alone_and_is_never_whitened_again():
    from hfalign.ppo.estimate import estimate

    r, kl = _rollout([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]), T([[5.0, 5.0, 0.0], [0.0, 0.0, 9.0]])
    e = estimate(_args("grpo", kl_placement="in_loss", whiten_advantages=True), r, T([1.0, 3.0]), kl, 0.2)
    a = 1 / (math.sqrt(2) + 1e-6)  # (score - 2) / unbiased std sqrt(2)
    torch.testing.assert_close(e.advantages, T([[-a, -a, 0.0], [a, a, a]]))
    assert not e.non_score.any()
    d = estimate(_args("dr_grpo", kl_placement="in_loss"), r, T([1.0, 3.0]), kl, 0.2)
    torch.testing.assert_close(d.advantages, T([[-1.0, -1.0, 0.0], [1.0, 1.0, 1.0]]))


def test_remax_subtracts_the_greedy_score_from_the_returns():
    from hfalign.ppo.estimate import estimate

    r = _rollout([[1.0, 1.0], [1.0, 0.0]])
    kl = T([[0.5, 0.0], [1.0, 0.0]])
    # token rewards [[-0.1, 1], [3 - 0.2, 0]]; returns [[0.9, 1], [2.8, 0]]; minus greedy 2 on real tokens
    e = estimate(_args("remax", k=1), r, T([1.0, 3.0]), kl, 0.2, greedy_scores=T([2.0, 2.0]))
    torch.testing.assert_close(e.advantages, T([[-1.1, -1.0], [0.8, 0.0]]))


def test_reinforce_pp_baseline_centres_the_group_then_whitens_the_returns():
    from hfalign.ppo.estimate import estimate

    r, kl = _rollout([[1.0, 1.0], [1.0, 1.0]]), T([[0.5, 0.0], [0.0, 0.0]])
    # scores [1, 3] -> [-1, 1]; token rewards [[-0.1, -1], [0, 1]] -> returns [[-1.1, -1], [1, 1]], then whitened
    e = estimate(_args("reinforce_pp_baseline"), r, T([1.0, 3.0]), kl, 0.2)
    returns = T([[-1.1, -1.0], [1.0, 1.0]])
    mean, std = returns.mean(), returns.std()
    torch.testing.assert_close(e.advantages, (returns - mean) / (std + 1e-8), atol=1e-5, rtol=1e-5)


def test_decoupled_and_length_adaptive_gae_lambdas():
    from hfalign.ppo.estimate import estimate

    # lengths 20 and 100 at alpha 0.05: lambda 1 - 1/1 = 0 and 1 - 1/5 = 0.8
    torch.testing.assert_close(adv.adaptive_lambda(T([20.0, 100.0]), 0.05), T([0.0, 0.8]))
    r, kl = _rollout([[1.0, 1.0]]), T([[0.0, 0.0]])
    # values 0, rewards [0, 1]: the critic's returns at lambda 1 are [1, 1]; the actor's advantages at lambda 0 are
    # the one-step TD errors [0, 1]
    e = estimate(_args("gae", k=1, lam_critic=1.0, lam_actor=0.0), r, T([1.0]), kl, 0.2)
    torch.testing.assert_close(e.returns, T([[1.0, 1.0]]))
    torch.testing.assert_close(e.advantages, T([[0.0, 1.0]]))
    same = estimate(_args("gae", k=1, lam=0.5), r, T([1.0]), kl, 0.2)  # one lambda: advantages == returns - values
    torch.testing.assert_close(same.advantages, T([[0.5, 1.0]]))
