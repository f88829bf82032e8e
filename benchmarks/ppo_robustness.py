"""PPO across tasks and seeds with the shipped templates: does it improve the true objective without collapsing?

    .venv/bin/python benchmarks/ppo_robustness.py                       # 3 tasks x 3 seeds, about 10 min on 2 cores
    .venv/bin/python benchmarks/ppo_robustness.py --tasks lists --seeds 0
    .venv/bin/python benchmarks/ppo_robustness.py --ppo train.kl_coef=0.05 train.adaptive_kl=false   # a variant
    .venv/bin/python benchmarks/ppo_robustness.py --recipes recipes/lora [--variant -qlora]   # LoRA / QLoRA
    .venv/bin/python benchmarks/ppo_robustness.py --estimator rloo [--generations 4]          # a critic-free estimator
    .venv/bin/python benchmarks/ppo_robustness.py --keep /tmp/suite --estimator grpo   # reuse SFT and RM of a run

For every task of hfalign.demo (reviews = the embedded default, lists, slots) and seed: build the task's tiny model,
write its data, then run recipes/sft.yaml -> recipes/rm.yaml -> recipes/ppo.yaml overriding only the model and data
paths, the seed, and the task's rule (summary.objective / summary.well_formed). Prints RM eval accuracy, KL to the
SFT policy, and the true objective and well-formed rate before (SFT) and after (PPO), per seed, and whether the
target holds: objective above the SFT's, well-formed >= 0.95 and >= the SFT's - 0.03. `--ppo KEY=VALUE ...` overrides
the PPO recipe: how the defaults were compared with other settings. `--recipes recipes/lora` runs the LoRA recipes
instead (their RM and PPO stack adapters on one base): the tiny model is then pretrained first (`build-tiny
--pretrain 300`), as those recipes expect. `--estimator E` sets train.advantage_estimator (and num_generations, 4 by
default for the group estimators) on the same PPO recipe, reward model and episodes, so estimators compare like for
like; every row also gives the PPO stage's wall time and peak memory (max RSS of its process, from /usr/bin/time).
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
from hfalign.ppo.advantages import ESTIMATORS
from hfalign.ppo.plan import GROUPED
from hfalign.recipe import load_tree

ROOT = Path(__file__).resolve().parents[1]


TIME = "/usr/bin/time"  # GNU time: the wall time and peak RSS of one stage's process


def hfalign(*args: str) -> tuple[float, float]:
    """Run one hfalign command; (wall seconds, peak RSS MiB), the latter nan without GNU time."""
    measure = [TIME, "-f", "HFALIGN_MEASURED %e %M"] if Path(TIME).is_file() else []
    t0 = time.perf_counter()
    proc = subprocess.run([*measure, sys.executable, "-m", "hfalign", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"hfalign {' '.join(args[:2])} failed: {proc.stderr.strip().splitlines()[-3:]}")
    lines = [ln.split() for ln in proc.stderr.splitlines() if ln.startswith("HFALIGN_MEASURED")]
    if lines:
        return float(lines[-1][1]), float(lines[-1][2]) / 1024
    return time.perf_counter() - t0, float("nan")


def run(task: str, seed: int, tmp: Path, ppo: list[str], recipes: str = "recipes", variant: str = "",
        answers: int = 384, label: str = "ppo") -> dict:
    work = tmp / f"{Path(recipes).name}{variant}-{task}-{seed}"
    data, model = work / "data", work / "model"
    sft, rm, ppo_recipe = (f"{recipes}/{stage}{variant}.yaml" for stage in ("sft", "rm", "ppo"))
    lora = bool((load_tree(ROOT / rm).get("model") or {}).get("adapter"))  # adapters stacked on one base
    done = lambda stage: (work / stage / "hfalign_done.json").is_file()  # noqa: E731 (--keep: built by an earlier run)
    if not done("rm"):
        hfalign("make-data", str(data), "--task", task)
        hfalign("build-tiny", str(model), "--task", task, *(["--pretrain", "300"] if lora else []))
    common = [f"train.seed={seed}"]
    # the later stages start from the SFT model, or (LoRA) from the base with the SFT adapter
    after_sft = [f"model.name_or_path={model}", f"model.adapter={work / 'sft'}"] if lora else \
        [f"model.name_or_path={work / 'sft'}"]
    if not done("sft"):
        hfalign("train", sft, f"output_dir={work / 'sft'}", f"model.name_or_path={model}",
                f"data.train={data / 'sft_train.jsonl'}", f"data.eval={data / 'sft_eval.jsonl'}", *common)
    if not done("rm"):
        hfalign("train", rm, f"output_dir={work / 'rm'}", *after_sft,
                f"data.train={data / 'rm_train.jsonl'}", f"data.eval={data / 'rm_eval.jsonl'}", *common)
    rule = TASKS[task]
    out = work / label
    if out.exists():
        import shutil

        shutil.rmtree(out)
    seconds, peak = hfalign("train", ppo_recipe, f"output_dir={out}", *after_sft,
            f"reward.model={work / 'rm'}", f"data.train={data / 'ppo_prompts.jsonl'}",
            f"data.eval={data / 'ppo_eval_prompts.jsonl'}", f"summary.objective={rule}:objective",
            f"summary.well_formed={rule}:well_formed", f"train.num_eval_prompts={answers}", *common, *ppo)
    rm_logs = [json.loads(ln) for ln in (work / "rm" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["before (reference)"], summary["after (policy)"]
    ppo_logs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    rollbacks = sum(1 for r in ppo_logs if any(k.startswith("guard/") for k in r))
    return {"rm_acc": [r for r in rm_logs if "eval_accuracy" in r][-1]["eval_accuracy"], "kl": after["kl"],
            "obj0": before["objective"], "obj1": after["objective"], "wf0": before["well_formed"],
            "wf1": after["well_formed"], "guards": rollbacks, "seconds": seconds, "peak": peak}


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
    p.add_argument("--estimator", choices=ESTIMATORS, help="train.advantage_estimator for the PPO stage")
    p.add_argument("--generations", type=int, help="train.num_generations (default: 4 for rloo, grpo, dr_grpo, "
                   "reinforce_pp_baseline; 1 otherwise)")
    p.add_argument("--keep", help="a directory that keeps each task and seed's data, SFT and RM between runs: an "
                   "estimator comparison trains them once (default: a temporary directory)")
    a = p.parse_args()
    if a.estimator:
        k = a.generations or (4 if a.estimator in GROUPED else 1)
        a.ppo = [f"train.advantage_estimator={a.estimator}", f"train.num_generations={k}", *a.ppo]
    if a.ppo or a.recipes != "recipes" or a.variant:
        print(f"{a.recipes}/{{sft,rm,ppo}}{a.variant}.yaml", "with " + " ".join(a.ppo) if a.ppo else "")
    print(f"objective and well-formed on {a.answers} held-out answers before and after PPO")
    print("| task | seed | RM acc | KL | objective SFT -> PPO | well-formed SFT -> PPO | guard trips | PPO s | peak MiB "
          "| target |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    results, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for task in a.tasks:
            for seed in a.seeds:
                try:
                    r = run(task, seed, Path(a.keep or tmp), a.ppo, a.recipes, a.variant, a.answers,
                            a.estimator or "ppo")
                except RuntimeError as e:
                    print(f"| {task} | {seed} | failed: {e} |||||||")
                    continue
                print(f"| {task} | {seed} | {r['rm_acc']:.2f} | {r['kl']:.1f} | {r['obj0']:.2f} -> {r['obj1']:.2f} | "
                      f"{r['wf0']:.2f} -> {r['wf1']:.2f} | {r['guards']} | {r['seconds']:.0f} | {r['peak']:.0f} | "
                      f"{'holds' if holds(r) else 'MISSED'} |", flush=True)
                results.append((holds(r), r["seconds"], r["peak"], r["obj1"] - r["obj0"], r["wf1"], r["kl"]))
    n = len(results)
    print(f"\ntarget held in {sum(x[0] for x in results)} of {n} runs ({time.perf_counter() - t0:.0f} s)")
    if n:
        mean = lambda i: sum(x[i] for x in results) / n  # noqa: E731
        print(f"means: objective gain {mean(3):+.2f}, well-formed {mean(4):.2f}, KL {mean(5):.1f}, PPO stage "
              f"{mean(1):.0f} s, peak {max(x[2] for x in results):.0f} MiB (max)")


if __name__ == "__main__":
    main()
