"""PPO throughput and memory: hfalign against TRL 1.12's experimental PPOTrainer, in one run.

    .venv/bin/python benchmarks/ppo_throughput.py            # both parts
    .venv/bin/python benchmarks/ppo_throughput.py --part speed

1. speed: the embedded default's tiny SFT policy and reward model (outputs/sft, outputs/rm, trained if missing),
   the same prompts and PPO settings, full fine-tuning with four models, in both trainers. Prints episodes/s and
   the ratio. TRL 1.12 is installed on demand into a temporary directory (`pip install --target`); the
   comparison is skipped when it cannot be had.
2. memory: a ~100M-parameter LLaMA built locally. hfalign's LoRA shared-base mode (one base; policy, value and
   reward as adapters) against four full model copies (TRL 1.12's layout; hfalign's full mode when TRL 1.12 is
   missing). Prints peak RSS of each run and the ratio.

Every measured run is its own process, so peak RSS and imports do not leak between them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import workers  # noqa: E402

PY = sys.executable
# hfalign's robustness defaults that change how much work an update does (early stop skips optimizer steps) are set to
# TRL 1.12's, so both trainers do the same work
TRL_WORK = {"early_stop_kl": None, "adaptive_kl": False, "normalize_scores": False}
SETTINGS = {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 1, "num_mini_batches": 4,
            "num_ppo_epochs": 4, "response_length": 24, "temperature": 1.0, "learning_rate": 3e-4, "kl_coef": 0.05,
            "missing_eos_penalty": 1.0, "local_rollout_forward_batch_size": 64, "seed": 0}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- workers (run in their own process) --------------------------------------------------------------------------


def _prompts(tokenizer, n: int):
    import datasets

    rows = [json.loads(ln) for ln in (ROOT / "data/ppo_prompts.jsonl").read_text().splitlines()]
    rows = (rows * (n // len(rows) + 1))[:n]
    return datasets.Dataset.from_list(rows)


def worker_trl(sft: str, rm: str, episodes: int, out: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tok = AutoTokenizer.from_pretrained(sft, padding_side="left")
    data = _prompts(tok, 128).map(lambda r: {"input_ids": tok(r["prompt"])["input_ids"]}, remove_columns=["prompt"])
    args = PPOConfig(output_dir=out, total_episodes=episodes, stop_token="eos", report_to="none", save_strategy="no",
                     num_sample_generations=0, bf16=False, gradient_checkpointing=False, logging_steps=10_000,
                     sft_model_path=sft, reward_model_path=rm, **SETTINGS)
    trainer = PPOTrainer(args=args, processing_class=tok, model=AutoModelForCausalLM.from_pretrained(sft),
                         ref_model=AutoModelForCausalLM.from_pretrained(sft),
                         reward_model=AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1),
                         value_model=AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1),
                         train_dataset=data)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return {"episodes": episodes, "seconds": seconds, "eps": episodes / seconds, "peak_rss_mb": peak_rss_mb()}


def worker_hfalign(sft: str, rm: str, episodes: int, out: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from hfalign.ppo import PPOConfig, PPOTrainer

    tok = AutoTokenizer.from_pretrained(sft, padding_side="left")
    args = PPOConfig(output_dir=out, total_episodes=episodes, report_to="none", save_strategy="no",
                     logging_steps=10_000, **SETTINGS, **TRL_WORK)
    trainer = PPOTrainer(args=args, processing_class=tok, model=AutoModelForCausalLM.from_pretrained(sft),
                         reward_model=AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1),
                         value_model=AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1),
                         train_dataset=_prompts(tok, 128))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return {"episodes": episodes, "seconds": seconds, "eps": episodes / seconds, "peak_rss_mb": peak_rss_mb()}


def worker_recipe(overrides: list[str]) -> dict:
    """A whole hfalign PPO stage from recipes/ppo.yaml (the memory runs)."""
    from hfalign import preflight, recipe, stages

    t0 = time.perf_counter()
    stages.run(preflight.check(recipe.load(ROOT / "recipes/ppo.yaml", overrides)))
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


# --- orchestration -----------------------------------------------------------------------------------------------


def run_worker(args: list[str], env: dict | None = None) -> dict | None:
    return workers.run_worker(__file__, args, env, label=f"worker {args[0]}")


def trl112_path() -> str | None:
    target = Path(tempfile.gettempdir()) / "hfalign-bench-trl-1.12.0"
    if not (target / "trl" / "__init__.py").exists():
        proc = subprocess.run([PY, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), "trl==1.12.0"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"  TRL 1.12 cannot be had here: {proc.stderr.strip().splitlines()[-1:]}")
            return None
    return str(target)


def ensure_pipeline() -> tuple[str, str]:
    sft, rm = ROOT / "outputs/sft", ROOT / "outputs/rm"
    for target in ("sft", "rm"):
        if not (ROOT / f"outputs/{target}/hfalign_done.json").exists():
            subprocess.run(["make", target], cwd=ROOT, check=True)
    return str(sft), str(rm)


def speed(episodes: int) -> None:
    print(f"== speed: tiny SFT/RM, full fine-tuning, {episodes} episodes, settings {SETTINGS}")
    sft, rm = ensure_pipeline()
    with tempfile.TemporaryDirectory() as tmp:
        ours = run_worker(["hfalign", sft, rm, str(episodes), tmp + "/h"])
        trl_dir = trl112_path()
        theirs = run_worker(["trl", sft, rm, str(episodes), tmp + "/t"], env={"PYTHONPATH": trl_dir}) if trl_dir else None
    print(f"  hfalign          {ours['eps']:8.1f} episodes/s  ({ours['seconds']:.1f} s)" if ours else "  hfalign failed")
    if theirs:
        print(f"  TRL 1.12         {theirs['eps']:8.1f} episodes/s  ({theirs['seconds']:.1f} s)")
    if ours and theirs:
        print(f"  ratio hfalign / TRL 1.12: {ours['eps'] / theirs['eps']:.2f}x episodes/s (target >= 1.5x)")


def memory() -> None:
    from transformers import AutoModelForSequenceClassification

    from hfalign.demo.tiny import build_tiny

    print("== memory: ~100M-parameter LLaMA, 2 PPO updates of 8 prompts")
    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny(Path(tmp) / "base", size="100m")
        n = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).parameters())
        print(f"  model: {n / 1e6:.0f}M parameters ({n * 4 / 2**20:.0f} MiB in fp32)")
        rm_adapter = _reward_adapter(base, Path(tmp) / "rm_adapter")
        common = ["train.total_episodes=16", "train.per_device_train_batch_size=4", "train.num_mini_batches=2",
                  "train.num_ppo_epochs=1", "train.response_length=16", "train.num_eval_prompts=4",
                  "train.save_strategy=no", "callbacks=[metrics]", f"model.name_or_path={base}"]
        shared = run_worker(["recipe", *common, f"output_dir={tmp}/shared", "lora.enabled=true", "lora.r=16",
                             f"reward.model={rm_adapter}"])
        full = run_worker(["recipe", *common, f"output_dir={tmp}/full", f"reward.model={base}"])
        trl_dir = trl112_path()
        trl = run_worker(["trl", str(base), str(base), "16", f"{tmp}/t", "--small"], env={"PYTHONPATH": trl_dir}) if trl_dir else None
    runs = {"hfalign LoRA shared base": shared, "hfalign full, four copies": full, "TRL 1.12, four copies": trl}
    for label, result in runs.items():
        if result:
            print(f"  {label:28} peak RSS {result['peak_rss_mb']:8.0f} MiB")
    baseline = trl or full  # the target is against TRL 1.12; hfalign's own four-copy mode when TRL cannot be had
    if shared and baseline:
        name = "TRL 1.12" if trl else "hfalign full mode"
        print(f"  ratio shared / {name} four copies: {shared['peak_rss_mb'] / baseline['peak_rss_mb']:.2f}x peak RSS "
              "(target <= 0.35x)")


def _reward_adapter(base: Path, out: Path) -> Path:
    """An (untrained) LoRA reward adapter on the same base, saved as the rm stage saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", task_type="SEQ_CLS")).save_pretrained(out)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "recipe":
            result = worker_recipe(rest)
        else:
            sft, rm, episodes, out = rest[:4]
            if "--small" in rest:  # the memory run's settings
                SETTINGS.update(per_device_train_batch_size=4, num_mini_batches=2, num_ppo_epochs=1, response_length=16)
            result = (worker_trl if kind == "trl" else worker_hfalign)(sft, rm, int(episodes), out)
        workers.result(result)
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["speed", "memory", "all"], default="all")
    parser.add_argument("--episodes", type=int, default=1024)
    a = parser.parse_args()
    if a.part in ("speed", "all"):
        speed(a.episodes)
    if a.part in ("memory", "all"):
        memory()


if __name__ == "__main__":
    main()
