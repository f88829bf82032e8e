"""PPO memory at a 152k vocabulary (Qwen2 / GLM-4 size): one update, against an earlier hfalign in the same run.

    .venv/bin/python benchmarks/ppo_memory.py                      # this checkout vs the baseline commit
    .venv/bin/python benchmarks/ppo_memory.py --baseline none      # this checkout only
    .venv/bin/python benchmarks/ppo_memory.py --device cuda --prompt-tokens 512 --new-tokens 512   # the GPU case
    .venv/bin/python benchmarks/ppo_memory.py --baseline none --vocab-kl 10   # + the reference-tail KL's cost

The case of issue 7 (pitfall 18): a LLaMA with a 152,064-token vocabulary and a tiny body (hidden 64, 2 layers), 32
prompts x 64 new tokens, one PPO update (rollout forward passes over all 32 sequences at once, then 4 minibatches
of 8). Its cost is the logits: one fp32 [32, prompt+64, 152064] tensor is printed as the unit, and each run's peak as
a multiple of it. The baseline is checked out with `git worktree` into a temporary directory and imported from
there; every run is its own process (peak RSS per process). `--vocab-kl C` adds a run of this checkout with
`vocab_kl_coef: C` (the reference-tail KL a LoRA policy gets by default: one more reference forward per micro-batch,
its logits alive beside the policy's) and its ratio to the plain run.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import workers  # noqa: E402

BASELINE = "2d93d3d"  # issue 6's structure, before the memory work of issue 7
VOCAB, PROMPTS = 152_064, 32


def worker(device: str, out: str, prompt_tokens: int, new_tokens: int, vocab_kl: float = 0.0) -> dict:
    import datasets
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

    from hfalign.ppo import PPOConfig, PPOTrainer

    vocab = {f"t{i}": i for i in range(VOCAB)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3",
                                  padding_side="left")
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    policy, critic = LlamaForCausalLM(LlamaConfig(**cfg)), LlamaForSequenceClassification(LlamaConfig(**cfg, num_labels=1))
    prompts = [{"prompt": " ".join(f"t{100 + (i * 7 + j) % 5000}" for j in range(prompt_tokens))} for i in range(PROMPTS)]
    args = PPOConfig(output_dir=out, per_device_train_batch_size=8, num_mini_batches=4, num_ppo_epochs=1,
                     total_episodes=PROMPTS, response_length=new_tokens, temperature=0.7, report_to="none",
                     save_strategy="no", local_rollout_forward_batch_size=PROMPTS, use_cpu=device == "cpu",
                     missing_eos_penalty=1.0, **({"vocab_kl_coef": vocab_kl} if vocab_kl else {}))  # baseline: no such field
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy.to(device), value_model=critic.to(device),
                         reward_model=lambda p, c: [float(len(x)) / 100 for x in c],
                         train_dataset=datasets.Dataset.from_list(prompts))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    (log,) = [h for h in trainer.state.log_history if "objective/kl" in h]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mb": peak, "seconds": seconds, "response_length": log["val/response_length"]}


def run_worker(src: Path, a, vocab_kl: float = 0.0) -> dict | None:
    with tempfile.TemporaryDirectory() as out:
        return workers.run_worker(__file__, ["--device", a.device, "--out", out, "--prompt-tokens", str(a.prompt_tokens),
                                             "--new-tokens", str(a.new_tokens), "--vocab-kl", str(vocab_kl)],
                                  {"PYTHONPATH": str(src)}, f"run from {src}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--baseline", default=BASELINE, help="git revision to compare with ('none': skip)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--prompt-tokens", type=int, default=16, help="tokens per prompt (issue 7's GPU case: 512)")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per response (GPU case: 512)")
    p.add_argument("--vocab-kl", type=float, default=0.0, help="also run this checkout with this vocab_kl_coef")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--out")
    a = p.parse_args()
    if a.worker:
        workers.result(worker(a.device, a.out, a.prompt_tokens, a.new_tokens, a.vocab_kl))
        return
    what = "peak GPU memory allocated" if a.device == "cuda" else "peak RSS"
    print(f"one PPO update, vocab {VOCAB}, {PROMPTS} prompts x {a.new_tokens} new tokens, {a.device}; {what}")
    unit = PROMPTS * (a.prompt_tokens + a.new_tokens) * VOCAB * 4 / 2**20
    print(f"unit: one fp32 logits tensor [{PROMPTS}, {a.prompt_tokens + a.new_tokens}, {VOCAB}] = {unit:.0f} MiB")
    runs = {"this checkout": ROOT / "src"}
    tmp = None
    if a.baseline != "none":
        tmp = tempfile.mkdtemp()
        subprocess.run(["git", "worktree", "add", "--detach", tmp, a.baseline], cwd=ROOT, check=True, capture_output=True)
        runs = {f"baseline {a.baseline}": Path(tmp) / "src", **runs}
    if a.vocab_kl:
        runs[f"+ vocab_kl_coef {a.vocab_kl:g}"] = ROOT / "src"
    results = {}
    try:
        for name, src in runs.items():
            r = results[name] = run_worker(src, a, a.vocab_kl if name.startswith("+ vocab_kl") else 0.0)
            if r:
                print(f"  {name:24} {r['peak_mb']:8.0f} MiB = {r['peak_mb'] / unit:4.2f} units   "
                      f"({r['seconds']:.1f} s, mean response {r['response_length']:.0f} tokens)")
    finally:
        if tmp:
            subprocess.run(["git", "worktree", "remove", "--force", tmp], cwd=ROOT, capture_output=True)
    if tmp and results.get("this checkout") and results.get(f"baseline {a.baseline}"):
        print(f"  ratio this / baseline: {results['this checkout']['peak_mb'] / results[f'baseline {a.baseline}']['peak_mb']:.2f}x")
    tail = results.get(f"+ vocab_kl_coef {a.vocab_kl:g}")
    if tail and results.get("this checkout"):
        plain = results["this checkout"]
        print(f"  ratio with / without the tail KL: peak {tail['peak_mb'] / plain['peak_mb']:.2f}x, "
              f"time {tail['seconds'] / plain['seconds']:.2f}x")


if __name__ == "__main__":
    main()
