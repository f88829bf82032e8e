"""hfalign's static-cache decoder (`train.generation: static`, the default on CUDA): PPO's sampling without
`generate`'s per-token Python.

HF `generate` with a dynamic cache grows every layer's keys and values by concatenation and runs its stopping
criteria and a host sync after each token: on a GPU a 0.7B model's decode step becomes launch-bound (issue 20: ~55 ms
a step where the weights stream in ~1 ms). Here, per chunk of prompts:

- a StaticCache of prompt + response_length positions is allocated once (the prompt width bucketed to a multiple of
  PROMPT_BUCKET by extra left padding, so shapes repeat across updates);
- the prompt is read in one forward pass (logits of its last position only);
- every decode step is the same forward pass on fixed buffers (token, position, 4D attention mask, cache): on CUDA it
  is captured once as a CUDA graph and replayed (`train.cuda_graphs`). Capture happens inside the call, after the
  generating role is set up (adapters switched, ZeRO-3 weights gathered), so a graph never outlives the weights or
  the adapter state it was recorded with, and no compile step is paid;
- the next token is drawn as `generate` draws it (fp32 logits, / temperature, top-k, top-p, softmax, multinomial),
  so sampling stays on-policy and, on the same seed and device, gives `generate`'s tokens; finished rows emit the
  pad token; whether every row has finished is read from the device once every CHECK_EVERY tokens, not per token.

Returns what HF `generate` returns past the prompt: [B, T] with T the step at which the last row finished.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from hfalign.ppo.graphs import as_4d, attention_kind, graphs_allowed, warm_and_capture
from hfalign.ppo.policy_value import unwrapped

PROMPT_BUCKET = 16  # prompt widths are padded up to a multiple of this: a bounded number of shapes per run
CHECK_EVERY = 16  # tokens between two reads of "has every row finished?" (the only host syncs of the loop)


def unsupported(model) -> str | None:
    """None when the static decoder can run `model`, else why not (the hf path then serves it)."""
    inner = unwrapped(model)
    name = type(inner).__name__
    if not getattr(inner, "_can_compile_fullgraph", False):
        return f"{name} has no static-cache support in transformers (e.g. remote-code ChatGLM)"
    config = inner.config.get_text_config(decoder=True)
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return f"{name} has sliding-window or linear-attention layers"
    if attention_kind(model) is None:
        return f"{name} uses attention {config._attn_implementation!r} (the static decoder builds sdpa/eager masks)"
    return None


@torch.no_grad()
def static_decode(model, ids: torch.Tensor, mask: torch.Tensor, *, max_new: int, stop_ids: list[int], pad_id: int,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                  cuda_graphs: bool = True, check_every: int | None = None) -> torch.Tensor:
    """Responses [B, T] for left-padded prompts `ids` / `mask` [B, P] (see the module docstring). `check_every`:
    tokens between two reads of "all finished?"; default CHECK_EVERY on an accelerator, 1 on CPU (a read costs
    nothing there, and stopping where `generate` stops draws as many random numbers: a run is `generate`'s run)."""
    from transformers import StaticCache

    extra = (-ids.shape[1]) % PROMPT_BUCKET
    ids, mask = F.pad(ids, (extra, 0), value=pad_id), F.pad(mask, (extra, 0), value=0)
    (B, P), device, inner = ids.shape, ids.device, unwrapped(model)
    check_every = check_every or (1 if device.type == "cpu" else CHECK_EVERY)
    L = P + max_new
    cache = StaticCache(config=inner.config, max_cache_len=L)
    cache_kw = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
    additive = inner.config.get_text_config(decoder=True)._attn_implementation == "eager"
    keys = torch.cat([mask.bool(), torch.ones(B, max_new, dtype=torch.bool, device=device)], 1)  # [B, L]
    slots = torch.arange(L, device=device)

    dtype = (inner.dtype if inner.dtype.is_floating_point else torch.float32) if additive else None

    def as_mask(allowed: torch.Tensor) -> torch.Tensor:  # [B, 1, q, L] bool (sdpa) or additive float (eager)
        return as_4d(allowed, dtype)

    def forward(tokens, attention, positions):  # fp32 logits of the last position, [B, V]
        out = model(input_ids=tokens, attention_mask=attention, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{cache_kw: cache})
        return out.logits[:, -1].float()

    # positions as generate counts them (pitfall 3): over real tokens; a padding slot sees only itself (no empty row)
    positions = (mask.long().cumsum(1) - 1).masked_fill_(mask == 0, 1)
    q = torch.arange(P, device=device)
    prefill = ((slots[None, :] <= q[:, None])[None] & keys[:, None, :]) | (slots[None, :] == q[:, None])[None]
    logits = forward(ids, as_mask(prefill[:, None]), positions)
    del prefill

    warpers = _warpers(temperature, top_k, top_p, greedy)
    stops = torch.tensor(stop_ids, device=device)
    out = torch.full((B, max_new), pad_id, dtype=ids.dtype, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    done = torch.zeros(max_new, dtype=torch.bool, device=device)  # done[t]: every row had finished after token t
    tok_buf, pos_buf = torch.empty(B, 1, dtype=ids.dtype, device=device), positions[:, -1:] + 1
    mask_buf = as_mask(torch.zeros(B, 1, 1, L, dtype=torch.bool, device=device))
    graph, graph_logits = None, None
    use_graph = cuda_graphs and device.type == "cuda" and graphs_allowed(model)
    for t in range(max_new):
        tok = _pick(logits, warpers, greedy)
        tok = torch.where(finished, pad_id, tok)
        out[:, t] = tok
        finished |= torch.isin(tok, stops)
        done[t] = finished.all()
        if t == max_new - 1 or ((t + 1) % check_every == 0 and bool(done[t])):
            break
        tok_buf.copy_(tok[:, None])
        if t:
            pos_buf.add_(1)
        mask_buf.copy_(as_mask((keys & (slots <= P + t))[:, None, None, :]))
        if not use_graph:
            logits = forward(tok_buf, mask_buf, pos_buf)
        elif graph is None:  # the first decode step runs for real on a side stream (warming up), then is captured
            logits, (graph, graph_logits) = warm_and_capture(lambda: forward(tok_buf, mask_buf, pos_buf), "the decode step")
            use_graph = graph is not None
        else:
            graph.replay()
            logits = graph_logits
    steps = int(done.int().argmax()) + 1 if bool(done.any()) else max_new
    return out[:, :steps]


def _warpers(temperature: float, top_k: int, top_p: float, greedy: bool) -> list:
    """generate's sampling processors, in its order (temperature, top-k, top-p), for the same draws."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if greedy:
        return []
    out = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    if top_k:
        out.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    return out


def _pick(logits: torch.Tensor, warpers: list, greedy: bool) -> torch.Tensor:
    if greedy:
        return logits.argmax(-1)
    for w in warpers:
        logits = w(None, logits)
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1).squeeze(1)
