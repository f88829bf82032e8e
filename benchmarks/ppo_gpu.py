"""PPO on a GPU: hfalign against TRL 1.12 on the same random-init ~0.7B LLaMA, in one run.

    python benchmarks/ppo_gpu.py                    # CUDA: 0.7B LLaMA, bf16, 64 prompts x 64 new tokens
    python benchmarks/ppo_gpu.py --size tiny --device cpu --episodes 64   # a smoke run of this script on a CPU
    python benchmarks/ppo_gpu.py --trl-path none --estimators gae rloo grpo   # hfalign's estimators side by side
    python benchmarks/ppo_gpu.py --size 100m --device cpu --episodes 64 --trl-path none --estimators gae rloo

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
                                                           num_attention_heads=4, num_key_value_heads=2)}
SETTINGS = dict(per_device_train_batch_size=16, gradient_accumulation_steps=1, num_mini_batches=4, num_ppo_epochs=4,
                response_length=64, temperature=1.0, learning_rate=1e-6, kl_coef=0.05, seed=0,
                local_rollout_forward_batch_size=64)


def build(size: str, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from hfalign.demo.tiny import build_tokenizer

    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=False,
                      **SIZES[size])
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out / "policy")
    cfg.num_labels = 1
    LlamaForSequenceClassification(cfg).to(torch.bfloat16).save_pretrained(out / "rm")
    for d in ("policy", "rm"):
        tok.save_pretrained(out / d)


def worker(kind: str, models: str, device: str, episodes: int, out: str) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    policy_dir, rm_dir = f"{models}/policy", f"{models}/rm"
    tok = AutoTokenizer.from_pretrained(policy_dir, padding_side="left")
    rows = [json.loads(ln) for ln in (ROOT / "data/ppo_prompts.jsonl").read_text().splitlines()][:episodes]
    data = datasets.Dataset.from_list(rows)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # CPUs without bf16 units crawl in bf16
    load = dict(dtype=dtype)
    common = dict(output_dir=out, total_episodes=episodes, report_to="none", save_strategy="no", bf16=device == "cuda",
                  use_cpu=device == "cpu", logging_steps=1, **SETTINGS)
    if kind == "trl":
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        data = data.map(lambda r: {"input_ids": tok(r["prompt"])["input_ids"]}, remove_columns=["prompt"])
        args = PPOConfig(stop_token="eos", num_sample_generations=0, sft_model_path=policy_dir,
                         reward_model_path=rm_dir, **common)
        extra = {"ref_model": AutoModelForCausalLM.from_pretrained(policy_dir, **load)}
    else:
        from hfalign.ppo import PPOConfig, PPOTrainer
        from hfalign.ppo.plan import GROUPED

        estimator = kind.partition(":")[2] or "gae"  # "hfalign:rloo"
        k = 4 if estimator in GROUPED else 1
        # TRL 1.12's values for the robustness defaults, so both trainers do the same work
        args, extra = PPOConfig(**common, early_stop_kl=None, adaptive_kl=False, normalize_scores=False,
                                advantage_estimator=estimator, num_generations=k), {}
    trainer = PPOTrainer(args=args, processing_class=tok, model=AutoModelForCausalLM.from_pretrained(policy_dir, **load),
                         reward_model=AutoModelForSequenceClassification.from_pretrained(rm_dir, **load),
                         value_model=AutoModelForSequenceClassification.from_pretrained(rm_dir, **load),
                         train_dataset=data, **extra)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "objective/kl" in h]
    split = {k: sum(h.get(k, 0.0) for h in logs) for k in ("timing/generate", "timing/score", "timing/update")}
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:  # the process's peak RSS (each run is its own process)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"eps": episodes / seconds, "seconds": seconds, "peak_gib": peak, **split}


def run_worker(args: list[str], pythonpath: str | None) -> dict | None:
    r = workers.run_worker(__file__, args, {"PYTHONPATH": pythonpath} if pythonpath else {}, label=args[0])
    if r:  # said at once: a run cut short by a timeout still leaves the runs before it
        split = " / ".join(f"{r[k]:.1f}" for k in ("timing/generate", "timing/score", "timing/update"))
        print(f"  {args[0]:10} {r['eps']:7.2f} episodes/s  peak {r['peak_gib']:6.1f} GiB  ({r['seconds']:.1f} s; "
              f"generate / score / update {split} s)", flush=True)
    return r


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=list(SIZES), default="0.7b")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--episodes", type=int, default=384)
    p.add_argument("--trl-path", help="a directory holding trl==1.12.0 (default: install it on demand; 'none': hfalign alone)")
    p.add_argument("--estimators", nargs="+", default=["gae"], help="hfalign runs, one per advantage_estimator")
    p.add_argument("--worker", nargs=4, metavar=("KIND", "MODELS", "EPISODES", "OUT"))
    a = p.parse_args()
    if a.worker:
        kind, models, episodes, out = a.worker
        workers.result(worker(kind, models, a.device, int(episodes), out))
        return
    from ppo_throughput import trl112_path

    print(f"== PPO on {a.device}: {a.size} LLaMA (random init, bf16 weights), {a.episodes} episodes, {SETTINGS}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build(a.size, Path(tmp))
        print(f"  built the models in {time.perf_counter() - t0:.0f} s", flush=True)
        runs = {}
        for e in a.estimators:
            name = "hfalign" if e == "gae" else f"hfalign:{e}"
            runs[name] = run_worker([name, tmp, str(a.episodes), f"{tmp}/h-{e}", "--device", a.device], None)
        trl_dir = None if a.trl_path == "none" else a.trl_path or trl112_path()
        if trl_dir:
            runs["TRL 1.12"] = run_worker(["trl", tmp, str(a.episodes), f"{tmp}/t", "--device", a.device], trl_dir)
    first = runs.get("hfalign" if a.estimators[0] == "gae" else f"hfalign:{a.estimators[0]}")
    for name, r in runs.items():
        if first and r and r is not first and name != "TRL 1.12":
            print(f"  ratio {name} / {a.estimators[0]}: {r['eps'] / first['eps']:.2f}x episodes/s, "
                  f"{r['peak_gib'] / first['peak_gib']:.2f}x peak memory")
    if all(runs.get(k) for k in ("hfalign", "TRL 1.12")):
        print(f"  ratio hfalign / TRL 1.12: {runs['hfalign']['eps'] / runs['TRL 1.12']['eps']:.2f}x episodes/s, "
              f"{runs['hfalign']['peak_gib'] / runs['TRL 1.12']['peak_gib']:.2f}x peak memory")


if __name__ == "__main__":
    main()
