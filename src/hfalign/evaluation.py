"""`hfalign eval RUN_DIR [RUN_DIR ...] [--data FILE] [--prompts N] [--json OUT]`: finished runs measured again,
side by side.

    rm   accuracy (chosen scored above rejected), mean margin, loss and mean reward on a preference file (default: the
         run's own eval set), through trl.RewardTrainer.evaluate -- the computation the RM stage's summary ran
    ppo  the PPO policy and its reference (the SFT policy) on held-out prompts (default: the run's eval prompts):
         reward score, the recipe's rule objective and well-formed share, KL to the reference, EOS rate, length --
         the stage's own before/after sampling (hfalign.stages.ppo), seeded as it was

Each run is rebuilt from its recipe.resolved.yaml (the same models, data, tokenizer, seed and reward), with the trained
weights put in: so with the run's own data the numbers equal its summary.json, and with --data the runs are compared
on one file. Nothing is written into the run directories.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from hfalign.errors import UserError

RM_KEYS = ("pairs", "accuracy", "margin", "loss", "mean_reward")
PPO_KEYS = ("prompts", "score", "objective", "well_formed", "kl", "eos_rate", "mean_chars")


def evaluate(runs: list[str], data: str | None = None, prompts: int | None = None) -> list[dict]:
    """One row per measured model: {"run", "stage", "model", metrics...}; a PPO run gives two (reference, policy)."""
    from hfalign.rundir import read_run

    resolved = {run: read_run(Path(run), finished=True) for run in runs}  # every run checked before any model loads
    for run, r in resolved.items():
        if r["stage"] not in ("rm", "ppo"):
            raise UserError(f"{run} is a {r['stage']} run; eval measures reward models (rm) and policies (ppo).",
                            fix="an SFT model is the 'reference' row of the PPO run trained from it")
    if data is not None and not Path(data).is_file():
        raise UserError(f"--data file {data!r} does not exist.", fix="give a .jsonl/.json/.parquet/.csv file")
    rows = []
    for run in runs:
        work = Path(tempfile.mkdtemp(prefix="hfalign-eval-"))  # the trainer's output_dir: the run stays untouched
        try:
            rows += _evaluate_run(Path(run), resolved[run], work, data, prompts)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return rows


def _checked(run: Path, work: Path, data: str | None, extra: list[str]):
    """The run's resolved recipe, re-checked (data rows read, every key typed), writing into `work`."""
    from hfalign import preflight, recipe

    overrides = [f"output_dir={work}", "train.report_to=none", *extra]
    if data is not None:
        overrides += [f"data.eval={Path(data).resolve()}", "data.eval_fraction=0"]
    return preflight.check(recipe.load(run / "recipe.resolved.yaml", overrides))


def _evaluate_run(run: Path, resolved: dict, work: Path, data: str | None, prompts: int | None) -> list[dict]:
    from transformers import set_seed

    from hfalign import data as data_mod
    from hfalign import models, stages, trainargs

    stage_name = resolved["stage"]
    extra = [f"train.num_eval_prompts={prompts}"] if prompts and stage_name == "ppo" else []
    checked = _checked(run, work, data, extra)
    r, stage = checked.recipe, stages.get(stage_name)
    args = trainargs.build(r, stage.config_class())
    tokenizer = models.load_tokenizer(r.model)
    train_set, eval_set = data_mod.load(r.data, r.stage, stage.FORMATS, checked.rows)
    set_seed(args.seed)
    if stage_name == "rm":
        return [_evaluate_rm(run, resolved, r, args, tokenizer, eval_set)]
    return _evaluate_ppo(run, r, args, tokenizer, train_set, eval_set)


def _evaluate_rm(run: Path, resolved: dict, r, args, tokenizer, eval_set) -> dict:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import RewardTrainer

    from hfalign.export import load_run_model

    if eval_set is None:
        raise UserError(f"{run} was trained without an eval set, so there is no preference file to measure on.",
                        fix="give one: hfalign eval RUN --data pairs.jsonl (rows: prompt, chosen, rejected)")
    model = load_run_model(run, resolved, tokenizer)  # full, or base + SFT adapter + reward adapter, merged
    # (TRL requires a train set; the eval set stands in, nothing trains)
    trainer = RewardTrainer(model=model, args=args, train_dataset=eval_set, eval_dataset=eval_set,
                            processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # the row below is the output
    trainer.remove_callback(ProgressCallback)
    m = trainer.evaluate()
    return {"run": str(run), "stage": "rm", "model": "reward model", "pairs": len(eval_set),
            **{k: m[f"eval_{k}"] for k in RM_KEYS[1:]}}


def _evaluate_ppo(run: Path, r, args, tokenizer, train_set, eval_set) -> list[dict]:
    from hfalign.stages import ppo

    trainer = ppo.trainer(r, args, tokenizer, train_set, eval_set, callbacks=[])  # policy = reference = SFT model
    load_policy(trainer.model, run)
    out = []
    for role, name in (("ref", "reference (SFT)"), ("policy", "PPO policy")):
        stats = ppo.sample_stats(r, trainer, role)
        out.append({"run": str(run), "stage": "ppo", "model": name,
                    **{k: stats[k] for k in PPO_KEYS if k in stats}, "examples": stats["examples"]})
    return out


def load_policy(wrapper, run: Path) -> None:
    """The PPO run's trained policy into a freshly built PolicyAndValue: its LoRA adapter into the shared base's
    'default' adapter, or its full weights into the policy. Every saved tensor must land."""
    from safetensors.torch import load_file

    if wrapper.shared:
        from peft import load_peft_weights, set_peft_model_state_dict

        result = set_peft_model_state_dict(wrapper.policy, load_peft_weights(str(run)), adapter_name="default")
        unexpected = result.unexpected_keys
        missing = [k for k in result.missing_keys if "lora_" in k and ".default." in k]
    else:
        state = {}
        for path in sorted(run.glob("model*.safetensors")):
            state.update(load_file(path))
        result = wrapper.policy.load_state_dict(state, strict=False)
        unexpected = result.unexpected_keys
        tied = wrapper.policy.config.get_text_config().tie_word_embeddings
        missing = [k for k in result.missing_keys if not (tied and k.startswith("lm_head."))]
    if unexpected or missing:
        raise UserError(f"{run}'s policy weights do not fit the model its recipe builds: {len(missing)} missing "
                        f"(e.g. {missing[:2]}), {len(unexpected)} unknown (e.g. {unexpected[:2]}).",
                        fix="evaluate the run with the models its recipe.resolved.yaml names (were they replaced?)")


def format_table(rows: list[dict]) -> str:
    """One table per stage: a row per model, a column per metric."""
    blocks = []
    for stage, keys in (("rm", RM_KEYS), ("ppo", PPO_KEYS)):
        mine = [row for row in rows if row["stage"] == stage]
        if not mine:
            continue
        keys = [k for k in keys if any(k in row for row in mine)]
        width = max(len(f"{row['run']}  {row['model']}") for row in mine) + 2
        lines = [f"{'run  model':<{width}}" + "".join(f"{k:>12}" for k in keys)]
        for row in mine:
            cells = "".join(f"{_cell(row.get(k)):>12}" for k in keys)
            lines.append(f"{row['run'] + '  ' + row['model']:<{width}}{cells}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _cell(value) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def write_json(rows: list[dict], path: str) -> None:
    from hfalign.rundir import atomic_write

    atomic_write(Path(path), json.dumps(rows, indent=2) + "\n")
