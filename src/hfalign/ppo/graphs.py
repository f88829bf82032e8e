"""CUDA graphs for PPO's two launch-bound loops (issue 20): the static decoder's decode step (ppo/decode.py) and the
update's micro-step -- forward of policy and critic, loss, backward -- (GraphedMicroStep, `train.update_graphs`).

Op by op, a 0.7B model's micro-step of 16 x 73 tokens launches thousands of small kernels through Python (HF's
modules, autograd, autocast): on an H200 it took ~200 ms where the arithmetic needs a fraction of that. A graph is
recorded once and replayed with one launch on the same static buffers. The decode step runs for real on a side
stream, then is recorded (a failed capture is said once and sampling goes on op by op). The update's micro-step is
recorded per update (its shapes and coefficients hold for one update), after one thrown-away warm-up step per
model; a failed recording is an error naming train.update_graphs (CUDA's random-number state may not survive it).
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from hfalign.ppo.policy_value import FP32Head, unwrapped


def graphs_allowed(model) -> bool:
    """CUDA graphs need every kernel of a step to be capturable: not with quantized (bitsandbytes) weights."""
    return getattr(unwrapped(model), "hf_quantizer", None) is None


def attention_kind(model) -> str | None:
    """'sdpa' or 'eager' (the attention a 4D mask can be built for), else None."""
    config = unwrapped(model).config
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    kind = getattr(config, "_attn_implementation", None) or "sdpa"
    return kind if kind in ("sdpa", "eager") else None


def update_problem(model, device: torch.device, deepspeed: bool, processes: int, mixed_precision: str = "no"
                   ) -> str | None:
    """None when a PolicyAndValue's micro-step can be recorded as a CUDA graph on `device`, else why not. Under
    autocast (`mixed_precision` bf16/fp16) only models whose weights are stored in that dtype already (the fp32
    heads aside, which compute outside autocast): a LoRA adapter in fp32 under bf16 autocast failed to record on
    an H200 (issue 20), so such runs stay op by op until that is understood."""
    if device.type != "cuda":
        return "not on CUDA"
    if deepspeed or processes > 1:
        return "DeepSpeed and DDP act from hooks during backward" if deepspeed else "DDP all-reduces from backward hooks"
    if model.is_activation_checkpointing:
        return "activation checkpointing recomputes layers from the host"
    parts = [m for m in (model.policy, model.critic, model.ref) if m is not None]
    kinds = {attention_kind(m) for m in parts}
    for m in parts:
        if not graphs_allowed(m):
            return "quantized weights"
        if not getattr(unwrapped(m), "_can_compile_fullgraph", False):
            return f"{type(unwrapped(m)).__name__} cannot be traced (e.g. remote-code ChatGLM)"
    if None in kinds or len(kinds) > 1:
        return "its attention is neither sdpa nor eager throughout"
    if mixed_precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        heads = {id(p) for m in model.modules() if isinstance(m, FP32Head) for p in m.parameters()}
        if any(p.is_floating_point() and p.dtype != dtype and id(p) not in heads for m in parts for p in m.parameters()):
            return (f"{mixed_precision} autocast would cast weights stored in another dtype inside the step (e.g. fp32 "
                    f"LoRA adapters); store the model in {mixed_precision} (model.dtype) to record it")
    return None


def mask_dtype(model) -> torch.dtype | None:
    """The additive mask's dtype for eager attention (the policy's floating dtype), None for sdpa (a bool mask)."""
    if attention_kind(model.policy) != "eager":
        return None
    return next(p.dtype for p in model.policy.parameters() if p.dtype.is_floating_point)


def as_4d(allowed: torch.Tensor, additive_dtype: torch.dtype | None) -> torch.Tensor:
    """A [B, 1, q, k] bool mask (True: attend) as sdpa takes it, or additive (0 / dtype min) for eager attention."""
    if additive_dtype is None:
        return allowed
    out = torch.zeros(allowed.shape, dtype=additive_dtype, device=allowed.device)
    return out.masked_fill_(~allowed, torch.finfo(additive_dtype).min)


def causal_mask(attention_mask: torch.Tensor, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The [B, 1, L, L] mask a causal model builds from a [B, L] padding mask -- position i sees the real positions
    j <= i -- built here, outside any graph (transformers checks a 2D mask on the host). A padding position sees
    only itself: no row is empty (an empty softmax row is NaN), and no real position ever sees it."""
    L = attention_mask.shape[1]
    slots = torch.arange(L, device=attention_mask.device)
    causal = slots[None, :] <= slots[:, None]
    allowed = (causal[None] & attention_mask.bool()[:, None, :]) | (slots[None, :] == slots[:, None])[None]
    return as_4d(allowed[:, None], additive_dtype)


_told: set[str] = set()
_warmed: weakref.WeakSet = weakref.WeakSet()  # models whose micro-step ran for real once before being recorded


def _on_side_stream(step):
    """Run `step` for real on a side stream (lazy initialisation happens there, not in a capture); its result."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = step()
    torch.cuda.current_stream().wait_stream(side)
    return out


def _recording_autocast():
    """Autocast as it is now, with its weight cache off: cached casts made in a capture would be freed while the
    graph still points at them."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


def warm_and_capture(step, what: str, mode: str = "thread_local"):
    """(the step's real output, (its CUDA graph, the graph's output)), or (output, (None, None)) when a kernel of the
    step cannot be captured: said once per `what`, and the caller goes on op by op."""
    first = _on_side_stream(step)
    graph = torch.cuda.CUDAGraph()
    try:
        with _recording_autocast(), torch.cuda.graph(graph, capture_error_mode=mode):
            buffer = step()
    except RuntimeError as e:  # the warm step already ran for real: it stands
        _say_once(what, e)
        return first, (None, None)
    return first, (graph, buffer)


def _say_once(what: str, error: Exception) -> None:
    if what not in _told:
        print(f"hfalign: {what} could not be captured as a CUDA graph ({str(error).splitlines()[0][:200]}); going on "
              "op by op. train.cuda_graphs: false silences this", flush=True)
        _told.add(what)


def micro_steps(step, sources: dict[str, torch.Tensor], model, graphed: bool):
    """`step(batch)` as a function of a micro-batch's episode indices (on the device: a host-side index would sync
    at every micro-step): a GraphedMicroStep (its 4D mask built here, outside the step), or rows gathered op by op."""
    if graphed:
        sources = {**sources, "attn": causal_mask(sources["attn"], mask_dtype(model))}
        params = [p for p in model.parameters() if p.requires_grad]
        return GraphedMicroStep(step, sources, params, model, capture=sources["full"].device.type == "cuda")

    def op_by_op(idx: torch.Tensor) -> dict:
        assert idx.device == sources["full"].device, "a host-side index would sync the device at every micro-step"
        return step({k: v[idx] for k, v in sources.items()})

    return op_by_op


class GraphedMicroStep:
    """One PPO update's micro-steps on static buffers: `step(batch) -> stats` (forward, loss, backward; stats are 0-d
    tensors) runs on rows of `sources` (tensors whose first dimension is the rollout's episodes) copied into fixed
    buffers. On CUDA (`capture`) the first call records the step, and every call replays it.

    Gradients: autograd *sets* a `.grad` that is None and *adds into* one that exists, and a graph replays whichever
    it recorded. So there are two graphs: `fresh`, recorded with every `.grad` None (the first micro-step after an
    optimizer's zero_grad: the gradients it writes live in the graph's memory, allocated during backward as the
    activations are freed -- peak memory as op by op), and, with gradient accumulation, `accumulate`, recorded with
    `fresh`'s gradients in place (it adds into them; recorded at the first call that needs it, sharing `fresh`'s
    memory pool). Before a replay the gradient tensors its graph writes are put back on the parameters.
    Made per update: its shapes (prompt width) and the Python numbers baked into it (coefficients, the KL
    coefficient, the temperature) hold for one update; dropping it frees the graphs' memory."""

    def __init__(self, step, sources: dict[str, torch.Tensor], params: list[torch.nn.Parameter],
                 owner: torch.nn.Module, capture: bool):
        self.step, self.sources, self.params, self.owner = step, sources, params, owner
        self.static: dict[str, torch.Tensor] = {}
        self.fresh, self.accumulate, self.grads, self.op_by_op = None, None, [], not capture

    def __call__(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.static:
            self.static = {k: v.new_empty((len(idx), *v.shape[1:])) for k, v in self.sources.items()}
        assert len(idx) == len(next(iter(self.static.values()))), "a graphed micro-step needs one micro-batch size"
        for k, src in self.sources.items():
            torch.index_select(src, 0, idx, out=self.static[k])
        if self.op_by_op:  # on the CPU: the same buffers and mask, nothing recorded
            return self.step(self.static)
        adding = any(p.grad is not None for p in self.params)  # a later micro-step of gradient accumulation
        if self.fresh is None:
            if adding:  # gradients from elsewhere at an update's start: op by op
                self.op_by_op = True
                return self.step(self.static)
            self._record_fresh()
        if not adding:
            for p, g in zip(self.params, self.grads):
                p.grad = g
            return self._replay(self.fresh)
        for p, g in zip(self.params, self.grads):  # add into fresh's tensors (a replaced one's value carried over)
            if p.grad is not g and g is not None:
                g.copy_(p.grad)
                p.grad = g
        if self.accumulate is None:
            self.accumulate = self._record(pool=self.fresh[0].pool())
        return self._replay(self.accumulate)

    def _record_fresh(self) -> None:
        """Record `fresh` with every .grad None. The first time for a model (`owner`), one micro-step runs for real on
        a side stream first -- lazy initialisation (library handles, autograd's device thread, the kernels of its
        dtypes) happens there, not in a capture -- and is thrown away: its gradients must not sit beside the graph's.
        Once per model, not per process: a bf16 model after an fp32 one meets kernels not yet initialised."""
        if self.owner not in _warmed:
            _on_side_stream(lambda: self.step(self.static))
            for p in self.params:
                p.grad = None
            _warmed.add(self.owner)
        self.fresh = self._record()
        self.grads = [p.grad for p in self.params]  # what fresh writes (None where a parameter gets no gradient)
        for p in self.params:
            p.grad = None  # until a replay fills them

    def _record(self, pool=None):
        """(graph, stats buffers) of one micro-step. A step that cannot be recorded is an error naming the switch:
        a failed capture can leave CUDA's random-number state unusable for the rest of the process (seen on an
        H200), so going on op by op is not safe."""
        from hfalign.errors import UserError

        graph = torch.cuda.CUDAGraph()
        try:
            with _recording_autocast(), torch.cuda.graph(graph, pool=pool):
                stats = self.step(self.static)
        except RuntimeError as e:
            raise UserError(f"the PPO update's micro-step could not be recorded as a CUDA graph: "
                            f"{str(e).splitlines()[0][:300]}", fix="set train.update_graphs: false (the update then "
                            "runs op by op) and report the model and settings") from e
        return graph, stats

    @staticmethod
    def _replay(recorded) -> dict[str, torch.Tensor]:
        graph, stats = recorded
        graph.replay()
        values = torch.stack(list(stats.values()))  # one copy: the buffers are overwritten by the next replay
        return dict(zip(stats, values.unbind()))
