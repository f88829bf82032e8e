"""PPO on a GPU: hfalign against TRL 1.12 on the same random-init ~0.7B LLaMA, in one run.

    python benchmarks/ppo_gpu.py                    # CUDA: 0.7B LLaMA, bf16, 64 prompts x 64 new tokens
    python benchmarks/ppo_gpu.py --size tiny --device cpu --episodes 64   # a smoke run of this script on a CPU
    python benchmarks/ppo_gpu.py --trl-path none --estimators gae rloo grpo   # hfalign's estimators side by side
    python benchmarks/ppo_gpu.py --size 100m --device cpu --episodes 64 --trl-path none --estimators gae rloo
    python benchmarks/ppo_gpu.py --trl-path none --generation hf static --profile prof.txt   # the sampler, and where time goes
    python benchmarks/ppo_gpu.py --trl-path none --generation static --update-graphs off on   # the update as a CUDA graph
    python benchmarks/ppo_gpu.py --size 0.5b --preset verl --new-tokens 256 --episodes 256 --trl-path none   # verl-shaped

Both trainers get the same weights (saved once, bf16), tokenizer (the embedded default's), prompts and settings:
6 updates of 64 prompts x 64 new tokens, 4 PPO epochs x 4 minibatches, full fine-tuning with four models. Prints
episodes/s, peak GPU memory and, for hfalign, the time split generate / score / update. TRL 1.12 comes from
--trl-path (a directory holding it, e.g. `pip install --no-deps --target DIR trl==1.12.0`) or is installed on
demand like benchmarks/ppo_throughput.py does; it is skipped when it cannot be had. The 152k-vocabulary,
512 + 512-token memory case is `python benchmarks/ppo_memory.py --device cuda --prompt-tokens 512 --new-tokens 512`.
`--estimators gae rloo ...` runs hfalign once per advantage estimator on the same episodes (responses; 4 per prompt
for the group estimators), with ratios to the first: a critic-free estimator builds no value model, so the 0.7B
case shows what dropping the critic saves in memory and time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import workers  # noqa: E402

SIZES = {"0.7b": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=22, num_attention_heads=12,
                      num_key_value_heads=4),
         "100m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=4), "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                                           num_attention_heads=4, num_key_value_heads=2),
         # shaped like Qwen2.5-0.5B (verl's single-GPU PPO log): a Qwen2 model, its 151,936-token vocabulary
         "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936, family="qwen2")}
SETTINGS = dict(per_device_train_batch_size=16, gradient_accumulation_steps=1, num_mini_batches=4, num_ppo_epochs=4,
                response_length=64, temperature=1.0, learning_rate=1e-6, kl_coef=0.05, seed=0,
                local_rollout_forward_batch_size=64)


def build(size: str, out: Path) -> None:
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2ForSequenceClassification,
    )

    from hfalign.demo.tiny import build_tokenizer

    tok = build_tokenizer()
    shape = dict(SIZES[size])
    qwen = shape.pop("family", "llama") == "qwen2"
    shape.setdefault("vocab_size", len(tok))  # a larger vocabulary: ids the tokenizer lacks are never sampled
    Config, LM, Head = (Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification) if qwen else \
        (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification)
    cfg = Config(max_position_embeddings=1024, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                 bos_token_id=tok.bos_token_id, tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init of 0.7B on a CPU took 40 s of GPU time
    with torch.device(device):
        policy, head = LM(cfg), Head(cfg.__class__(**{**cfg.to_dict(), "num_labels": 1}))
    if shape["vocab_size"] > len(tok):  # a random model would sample ids no tokenizer row has: make them unlikely
        with torch.no_grad():
            policy.lm_head.weight[len(tok):] = 0
            policy.lm_head.weight[:len(tok)] *= 4
    policy.to(torch.bfloat16).save_pretrained(out / "policy")
    head.to(torch.bfloat16).save_pretrained(out / "rm")
    for d in ("policy", "rm"):
        tok.save_pretrained(out / d)


def worker(kind: str, models: str, device: str, episodes: int, out: str, settings: dict | None = None,
           profile: str | None = None) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    policy_dir, rm_dir = f"{models}/policy", f"{models}/rm"
    tok = AutoTokenizer.from_pretrained(policy_dir, padding_side="left")
    rows = [json.loads(ln) for ln in (ROOT / "data/ppo_prompts.jsonl").read_text().splitlines()]
    rows = (rows * (episodes // len(rows) + 1))[:episodes]  # the shipped 120 prompts, repeated to fill a large batch
    data = datasets.Dataset.from_list(rows)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # CPUs without bf16 units crawl in bf16
    load = dict(dtype=dtype)
    common = dict(output_dir=out, total_episodes=episodes, report_to="none", save_strategy="no", bf16=device == "cuda",
                  use_cpu=device == "cpu", logging_steps=1, **(settings or SETTINGS))
    if kind == "trl":
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        data = data.map(lambda r: {"input_ids": tok(r["prompt"])["input_ids"]}, remove_columns=["prompt"])
        args = PPOConfig(stop_token="eos", num_sample_generations=0, sft_model_path=policy_dir,
                         reward_model_path=rm_dir, **common)
        extra = {"ref_model": AutoModelForCausalLM.from_pretrained(policy_dir, **load)}
    else:
        from hfalign.ppo import PPOConfig, PPOTrainer
        from hfalign.ppo.plan import GROUPED

        estimator, generation, graphs = [*kind.split(":"), "", "", ""][1:4]  # "hfalign:rloo", "hfalign:gae:hf:off"
        estimator = estimator or "gae"
        k = 4 if estimator in GROUPED else 1
        # TRL 1.12's values for the robustness defaults, so both trainers do the same work
        args, extra = PPOConfig(**common, early_stop_kl=None, adaptive_kl=False, normalize_scores=False,
                                advantage_estimator=estimator, num_generations=k, generation=generation or "auto",
                                update_graphs=graphs != "off"), {}
    trainer = PPOTrainer(args=args, processing_class=tok, model=AutoModelForCausalLM.from_pretrained(policy_dir, **load),
                         reward_model=AutoModelForSequenceClassification.from_pretrained(rm_dir, **load),
                         value_model=AutoModelForSequenceClassification.from_pretrained(rm_dir, **load),
                         train_dataset=data, **extra)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    profiler = UpdateProfiler(profile, kind, device) if profile else None
    t0 = time.perf_counter()
    with profiler.prof if profiler else contextlib.nullcontext():
        trainer.train()
    seconds = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "objective/kl" in h]
    split = {k: sum(h.get(k, 0.0) for h in logs) for k in ("timing/generate", "timing/score", "timing/update")}
    if profiler:
        profiler.write(len(logs))
    batch = episodes / max(1, len(logs))  # responses per update
    split["tokens"] = sum(h.get("val/response_length", 0.0) * batch for h in logs)
    reserved = None
    if device == "cuda":
        peak, reserved = torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
    else:  # the process's peak RSS (each run is its own process)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"eps": episodes / seconds, "seconds": seconds, "peak_gib": peak, "reserved_gib": reserved, **split}


class UpdateProfiler:
    """torch.profiler over a whole (short) run; its operator table, with host syncs and kernel launches counted, is
    appended to a file (issue 20: where an update's time goes)."""

    def __init__(self, path: str, label: str, device: str):
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        self.prof, self.path, self.label, self.device = profile(activities=acts), path, label, device

    def write(self, updates: int) -> None:
        ev = self.prof.key_averages()
        c = workers.cuda_counts(ev)
        key = "self_cuda_time_total" if self.device == "cuda" else "self_cpu_time_total"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"\n== {self.label}, {updates} PPO updates: host syncs {c['syncs']}, kernel launches "
                    f"{c['launches']}, graph launches {c['graphs']}\n")
            f.write(ev.table(sort_by=key, row_limit=22, max_name_column_width=56) + "\n")


def run_worker(args: list[str], pythonpath: str | None, label: str) -> dict | None:
    r = workers.run_worker(__file__, args, {"PYTHONPATH": pythonpath} if pythonpath else {}, label=label)
    if r:  # said at once: a run cut short by a timeout still leaves the runs before it
        split = " / ".join(f"{r[k]:.1f}" for k in ("timing/generate", "timing/score", "timing/update"))
        tps = f"  {r['tokens'] / r['seconds']:7.0f} generated tokens/s" if r.get("tokens") else ""
        held = f" (reserved {r['reserved_gib']:.1f})" if r.get("reserved_gib") else ""
        print(f"  {label:30} {r['eps']:7.2f} episodes/s{tps}  peak {r['peak_gib']:6.1f} GiB{held}  ({r['seconds']:.1f} s; "
              f"generate / score / update {split} s)", flush=True)
    return r


PRESETS = {"0.7b": {}, "verl": dict(per_device_train_batch_size=16, gradient_accumulation_steps=4, num_mini_batches=4,
                                    num_ppo_epochs=1, local_rollout_forward_batch_size=128)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=list(SIZES), default="0.7b")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--episodes", type=int, default=384)
    p.add_argument("--new-tokens", type=int, default=64, help="response_length")
    p.add_argument("--preset", choices=list(PRESETS), default="0.7b",
                   help="verl: 256 responses per update, 1 PPO epoch of 4 minibatches (verl's single-GPU log)")
    p.add_argument("--trl-path", help="a directory holding trl==1.12.0 (default: install it on demand; 'none': hfalign alone)")
    p.add_argument("--estimators", nargs="+", default=["gae"], help="hfalign runs, one per advantage_estimator")
    p.add_argument("--generation", nargs="+", default=["auto"], choices=["auto", "hf", "static"],
                   help="hfalign runs, one per train.generation (per estimator)")
    p.add_argument("--update-graphs", nargs="+", default=["on"], choices=["on", "off"],
                   help="hfalign runs, one per train.update_graphs (per generation)")
    p.add_argument("--profile", help="append a torch.profiler table of each hfalign run to this file (use few episodes)")
    p.add_argument("--settings", help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=4, metavar=("KIND", "MODELS", "EPISODES", "OUT"))
    a = p.parse_args()
    if a.worker:
        kind, models, episodes, out = a.worker
        workers.result(worker(kind, models, a.device, int(episodes), out, json.loads(a.settings), a.profile))
        return
    from ppo_throughput import trl112_path

    settings = {**SETTINGS, **PRESETS[a.preset], "response_length": a.new_tokens}
    print(f"== PPO on {a.device}: {a.size} {SIZES[a.size].get('family', 'llama')} (random init, bf16 weights), "
          f"{a.episodes} episodes, {settings}", flush=True)
    extra = ["--device", a.device, "--settings", json.dumps(settings)] + (["--profile", a.profile] if a.profile else [])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build(a.size, Path(tmp))
        print(f"  built the models in {time.perf_counter() - t0:.0f} s", flush=True)
        runs = {}
        for e in a.estimators:
            for g in a.generation:
                for u in a.update_graphs:
                    name = " ".join(["hfalign", *([e] if e != "gae" else []), *([g] if g != "auto" else []),
                                     *(["update op by op"] if u == "off" else [])])
                    runs[name] = run_worker([f"hfalign:{e}:{g}:{u}", tmp, str(a.episodes), f"{tmp}/h-{e}-{g}-{u}", *extra],
                                            None, name)
        trl_dir = None if a.trl_path == "none" else a.trl_path or trl112_path()
        if trl_dir:
            runs["TRL 1.12"] = run_worker(["trl", tmp, str(a.episodes), f"{tmp}/t", *extra], trl_dir, "TRL 1.12")
    first = next(iter(runs.values()))
    for name, r in runs.items():
        if first and r and r is not first and name != "TRL 1.12":
            print(f"  ratio {name} / {next(iter(runs))}: {r['eps'] / first['eps']:.2f}x episodes/s, "
                  f"{r['peak_gib'] / first['peak_gib']:.2f}x peak memory")
    trl = runs.get("TRL 1.12")
    for name, r in runs.items():
        if trl and r and name != "TRL 1.12":
            print(f"  ratio {name} / TRL 1.12: {r['eps'] / trl['eps']:.2f}x episodes/s, "
                  f"{r['peak_gib'] / trl['peak_gib']:.2f}x peak memory")


if __name__ == "__main__":
    main()
