"""PPO math as pure functions, each against numbers computed by hand (in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from hfalign.ppo import core

T = torch.tensor


def test_kl_estimators():
    logp, ref = T([[-1.0, -2.0]]), T([[-1.5, -1.0]])
    assert torch.allclose(core.kl_penalty(logp, ref, "k1"), T([[0.5, -1.0]]))
    # k3 = (e^{-lr} - 1) + lr: lr=0.5 -> 0.60653 - 1 + 0.5 = 0.10653; lr=-1 -> 2.71828 - 1 - 1 = 0.71828
    assert torch.allclose(core.kl_penalty(logp, ref, "k3"), T([[0.106531, 0.718282]]), atol=1e-5)
    assert (core.kl_penalty(torch.randn(4, 5), torch.randn(4, 5), "k3") >= 0).all()
    with pytest.raises(ValueError):
        core.kl_penalty(logp, ref, "k2")


def test_reward_lands_on_the_eos_token_and_nothing_after():
    # responses: [5, EOS, PAD, PAD] and a truncated [5, 6, 7, 8]
    responses = T([[5, 2, 0, 0], [5, 6, 7, 8]])
    mask, last, has_eos = core.response_mask(responses, stop_ids=2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert last.tolist() == [1, 3] and has_eos.tolist() == [True, False]
    kl = T([[0.5, -1.0, 9.0, 9.0], [0.0, 0.0, 0.0, 1.0]]) * mask
    rewards, non_score = core.token_rewards(T([2.0, -1.0]), kl, 0.1, last, mask)
    # row 0: -0.1*[0.5, -1] = [-0.05, 0.1], + score 2 on the EOS (index 1, not the pad at index 2: trl#3750)
    assert torch.allclose(rewards, T([[-0.05, 2.1, 0.0, 0.0], [0.0, 0.0, 0.0, -1.1]]))
    assert torch.allclose(non_score, T([[-0.05, 0.1, 0.0, 0.0], [0.0, 0.0, 0.0, -0.1]]))


def test_a_stop_token_ends_a_response_like_eos():
    """LLaMA-3 chat ends a turn with <|eot_id|> (here id 9), not EOS: the response ends, and is scored, there."""
    responses = T([[5, 9, 2, 0], [5, 6, 2, 9], [5, 6, 7, 8]])
    mask, last, has_eos = core.response_mask(responses, stop_ids=[2, 9])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert last.tolist() == [1, 2, 3] and has_eos.tolist() == [True, True, False]


def test_gae_by_hand():
    # gamma=1, lam=0.5; t=1: delta = 1 + 0 - 0.2 = 0.8 -> A1 = 0.8; t=0: delta = 0 + 0.2 - 0.5 = -0.3 -> A0 = -0.3 + 0.5*0.8 = 0.1
    adv, ret = core.gae(T([[0.0, 1.0]]), T([[0.5, 0.2]]), T([[1, 1]]), gamma=1.0, lam=0.5)
    assert torch.allclose(adv, T([[0.1, 0.8]])) and torch.allclose(ret, T([[0.6, 1.0]]))
    # gamma=0.9, lam=1: t=1: delta = 1 - 0.2 = 0.8; t=0: delta = 0 + 0.9*0.2 - 0.5 = -0.32 -> A0 = -0.32 + 0.9*0.8 = 0.4
    adv, _ = core.gae(T([[0.0, 1.0]]), T([[0.5, 0.2]]), T([[1, 1]]), gamma=0.9, lam=1.0)
    assert torch.allclose(adv, T([[0.4, 0.8]]))


def test_gae_ignores_everything_after_the_end():
    # the garbage reward 5 and value 9 after the end must not leak into A0 = 1 - 0.5 = 0.5
    adv, ret = core.gae(T([[1.0, 5.0]]), T([[0.5, 9.0]]), T([[1, 0]]), gamma=1.0, lam=0.95)
    assert adv.tolist() == [[0.5, 0.0]] and ret.tolist() == [[1.0, 0.0]]


def test_policy_loss_by_hand():
    old = T([[0.0, 0.0]])
    new = T([[math.log(1.5), math.log(0.5)]])  # ratios 1.5, 0.5
    loss, s = core.policy_loss(new, old, T([[1.0, 1.0]]), T([[1, 1]]), cliprange=0.2)
    # -A*r = [-1.5, -0.5]; -A*clip(r) = [-1.2, -0.8]; max = [-1.2, -0.5] -> mean -0.85; clipped where 2nd > 1st: [yes, no]
    assert loss.item() == pytest.approx(-0.85)
    assert s["clipfrac"].item() == pytest.approx(0.5)
    assert s["approxkl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2)
    assert s["ratio"].item() == pytest.approx(1.0)
    assert s["ratio_var"].item() == pytest.approx(0.25)


def test_ratio_one_when_nothing_changed():
    logp = torch.randn(3, 4)
    _loss, s = core.policy_loss(logp, logp.clone(), torch.randn(3, 4), torch.ones(3, 4), 0.2)
    assert s["ratio"].item() == 1.0 and s["approxkl"].item() == 0.0 and s["clipfrac"].item() == 0.0


def test_value_loss_by_hand():
    # clipped = 0.5 + clamp(0.5, +-0.2) = 0.7; (1-2)^2 = 1, (0.7-2)^2 = 1.69 -> max 1.69; second token: 1, 1 -> 1
    loss, clipfrac = core.value_loss(T([[1.0, 0.0]]), T([[0.5, 0.0]]), T([[2.0, 1.0]]), T([[1, 1]]), 0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    assert clipfrac.item() == pytest.approx(0.5)


def test_masked_whiten_and_mean():
    x, mask = T([[1.0, 2.0, 3.0, 100.0]]), T([[1, 1, 1, 0]])
    assert core.masked_mean(x, mask).item() == pytest.approx(2.0)
    # mean 2, unbiased var 1 -> [-1, 0, 1], the masked 100 ignored and zeroed
    assert torch.allclose(core.masked_whiten(x, mask), T([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-4)
    assert torch.allclose(core.masked_whiten(x, mask, shift_mean=False), T([[1.0, 2.0, 3.0, 0.0]]), atol=1e-4)


def test_explained_variance():
    ret, mask = T([[1.0, 2.0, 3.0]]), T([[1, 1, 1]])
    assert core.explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    assert core.explained_variance(torch.full_like(ret, 2.0), ret, mask).item() == pytest.approx(0.0)


def test_adaptive_kl_coef():
    # error = clip(12/6 - 1, +-0.2) = 0.2; 0.1 * (1 + 0.2 * 64 / 10000) = 0.100128
    assert core.adaptive_kl_coef(0.1, 12.0, 6.0, 10000, 64) == pytest.approx(0.100128)
    # error = clip(3/6 - 1) = -0.2 (clipped from -0.5)
    assert core.adaptive_kl_coef(0.1, 3.0, 6.0, 10000, 64) == pytest.approx(0.1 * (1 - 0.2 * 64 / 10000))


def test_adaptive_lr_scale():
    # target 0.01: above 0.02 -> / 1.5; below 0.005 -> x 1.5 (capped at the configured rate); between: unchanged
    assert core.adaptive_lr_scale(0.9, 0.05, 0.01) == pytest.approx(0.6)
    assert core.adaptive_lr_scale(0.4, 0.001, 0.01) == pytest.approx(0.6)
    assert core.adaptive_lr_scale(0.8, 0.001, 0.01) == 1.0
    assert core.adaptive_lr_scale(0.5, 0.01, 0.01) == 0.5
    assert core.adaptive_lr_scale(0.012, 1.0, 0.01) == 0.01  # floor: 1% of the configured rate


def test_position_ids_skip_left_padding():
    assert core.position_ids(T([[0, 0, 1, 1], [1, 1, 1, 1]])).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_logprobs_use_the_temperature_and_entropy_is_non_negative():
    logits = T([[[2.0, 0.0]]])
    # at T=2: softmax([1, 0]) -> log p(0) = 1 - log(e + 1) = -0.31326
    assert core.logprobs_from_logits(logits, T([[0]]), temperature=2.0).item() == pytest.approx(-0.313262, abs=1e-5)
    assert core.logprobs_from_logits(logits, T([[0]]), temperature=1.0).item() == pytest.approx(-0.126928, abs=1e-5)
    assert (core.entropy_from_logits(torch.randn(2, 3, 50) * 5) >= 0).all()
    # uniform over 2 -> ln 2
    assert core.entropy_from_logits(T([[[0.0, 0.0]]])).item() == pytest.approx(math.log(2))


def test_running_moments_match_batch_statistics():
    m, xs = core.RunningMoments(), torch.randn(100) * 3 + 1
    m.update(xs[:30])
    m.update(xs[30:])
    assert m.mean == pytest.approx(xs.mean().item(), abs=1e-6)
    assert m.std == pytest.approx(xs.std(unbiased=False).item(), rel=1e-4)


@pytest.mark.parametrize("block", [120, 1000], ids=["positions", "rows"])
def test_selective_logprobs_match_log_softmax_in_value_and_gradient(monkeypatch, block):
    """The block-wise log-softmax (no full-vocabulary copy) equals the plain one, forward and backward, across
    block boundaries and at a temperature, for fp32 and bf16 logits."""
    monkeypatch.setattr(core, "BLOCK_ELEMENTS", block)  # 50-token vocab: blocks of 2 positions, or of 2 whole rows
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(3, 8, 50) * 3).to(dtype).requires_grad_(True)
        tokens = torch.randint(0, 50, (3, 7))
        weights = torch.randn(3, 7)
        ours = core.logprobs_from_logits(logits[:, :-1], tokens, temperature=0.7)  # a non-contiguous view, as used
        (ours * weights).sum().backward()
        grad_ours, logits.grad = logits.grad.clone(), None
        ref = torch.log_softmax(logits[:, :-1].float() / 0.7, -1).gather(2, tokens[..., None]).squeeze(-1)
        (ref * weights).sum().backward()
        assert ours.dtype == torch.float32
        assert torch.allclose(ours, ref, atol=1e-5)
        # bf16: both round the same fp32 gradient once (measured error 0); allow one bf16 ulp, not 2e-2
        tol = dict(atol=1e-5) if dtype == torch.float32 else dict(atol=1e-6, rtol=2 ** -8)
        assert torch.allclose(grad_ours.float(), logits.grad.float(), **tol)


@pytest.mark.parametrize("block", [60, 1000], ids=["positions", "rows"])
def test_entropy_comes_from_the_logprob_pass_without_a_graph(monkeypatch, block):
    """Issue 18 item 7: the logged entropy is computed in the selective log-softmax's own blocks (it used to take a
    second full-vocabulary pass per micro-step); it equals the differentiable entropy and carries no graph, and the
    logprobs' gradient is what logprobs_from_logits gives."""
    monkeypatch.setattr(core, "BLOCK_ELEMENTS", block)
    logits = torch.randn(2, 5, 30, requires_grad=True)
    tokens = torch.randint(0, 30, (2, 5))
    logprobs, ent = core.logprobs_and_entropy(logits, tokens, 0.7)
    assert not ent.requires_grad and torch.allclose(ent, core.entropy_from_logits(logits, 0.7), atol=1e-5)
    assert (ent > 0).all()
    logprobs.sum().backward()
    grad, logits.grad = logits.grad.clone(), None
    core.logprobs_from_logits(logits, tokens, 0.7).sum().backward()
    assert torch.equal(grad, logits.grad)


def test_repetition_by_hand():
    responses = torch.tensor([[1, 2, 1, 2, 1, 0], [5, 5, 5, 5, 0, 0], [7, 8, 9, 0, 0, 0], [3, 0, 0, 0, 0, 0]])
    mask = responses != 0
    # [1 2 1 2 1]: bigrams 12 21 12 21 -> 2 distinct of 4; [5 5 5 5]: 55 x3 -> 1 of 3; [7 8 9]: none repeated;
    # one token: no bigram, 0
    assert core.repetition(responses, mask).tolist() == pytest.approx([0.5, 2 / 3, 0.0, 0.0])
    # what follows the end does not count: the same row with the padding turned into repeats of the last token
    assert core.repetition(torch.tensor([[7, 8, 9, 9, 9, 9]]), mask[2:3]).tolist() == [0.0]


def test_prompt_shards_are_equal_so_ranks_stay_in_step():
    """Issue 18 item 10: 17 prompts on 2 ranks, batches of 3: every rank gets 8 prompts a pass (the 17th waits for a
    later pass), so both walk the same pass together and no update holds a prompt twice."""
    from hfalign.ppo.rollout import prompt_batches

    ranks = [prompt_batches(17, 3, rank, 2, seed=0) for rank in range(2)]
    for update in range(12):
        a, b = next(ranks[0]), next(ranks[1])
        assert len(a) == len(b) == 3 and not set(a) & set(b), update
    one = prompt_batches(17, 3, 0, 1, seed=0)  # one process: 5 full batches a pass, 15 different prompts
    assert len({i for _ in range(5) for i in next(one)}) == 15


def test_tail_kl_by_hand():
    """ref = (0.6, 0.39, 0.01), tail below 0.05 = {token 2}, q = 0.01. pi = (0.5, 0.3, 0.2) put p = 0.2 there:
    0.2 ln(0.2/0.01) + 0.8 ln(0.8/0.99) = 0.428672. pi = (0.3, 0.69, 0.01) only reshaped the head: 0, where the exact
    KL is 0.3 ln(0.5) + 0.69 ln(0.69/0.39) = 0.185732. The gradient lowers the tail token and spares the head."""
    ref = torch.tensor([[[0.6, 0.39, 0.01]]]).log()
    moved = torch.tensor([[[0.5, 0.3, 0.2]]]).log().requires_grad_(True)
    kl = core.tail_kl(moved, ref, tail=0.05)
    assert kl.item() == pytest.approx(0.2 * math.log(20) + 0.8 * math.log(0.8 / 0.99), abs=1e-5)
    reshaped = torch.tensor([[[0.3, 0.69, 0.01]]]).log()
    assert core.tail_kl(reshaped, ref, tail=0.05).item() == pytest.approx(0.0, abs=1e-6)
    assert core.vocab_kl(reshaped, ref).item() == pytest.approx(0.3 * math.log(0.5) + 0.69 * math.log(0.69 / 0.39), abs=1e-5)
    assert core.tail_kl(ref, ref, tail=0.05).item() == pytest.approx(0.0, abs=1e-6)
    kl.sum().backward()
    assert moved.grad[0, 0, 2] > 0 and moved.grad[0, 0, 0] < 0 and moved.grad[0, 0, 1] < 0  # descent lowers the tail


@pytest.mark.parametrize("block", [2**25, 7])  # one block; blocks of single positions
def test_tail_kl_in_blocks_equals_the_plain_formula_with_its_gradient(monkeypatch, block):
    """The blocked autograd function against the formula written with full-vocabulary tensors, values and gradients,
    at T = 0.7, with bf16 logits too (computed in fp32 inside)."""
    monkeypatch.setattr(core, "BLOCK_ELEMENTS", block)

    def plain(z, r, tail, temperature):
        logp, ref = torch.log_softmax(z.float() / temperature, -1), torch.log_softmax(r.float() / temperature, -1)
        mask = ref < math.log(tail)
        p, q = (logp.exp() * mask).sum(-1), (ref.exp() * mask).sum(-1)
        return p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()

    torch.manual_seed(0)
    ref = torch.randn(2, 5, 50) * 3
    for dtype in (torch.float32, torch.bfloat16):
        z = (ref + torch.randn(2, 5, 50)).to(dtype).requires_grad_(True)
        weights = torch.rand(2, 5)
        (core.tail_kl(z, ref, 0.01, 0.7) * weights).sum().backward()
        got, z.grad = z.grad.clone(), None
        (plain(z, ref, 0.01, 0.7) * weights).sum().backward()
        assert torch.allclose(core.tail_kl(z, ref, 0.01, 0.7), plain(z, ref, 0.01, 0.7), atol=1e-5)
        assert got.dtype == dtype and torch.allclose(got.float(), z.grad.float(), atol=1e-6 if dtype == torch.float32 else 1e-3)


def test_vocab_kl_by_hand():
    """pi = (1/4, 3/4), ref uniform: KL = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812; at T = 2 pi = (1/3, 2/3) over
    logits (0, ln 4): 1/3 ln(2/3) + 2/3 ln(4/3) = 0.056633; 0 where the two agree; the gradient flows to the policy."""
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(4)]]], requires_grad=True)
    ref = torch.zeros(1, 2, 2)
    kl = core.vocab_kl(logits, ref, 1.0)
    assert kl[0, 0].item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)
    assert core.vocab_kl(logits, ref, 2.0)[0, 1].item() == pytest.approx(math.log(2 / 3) / 3 + 2 / 3 * math.log(4 / 3),
                                                                         abs=1e-6)
    assert core.vocab_kl(ref, ref, 0.7).abs().max().item() == 0.0
    kl.sum().backward()
    assert logits.grad[0, 0, 1] > 0  # lowering the over-weighted token lowers the KL
