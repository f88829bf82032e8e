"""The static-cache decoder (ppo/decode.py, train.generation: static) against transformers' `generate`: the same
tokens for the same seed on CPU -- greedy and sampled, several stop tokens, ragged prompts, a LoRA policy with its
adapter on and off, eager attention -- and the choice of sampler. Its CUDA-graph replay runs only on a GPU
(test_cuda_graph_replay_matches_eager_steps, skipped here; benchmarks/gpu_check.sh speed runs it)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from hfalign.ppo.decode import PROMPT_BUCKET, static_decode

PROMPTS = ["I think the movie was", "Hello", "The weather today is really quite something and", "a b c",
           "good", "the plot", "what a", "one two three four five six seven eight nine ten eleven twelve"]


def encode(tiny_model, device="cpu"):
    tok = AutoTokenizer.from_pretrained(tiny_model, padding_side="left")
    enc = tok(PROMPTS, return_tensors="pt", padding=True).to(device)
    return tok, enc


def both(model, tok, enc, stops, seed, max_new=12, **sampling):
    """(generate's responses, the static decoder's) from the same seed."""
    greedy = sampling.pop("greedy", False)
    config = GenerationConfig(max_new_tokens=max_new, do_sample=not greedy, eos_token_id=stops,
                              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                              **({} if greedy else {"top_k": 0, **sampling}))
    torch.manual_seed(seed)
    hf = model.generate(**enc, generation_config=config)[:, enc.input_ids.shape[1]:]
    torch.manual_seed(seed)
    static = static_decode(model, enc.input_ids, enc.attention_mask, max_new=max_new, stop_ids=stops,
                           pad_id=tok.pad_token_id, greedy=greedy, **sampling)
    return hf, static


def frequent_tokens(model, tok, enc, n=3) -> list[int]:
    """Stop ids the random tiny model actually emits, so rows end at different steps."""
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    ids, counts = out[:, enc.input_ids.shape[1]:].flatten().unique(return_counts=True)
    return ids[counts.argsort(descending=True)][:n].tolist()


@pytest.mark.parametrize("sampling", [dict(greedy=True), dict(temperature=1.0), dict(temperature=0.7),
                                      dict(temperature=1.3, top_k=20, top_p=0.9)], ids=["greedy", "T1", "T0.7", "topk-topp"])
def test_static_decoder_draws_generates_tokens(tiny_model, sampling):
    tok, enc = encode(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    assert enc.input_ids.shape[1] % PROMPT_BUCKET  # the decoder pads the prompts further: must not change a token
    stops = [tok.eos_token_id, *frequent_tokens(model, tok, enc)[1:]]
    for seed in range(3):
        hf, static = both(model, tok, enc, stops, seed, **sampling)
        assert static.shape == hf.shape and torch.equal(static, hf), (seed, hf, static)
    ended = torch.isin(static, torch.tensor(stops)).any(1)
    assert 0 < ended.sum() < len(PROMPTS) or sampling.get("greedy") is None  # rows stop at different steps


def test_every_row_finishing_ends_the_call_where_generate_ends_it(tiny_model):
    """Every row stops within 3 tokens (each row's third greedy token is a stop id): the width is generate's, not
    max_new."""
    tok, enc = encode(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    third = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)[:, -1]
    stops = sorted(set(third.tolist()))
    hf, static = both(model, tok, enc, stops, 0, max_new=40, greedy=True)
    assert hf.shape[1] <= 3 and torch.equal(static, hf)
    # on an accelerator the check runs every CHECK_EVERY tokens: later columns are the pad token and are cut
    static16 = static_decode(model, enc.input_ids, enc.attention_mask, max_new=40, stop_ids=stops,
                             pad_id=tok.pad_token_id, greedy=True, check_every=16)
    assert torch.equal(static16, hf)


def test_lora_policy_and_its_disabled_adapter_decode_like_generate(tiny_model):
    """The shared-base roles: a LoRA policy (adapter on) and the reference (adapter off) through the same decoder."""
    from peft import LoraConfig, get_peft_model

    tok, enc = encode(tiny_model)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)).eval()
    on_hf, on = both(model, tok, enc, [tok.eos_token_id], 1, temperature=1.0)
    with model.disable_adapter():
        off_hf, off = both(model, tok, enc, [tok.eos_token_id], 1, temperature=1.0)
    assert torch.equal(on, on_hf) and torch.equal(off, off_hf)
    assert not torch.equal(on, off)  # the adapter is really in the loop


def test_eager_attention_gets_an_additive_mask(tiny_model):
    tok, enc = encode(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager").eval()
    hf, static = both(model, tok, enc, [tok.eos_token_id], 2, temperature=1.0)
    assert torch.equal(static, hf)


def test_generation_setting_picks_the_sampler(tiny_model):
    from hfalign.errors import UserError
    from hfalign.ppo.config import PPOConfig
    from hfalign.ppo.generation import HFGenerator, StaticGenerator, make_generator

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)

    def pick(generation, device="cpu", m=model, graphs=True):
        args = PPOConfig(output_dir="/tmp/unused", generation=generation, report_to="none", cuda_graphs=graphs)
        return type(make_generator(args, tok, [tok.eos_token_id], m, torch.device(device)))

    assert pick("auto") is HFGenerator and pick("hf", "cuda") is HFGenerator  # auto: static on CUDA only
    assert pick("auto", "cuda") is StaticGenerator and pick("static") is StaticGenerator
    assert pick("auto", "cuda", graphs=False) is HFGenerator  # op by op it is not faster than generate
    model._can_compile_fullgraph = False  # as a remote-code model (ChatGLM) has it
    assert pick("auto", "cuda") is HFGenerator
    with pytest.raises(UserError, match=r"train\.generation: static cannot run this model"):
        pick("static")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_matches_eager_steps(tiny_model, dtype):
    """On a GPU: the replayed graph gives the op-by-op loop's tokens (greedy exactly; sampled from the same seed),
    with bf16 autocast around it too."""
    tok, enc = encode(tiny_model, "cuda")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype).cuda().eval()
    stops = [tok.eos_token_id, *frequent_tokens(model, tok, enc)[1:]]
    kw = dict(max_new=24, stop_ids=stops, pad_id=tok.pad_token_id)
    for greedy in (True, False):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.float32):
            torch.manual_seed(0)
            eager = static_decode(model, enc.input_ids, enc.attention_mask, greedy=greedy, cuda_graphs=False, **kw)
            torch.manual_seed(0)
            graphed = static_decode(model, enc.input_ids, enc.attention_mask, greedy=greedy, cuda_graphs=True, **kw)
        assert torch.equal(eager, graphed), (greedy, eager, graphed)


def test_one_forward_per_token_and_prefill_logits_of_the_last_position_only(tiny_model):
    """The CPU-side guard of issue 20's cause (per-token overhead): the decoder runs the prompt once, then exactly one
    single-token forward per further token, each asking for the last position's logits only."""
    tok, enc = encode(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    calls = []
    model.register_forward_pre_hook(lambda _m, _a, kw: calls.append((kw["input_ids"].shape, kw["logits_to_keep"])),
                                    with_kwargs=True)
    out = static_decode(model, enc.input_ids, enc.attention_mask, max_new=10, stop_ids=[-1], pad_id=tok.pad_token_id,
                        greedy=True)
    assert out.shape == (len(PROMPTS), 10)
    width = -(-enc.input_ids.shape[1] // PROMPT_BUCKET) * PROMPT_BUCKET
    assert calls == [((len(PROMPTS), width), 1)] + [((len(PROMPTS), 1), 1)] * 9
