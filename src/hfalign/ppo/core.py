"""PPO for language models as small pure functions over tensors and masks. Imports only torch.

Shapes: B sequences x T response tokens. `mask` is 1 on real response tokens (up to and including EOS, or to the
end for a truncated response) and 0 after; everything after a response's end is zero and excluded from every mean
(DeepSpeed-Chat PRs #620, #672).
"""

from __future__ import annotations

import math

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries; positions outside the mask come back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def response_mask(responses: torch.Tensor, stop_ids: int | list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask, last index, has_eos) of each response. The last real token is the first stop token (EOS, or an
    end-of-turn token such as LLaMA-3's <|eot_id|>), or the final token of a truncated response; the reward goes
    there, not on the pad after it (huggingface/trl#3750). has_eos: the response ended with a stop token."""
    B, T = responses.shape
    stops = torch.tensor([stop_ids] if isinstance(stop_ids, int) else list(stop_ids), device=responses.device)
    is_eos = torch.isin(responses, stops)
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, T - 1, dtype=torch.long))
    positions = torch.arange(T, device=responses.device).expand(B, T)
    mask = (positions <= first_eos.unsqueeze(1)).long()
    return mask, first_eos, has_eos


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them (OpenRLHF#217, trl#469)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


BLOCK_ELEMENTS = 2**25  # a [rows, vocab] block worked on at once holds about this many values (128 MiB in fp32)


def _blocks(batch: int, length: int, vocab: int):
    """(batch slice, position slice) blocks of about BLOCK_ELEMENTS values covering a [batch, length, vocab] tensor.
    Blocks are cut from the 3-d tensor itself: a sliced (non-contiguous) logits view is never copied whole."""
    per_row = length * vocab
    if per_row <= BLOCK_ELEMENTS:
        rows = max(1, BLOCK_ELEMENTS // per_row)
        for b in range(0, batch, rows):
            yield slice(b, b + rows), slice(None)
    else:
        positions = max(1, BLOCK_ELEMENTS // vocab)
        for b in range(batch):
            for t in range(0, length, positions):
                yield slice(b, b + 1), slice(t, t + positions)


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(logits / T)[token] without materialising another full-vocabulary tensor (pitfall 18): forward and
    backward walk blocks of about BLOCK_ELEMENTS values in fp32; only the logits themselves (as given, a view is
    fine) and one logsumexp per position are kept for backward."""

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, logits, tokens, temperature, with_entropy):  # fp32 whatever autocast is on outside (pitfall 11)
        out = torch.empty(tokens.shape, dtype=torch.float32, device=logits.device)
        lse, entropy = torch.empty_like(out), torch.empty(tokens.shape if with_entropy else 0, device=logits.device)
        for b, t in _blocks(*logits.shape):
            x = logits[b, t].float() / temperature
            lse[b, t] = torch.logsumexp(x, dim=-1)
            out[b, t] = x.gather(-1, tokens[b, t].unsqueeze(-1)).squeeze(-1) - lse[b, t]
            if with_entropy:  # for the logs, from the same block: lse - sum_j p_j x_j (no second full-vocabulary pass)
                entropy[b, t] = lse[b, t] - (torch.exp(x - lse[b, t].unsqueeze(-1)) * x).sum(-1)
            del x
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, grad_out, _grad_entropy):
        logits, tokens, lse = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for b, t in _blocks(*logits.shape):
            g = grad_out[b, t].float().unsqueeze(-1)
            probs = torch.exp(logits[b, t].float() / ctx.temperature - lse[b, t].unsqueeze(-1))
            block = -probs * g  # d/dx_j (x_token - lse) = 1[j = token] - p_j, times 1/T
            block.scatter_add_(-1, tokens[b, t].unsqueeze(-1), g)
            grad[b, t] = (block / ctx.temperature).to(grad.dtype)
        return grad, None, None, None


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token) at the sampling temperature, in fp32 (trl#2358: logprobs at T=1 of samples drawn at T make
    PPO off-policy from step one; OpenRLHF PR #634: bf16 logits make KL noisy), computed block by block so no
    fp32 / temperature-scaled / log-softmax copy of the [B, T, vocab] logits is ever made (pitfall 18)."""
    return _SelectiveLogSoftmax.apply(logits, tokens, float(temperature), False)[0]


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """logprobs_from_logits and, from the same blocks, the per-token entropy (no gradient: for the logs)."""
    return _SelectiveLogSoftmax.apply(logits, tokens, float(temperature), True)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token entropy of the sampling distribution; always >= 0. Differentiable (full-vocabulary temporaries):
    use it only when the entropy bonus is on; logprobs_and_entropy gives it for logging."""
    logits = logits.float() / temperature
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(dim=-1)


def vocab_kl(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position exact KL(pi || ref) = sum_v pi_v (log pi_v - log ref_v) of the sampling distributions, in fp32;
    differentiable in `logits` (full-vocabulary temporaries: the price of seeing every token, not the sampled one)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    ref = torch.log_softmax(ref_logits.float() / temperature, dim=-1)
    return (logp.exp() * (logp - ref)).sum(dim=-1)


class _TailKL(torch.autograd.Function):
    """tail_kl's forward and backward in blocks of about BLOCK_ELEMENTS values (as _SelectiveLogSoftmax): kept for
    backward are the logits (as given), the reference's tail as a bool mask, and three numbers per position. The
    gradient has a closed form: with P = softmax(logits / T), p = P's tail mass and g = dKL/dp = log(p/q) -
    log((1-p)/(1-q)), d KL / d logits_v = g / T * P_v * (1[v in tail] - p)."""

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, logits, ref_logits, tail, temperature):
        shape = logits.shape[:-1]
        p, q, lse = (torch.empty(shape, dtype=torch.float32, device=logits.device) for _ in range(3))
        in_tail = torch.empty(logits.shape, dtype=torch.bool, device=logits.device)
        for b, t in _blocks(*logits.shape):
            x = logits[b, t].float() / temperature
            lse[b, t] = torch.logsumexp(x, dim=-1)
            ref = torch.log_softmax(ref_logits[b, t].float() / temperature, dim=-1)
            in_tail[b, t] = ref < math.log(tail)
            p[b, t] = (torch.exp(x - lse[b, t].unsqueeze(-1)) * in_tail[b, t]).sum(-1)
            q[b, t] = (ref.exp() * in_tail[b, t]).sum(-1)
            del x, ref
        p, q = p.clamp(torch.finfo(torch.float32).tiny, 1 - 1e-6), q.clamp(torch.finfo(torch.float32).tiny, 1 - 1e-6)
        ctx.save_for_backward(logits, in_tail, lse, p, q)
        ctx.temperature = temperature
        return p * (p.log() - q.log()) + (1 - p) * (torch.log1p(-p) - torch.log1p(-q))

    @staticmethod
    def backward(ctx, grad_out):
        logits, in_tail, lse, p, q = ctx.saved_tensors
        dkl_dp = (p.log() - q.log()) - (torch.log1p(-p) - torch.log1p(-q))
        scale = grad_out.float() * dkl_dp / ctx.temperature
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for b, t in _blocks(*logits.shape):
            probs = torch.exp(logits[b, t].float() / ctx.temperature - lse[b, t].unsqueeze(-1))
            grad[b, t] = (scale[b, t].unsqueeze(-1) * probs * (in_tail[b, t].float() - p[b, t].unsqueeze(-1))).to(grad.dtype)
        return grad, None, None, None


def tail_kl(logits: torch.Tensor, ref_logits: torch.Tensor, tail: float, temperature: float = 1.0) -> torch.Tensor:
    """Per-position KL between two-part distributions: {the tokens the reference gives probability < `tail`, the
    rest}. p = the policy's mass on the reference's tail, q = the reference's: p log(p/q) + (1-p) log((1-p)/(1-q)).
    Only mass moved into (or out of) the reference's tail costs anything; how the policy reshapes the rest is free.
    <= the exact KL (a coarsening); fp32, differentiable in `logits`, in blocks (no full-vocabulary float temporaries:
    a bool mask of the tail is what it keeps)."""
    return _TailKL.apply(logits, ref_logits.detach(), float(tail), float(temperature))


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || ref) estimate from sampled tokens (http://joschu.net/blog/kl-approx.html).
    k1 = log pi - log ref (unbiased, can be negative per token); k3 = (r - 1) - log r with r = ref / pi (>= 0)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3'")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, last_index: torch.Tensor,
                  mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -kl_coef * KL_t on every real token, plus the sequence score on its last real token.
    Returns (rewards, non_score_rewards), both zero after the response ends."""
    non_score = -kl_coef * kl * mask
    rewards = non_score.clone()
    rewards[torch.arange(len(scores), device=scores.device), last_index] += scores
    return rewards, non_score


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, masked: no value is bootstrapped from beyond a response's end.
    Returns (advantages, returns) with returns = advantages + values; both zero after the end."""
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


def aggregate(loss: torch.Tensor, mask: torch.Tensor, how: str = "token_mean", norm_length: int | None = None
              ) -> torch.Tensor:
    """Per-token loss -> a scalar. token_mean: over every real token of the batch (long answers weigh more);
    seq_mean_token_mean: each response's token mean, then the mean over responses (every response weighs the same);
    seq_mean_token_sum: each response's token sum, then the mean; seq_mean_token_sum_norm: the batch's token sum /
    (responses x norm_length), a constant (Dr. GRPO: the maximum response length), so no length bias."""
    mask = mask.to(loss.dtype)
    if how == "token_mean":
        return masked_mean(loss, mask)
    if how == "seq_mean_token_mean":
        return masked_mean(loss, mask, dim=1).mean()
    if how == "seq_mean_token_sum":
        return (loss * mask).sum(1).mean()
    if how == "seq_mean_token_sum_norm":
        return (loss * mask).sum() / (loss.shape[0] * (norm_length or loss.shape[1]))
    raise ValueError(f"unknown loss_aggregation {how!r}; one of {', '.join(AGGREGATIONS)}")


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float,
                      dual_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO loss max(-A r, -A clip(r, 1 - low, 1 + high)) with DAPO's clip-higher (low != high) and, where
    dual_clip = c > 1, the dual clip for negative advantages (Ye et al. 2020): the loss is at most -A * c. Returns
    (per-token loss, where a clip bit)."""
    ratio = torch.exp(log_ratio)
    loss1, loss2 = -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss, clipped = torch.max(loss1, loss2), loss2 > loss1
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (got {dual_clip})")
        capped = torch.min(loss, -advantages * dual_clip)
        clipped = clipped | ((advantages < 0) & (capped < loss))
        loss = torch.where(advantages < 0, capped, loss)
    return loss, clipped


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float, cliprange_high: float | None = None, dual_clip: float | None = None,
                how: str = "token_mean", norm_length: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: `cliprange` below 1 and `cliprange_high` (default: the same) above, optional dual clip,
    aggregated over tokens as `how` says (PPOConfig.loss_options). Stats: clipfrac (where a clip bit), approx-KL
    (0.5 * E[log r^2]), ratio mean and variance -- token means whatever the aggregation."""
    log_ratio = logprobs - old_logprobs
    high = cliprange if cliprange_high is None else cliprange_high
    loss, clipped = clipped_surrogate(log_ratio, advantages, cliprange, high, dual_clip)
    ratio = torch.exp(log_ratio)
    stats = {
        "clipfrac": masked_mean(clipped.float(), mask),
        "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
        "ratio": masked_mean(ratio, mask),
        "ratio_var": masked_var(ratio, mask, unbiased=False),
    }
    return aggregate(loss, mask, how, norm_length), stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * E[max((v - R)^2, (clip(v) - R)^2)] and the fraction where clipping bit."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss1 = (values - returns) ** 2
    loss2 = (clipped - returns) ** 2
    return 0.5 * masked_mean(torch.max(loss1, loss2), mask), masked_mean((loss2 > loss1).float(), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R]: 1 is a perfect critic, 0 no better than a constant, < 0 worse."""
    var_returns = masked_var(returns, mask, unbiased=False)
    return 1 - masked_var(returns - values, mask, unbiased=False) / var_returns.clamp(min=1e-8)


def repetition(responses: torch.Tensor, mask: torch.Tensor, n: int = 2) -> torch.Tensor:
    """Per response: the share of its token n-grams that already occurred earlier in it. 0 for no repeats; a
    degenerate ' lemon, lemon, lemon.' rises towards 1 (distinct-n, Li et al. 2016, seen from the other side)."""
    out = []
    for row, keep in zip(responses.tolist(), mask.tolist()):
        tokens = [t for t, k in zip(row, keep) if k]
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        out.append(1.0 - len(set(grams)) / len(grams) if grams else 0.0)
    return torch.tensor(out, device=responses.device)


def adaptive_kl_coef(coef: float, current_kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al. 2019: move the KL coefficient so the measured KL tracks `target`; the proportional error is
    clipped to +-0.2 and scaled by n_steps / horizon."""
    error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)


def adaptive_lr_scale(scale: float, approx_kl: float, target: float, step: float = 1.5, low: float = 0.01,
                      high: float = 1.0) -> float:
    """The adaptive learning rate of rl_games / Isaac Gym PPO, on the approx-KL measured after each optimizer step:
    above 2 x target the learning rate is divided by `step`, below target / 2 multiplied by it, within
    [low, high] x the configured one. The step size follows how far an update actually moves the policy, not a
    constant guessed for one model."""
    if approx_kl > 2.0 * target:
        scale /= step
    elif approx_kl < 0.5 * target:
        scale *= step
    return min(max(scale, low), high)


class RunningMoments:
    """Running mean and std of scores (Chan et al. parallel update), for reward normalisation; checkpointable."""

    def __init__(self, mean: float = 0.0, var: float = 1.0, count: float = 1e-24):
        self.mean, self.var, self.count = mean, var, count

    def update(self, xs: torch.Tensor) -> None:
        xs = xs.double()
        n, batch_mean = xs.numel(), xs.mean().item()
        batch_var = xs.var(unbiased=False).item() if n > 1 else 0.0
        delta, total = batch_mean - self.mean, self.count + n
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-8))

    def state(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}
