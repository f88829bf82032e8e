"""Rollout generation alone, on one model, four ways (issue 20), with a torch.profiler summary of each:

    python benchmarks/gen_speed.py                       # CUDA: the 0.7B LLaMA of ppo_gpu.py, bf16, 64 x 64 tokens
    python benchmarks/gen_speed.py --size tiny --device cpu --calls 1     # a smoke run of this script

  generate-defaults   transformers' generate with library defaults (top_k=50, one EOS id): the call before PR 2f5be69
  generate-owned      generate with hfalign's owned config (top_k=0, the stop-id list): train.generation: hf
  static-eager        hfalign's static-cache decoder, op by op (train.cuda_graphs: false)
  static-graphs       the same with each decode step replayed as a CUDA graph (train.generation: static / auto)

Prints seconds per call, ms per decode step, generated tokens/s, the ratio to generate-owned, how many tokens agree
with generate-owned under greedy decoding (bf16 kernels differ with the cache's length, so not all need to), and per
way the profiler's top operators by self time, with the count of host syncs (cudaStreamSynchronize / DtoH copies) and
kernel launches per decode step: what makes a step slow.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import workers  # noqa: E402


def build(size: str, device: str, dtype):
    from ppo_gpu import SIZES
    from transformers import LlamaConfig, LlamaForCausalLM

    from hfalign.demo.tiny import build_tokenizer

    tok = build_tokenizer()
    tok.padding_side = "left"
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=False,
                      **SIZES[size])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return tok, model


def ways(model, tok, new_tokens: int, graphs_ok: bool):
    from transformers import GenerationConfig

    from hfalign.ppo.decode import static_decode

    stops = [tok.eos_token_id, tok.pad_token_id]
    owned = GenerationConfig(max_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             eos_token_id=stops, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    defaults = GenerationConfig(max_new_tokens=new_tokens, do_sample=True, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)

    def gen(config):
        return lambda ids, mask, greedy=False: model.generate(
            input_ids=ids, attention_mask=mask, generation_config=config if not greedy else GenerationConfig(
                max_new_tokens=new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id))[:, ids.shape[1]:]

    def static(graphs):
        return lambda ids, mask, greedy=False: static_decode(model, ids, mask, max_new=new_tokens, stop_ids=stops,
                                                             pad_id=tok.pad_token_id, greedy=greedy, cuda_graphs=graphs)

    out = {"generate-defaults": gen(defaults), "generate-owned": gen(owned), "static-eager": static(False)}
    if graphs_ok:
        out["static-graphs"] = static(True)
    return out


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def profile(fn, ids, mask, device, rows: int) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with prof(activities=acts) as p:
        out = fn(ids, mask)
        sync(device)
    steps = out.shape[1]
    ev = p.key_averages()
    c = workers.cuda_counts(ev)
    syncs, dtoh, launches, graphs = c["syncs"], c["dtoh"], c["launches"], c["graphs"]
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    head = (f"    per decode step ({steps} steps): host syncs {syncs / steps:.1f}, DtoH copies {dtoh / steps:.1f}, "
            f"kernel launches {launches / steps:.0f}, graph launches {graphs / steps:.1f}")
    return head + "\n" + ev.table(sort_by=key, row_limit=rows, max_name_column_width=48) + "\n" + \
        ev.table(sort_by="self_cpu_time_total", row_limit=rows // 2, max_name_column_width=48)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="0.7b")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--profile-rows", type=int, default=14)
    p.add_argument("--profile", nargs="*", default=["generate-defaults", "generate-owned", "static-graphs"],
                   help="the ways to profile")
    a = p.parse_args()
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    tok, model = build(a.size, a.device, dtype)
    rows = [json.loads(x)["prompt"] for x in (ROOT / "data/ppo_prompts.jsonl").read_text().splitlines()][:a.prompts]
    enc = tok(rows, return_tensors="pt", padding=True).to(a.device)
    ids, mask = enc.input_ids, enc.attention_mask
    print(f"== generation on {a.device} ({torch.cuda.get_device_name() if a.device == 'cuda' else 'CPU'}): {a.size} "
          f"LLaMA {dtype}, {a.prompts} prompts (width {ids.shape[1]}) x {a.new_tokens} new tokens; torch "
          f"{torch.__version__}", flush=True)
    fns = ways(model, tok, a.new_tokens, a.device == "cuda")
    results, tables = {}, {}
    for name, fn in fns.items():
        try:
            fn(ids, mask)  # warm-up: allocator, cuBLAS handles, graph capture path
            sync(a.device)
            t0, steps = time.perf_counter(), 0
            for _ in range(a.calls):
                steps += fn(ids, mask).shape[1]
            sync(a.device)
            sec = (time.perf_counter() - t0) / a.calls
            results[name] = (sec, steps / a.calls)
            print(f"  {name:18} {sec:7.3f} s/call  {1000 * sec / (steps / a.calls):7.2f} ms/step  "
                  f"{a.prompts * steps / a.calls / sec:9.0f} tokens/s", flush=True)
            if name in a.profile:
                tables[name] = profile(fn, ids, mask, a.device, a.profile_rows)
        except Exception as e:
            print(f"  {name:18} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
    base = results.get("generate-owned")
    for name, (sec, _) in results.items():
        if base:
            print(f"  ratio {name} / generate-owned: {base[0] / sec:.2f}x faster")
    ref = fns["generate-owned"](ids, mask, greedy=True)
    for name in ("static-eager", "static-graphs"):
        if name in fns:
            try:
                got = fns[name](ids, mask, greedy=True)
                w = min(got.shape[1], ref.shape[1])
                first = (got[:, :w] != ref[:, :w]).int().argmax(1)
                print(f"  greedy {name} vs generate-owned: {(got[:, :w] == ref[:, :w]).float().mean():.3f} of tokens "
                      f"equal, rows identical {(got[:, :w] == ref[:, :w]).all(1).float().mean():.2f}, "
                      f"median first difference at step {first.float().median():.0f}", flush=True)
            except Exception as e:
                print(f"  greedy {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    for name, table in tables.items():
        print(f"\n== profile: {name}\n{table}", flush=True)


if __name__ == "__main__":
    main()
