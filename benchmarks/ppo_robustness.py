"""PPO across tasks and seeds with the shipped templates: does it improve the true objective without collapsing?

    .venv/bin/python benchmarks/ppo_robustness.py                       # 3 tasks x 3 seeds, about 10 min on 2 cores
    .venv/bin/python benchmarks/ppo_robustness.py --tasks lists --seeds 0
    .venv/bin/python benchmarks/ppo_robustness.py --ppo train.kl_coef=0.05 train.adaptive_kl=false   # a variant
    .venv/bin/python benchmarks/ppo_robustness.py --recipes recipes/lora [--variant -qlora]   # LoRA / QLoRA

For every task of hfalign.demo (reviews = the embedded default, lists, slots) and seed: build the task's tiny model,
write its data, then run recipes/sft.yaml -> recipes/rm.yaml -> recipes/ppo.yaml overriding only the model and data
paths, the seed, and the task's rule (summary.objective / summary.well_formed). Prints RM eval accuracy, KL to the
SFT policy, and the true objective and well-formed rate before (SFT) and after (PPO), per seed, and whether the
target holds: objective above the SFT's, well-formed >= 0.95 and >= the SFT's - 0.03. `--ppo KEY=VALUE ...` overrides
the PPO recipe: how the defaults were compared with other settings. `--recipes recipes/lora` runs the LoRA recipes
instead (their RM and PPO stack adapters on one base): the tiny model is then pretrained first (`build-tiny
--pretrain 300`), as those recipes expect.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hfalign.demo import TASKS  # task name -> the module holding its rules
from hfalign.recipe import load_tree

ROOT = Path(__file__).resolve().parents[1]


def hfalign(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "hfalign", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"hfalign {' '.join(args[:2])} failed: {proc.stderr.strip().splitlines()[-3:]}")


def run(task: str, seed: int, tmp: Path, ppo: list[str], recipes: str = "recipes", variant: str = "",
        answers: int = 384) -> dict:
    work = tmp / f"{task}-{seed}"
    data, model = work / "data", work / "model"
    sft, rm, ppo_recipe = (f"{recipes}/{stage}{variant}.yaml" for stage in ("sft", "rm", "ppo"))
    lora = bool((load_tree(ROOT / rm).get("model") or {}).get("adapter"))  # adapters stacked on one base
    hfalign("make-data", str(data), "--task", task)
    hfalign("build-tiny", str(model), "--task", task, *(["--pretrain", "300"] if lora else []))
    common = [f"train.seed={seed}"]
    # the later stages start from the SFT model, or (LoRA) from the base with the SFT adapter
    after_sft = [f"model.name_or_path={model}", f"model.adapter={work / 'sft'}"] if lora else \
        [f"model.name_or_path={work / 'sft'}"]
    hfalign("train", sft, f"output_dir={work / 'sft'}", f"model.name_or_path={model}",
            f"data.train={data / 'sft_train.jsonl'}", f"data.eval={data / 'sft_eval.jsonl'}", *common)
    hfalign("train", rm, f"output_dir={work / 'rm'}", *after_sft,
            f"data.train={data / 'rm_train.jsonl'}", f"data.eval={data / 'rm_eval.jsonl'}", *common)
    rule = TASKS[task]
    hfalign("train", ppo_recipe, f"output_dir={work / 'ppo'}", *after_sft,
            f"reward.model={work / 'rm'}", f"data.train={data / 'ppo_prompts.jsonl'}",
            f"data.eval={data / 'ppo_eval_prompts.jsonl'}", f"summary.objective={rule}:objective",
            f"summary.well_formed={rule}:well_formed", f"train.num_eval_prompts={answers}", *common, *ppo)
    rm_logs = [json.loads(ln) for ln in (work / "rm" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((work / "ppo" / "summary.json").read_text())
    before, after = summary["before (reference)"], summary["after (policy)"]
    ppo_logs = [json.loads(ln) for ln in (work / "ppo" / "metrics.jsonl").read_text().splitlines()]
    rollbacks = sum(1 for r in ppo_logs if any(k.startswith("guard/") for k in r))
    return {"rm_acc": [r for r in rm_logs if "eval_accuracy" in r][-1]["eval_accuracy"], "kl": after["kl"],
            "obj0": before["objective"], "obj1": after["objective"], "wf0": before["well_formed"],
            "wf1": after["well_formed"], "guards": rollbacks}


def holds(r: dict) -> bool:
    return r["obj1"] > r["obj0"] and r["wf1"] >= 0.95 and r["wf1"] >= r["wf0"] - 0.03


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--ppo", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the PPO recipe")
    p.add_argument("--recipes", default="recipes", help="recipe directory (recipes/lora: LoRA on a pretrained base)")
    p.add_argument("--variant", default="", help="recipe file suffix, e.g. -qlora")
    p.add_argument("--answers", type=int, default=384, help="held-out answers sampled before and after PPO (the "
                   "recipe's 96 give the well-formed rate +-0.02 at 0.95: one or two answers decided a run)")
    a = p.parse_args()
    if a.ppo or a.recipes != "recipes" or a.variant:
        print(f"{a.recipes}/{{sft,rm,ppo}}{a.variant}.yaml", "with " + " ".join(a.ppo) if a.ppo else "")
    print(f"objective and well-formed on {a.answers} held-out answers before and after PPO")
    print("| task | seed | RM acc | KL | objective SFT -> PPO | well-formed SFT -> PPO | guard trips | target |")
    print("|---|---|---|---|---|---|---|---|")
    results, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for task in a.tasks:
            for seed in a.seeds:
                try:
                    r = run(task, seed, Path(tmp), a.ppo, a.recipes, a.variant, a.answers)
                except RuntimeError as e:
                    print(f"| {task} | {seed} | failed: {e} |||||")
                    continue
                results.append(holds(r))
                print(f"| {task} | {seed} | {r['rm_acc']:.2f} | {r['kl']:.1f} | {r['obj0']:.2f} -> {r['obj1']:.2f} | "
                      f"{r['wf0']:.2f} -> {r['wf1']:.2f} | {r['guards']} | {'holds' if holds(r) else 'MISSED'} |",
                      flush=True)
    print(f"\ntarget held in {sum(results)} of {len(results)} runs ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
