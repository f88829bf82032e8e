"""hfalign's command line.

    hfalign train RECIPE [key.sub=value ...]     train the recipe's stage (also: python -m hfalign RECIPE ...)
    hfalign validate RECIPE [overrides] [--full] every check, no model or torch loaded (--full: the trainer config
                                                 class's own rules too, as a run's start does); exit 2 on a mistake
    hfalign show RECIPE [overrides]              print the resolved recipe
    hfalign schema                               every recipe key with its type, default and meaning
    hfalign build-tiny [DIR] [--task T] [--family F] [--pretrain N]  build a demo task's tiny model (default:
                                                 models/tiny-llama; F: llama (default), llama2, llama3, glm, glm4, qwen2;
                                                 N steps of pretraining on the task's text: a base for LoRA;
                                                 --tie: tied embeddings; --zero-unseen: LLaMA-3-base-like rows)
    hfalign make-data [DIR] [--task T] [--chat]  write a demo task's data files (default: the embedded default, data/;
                                                 --chat: as conversations, the rows a chat template renders)
    hfalign new DIR --from TEMPLATE [--model M] [--data D]   a recipe directory of your own from a shipped one: run
                                                 paths -> outputs/DIR, model.name_or_path -> M, data -> D's files
    hfalign convert chatglm SRC OUT              a ChatGLM2/3 checkpoint (dir or hub id) as transformers' native GLM
    hfalign plot RUN_DIR [RUN_DIR ...] [--out D] a run's curves and report.md again; several runs overlaid in D
    hfalign generate RUN_DIR "prompt" [...]      sample from an SFT or PPO run (chat template as it was trained)
    hfalign export RUN_DIR OUT [--dtype bf16]    a run (LoRA adapters merged, stacked ones too) as one full model
    hfalign eval RUN_DIR [...] [--data F] [--prompts N] [--json OUT]   reward models' accuracy/margin, policies'
                                                 score/objective/KL/length vs their reference, runs side by side
    hfalign launch [accelerate options] RECIPE [overrides]   check, then accelerate launch -m hfalign (exit 2 on a
                                                 mistake, before any process starts)

User mistakes print one line `hfalign: error: ...` and exit 2; there is no traceback for them.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from hfalign.errors import UserError

COMMANDS = ("train", "validate", "show", "schema", "build-tiny", "make-data", "new", "convert", "plot", "generate", "export", "eval",
            "launch", "serve-reward")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hfalign", description="SFT -> reward model -> PPO from YAML recipes.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("train", "train the recipe's stage"), ("validate", "check a recipe, load no model"),
                       ("show", "print the resolved recipe")):
        s = sub.add_parser(name, help=text)
        s.add_argument("recipe")
        s.add_argument("overrides", nargs="*", help="dotted key=value, value parsed as YAML")
        if name == "validate":
            s.add_argument("--full", action="store_true", help="also let the trainer config class judge train: as a "
                                                               "whole (as every run's start does; imports torch, ~4 s)")
    sub.add_parser("schema", help="print every recipe key")
    from hfalign.demo import TASKS
    from hfalign.demo.tiny import TINY_FAMILIES

    for name, default in (("build-tiny", "models/tiny-llama"), ("make-data", "data")):
        s = sub.add_parser(name)
        s.add_argument("dir", nargs="?", default=default)
        s.add_argument("--task", default="reviews", choices=list(TASKS), help="demo task (hfalign.demo)")
        s.add_argument("--seed", type=int, default=0)
        if name == "build-tiny":
            s.add_argument("--family", default="llama", choices=list(TINY_FAMILIES),
                           help="what the model imitates: config class, special tokens, chat template")
            s.add_argument("--pretrain", type=int, default=0, metavar="N",
                           help="pretrain N steps on the task's text (a pretrained base, as LoRA expects)")
            s.add_argument("--tie", action="store_true",
                           help="tie input and output embeddings (as Qwen2.5 <= 3B, LLaMA-3.2 1B/3B and Gemma ship)")
            s.add_argument("--zero-unseen", action="store_true",
                           help="with --pretrain: documents end with the end-of-text token and the rows of tokens "
                                "pretraining never saw stay zero (LLaMA-3 base's chat header tokens)")
        else:
            s.add_argument("--chat", action="store_true", help="rows as conversations (messages; chosen/rejected "
                                                               "conversations; prompts as a user turn)")
    s = sub.add_parser("new", help="a recipe directory of your own, from a shipped one (run paths rewritten)")
    s.add_argument("dir", help="the new recipe directory, e.g. my (its runs go to outputs/my/<stage>)")
    s.add_argument("--from", dest="template", required=True, help="a recipe directory: recipes/llama3, recipes/lora, ...")
    s.add_argument("--model", help="model.name_or_path of every stage (a hub id or a local directory)")
    s.add_argument("--data", help="a directory of make-data files: each stage's data block points at them")
    s = sub.add_parser("plot", help="draw runs' curves (PNG) and, for one run, its report.md")
    s.add_argument("runs", nargs="+", help="run directories (output_dir of finished or running runs)")
    s.add_argument("--out", default="plots-compare", help="where several runs' overlaid plots go")
    s = sub.add_parser("generate", help="sample from a trained SFT or PPO run")
    s.add_argument("run")
    s.add_argument("prompts", nargs="+")
    s.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's response_length, else 128")
    s.add_argument("--temperature", type=float, default=None, help="default: the run's, else 0.7; 0 = greedy")
    s.add_argument("--seed", type=int, default=0)
    chat = s.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None, help="apply the chat template")
    chat.add_argument("--raw", dest="chat", action="store_false", help="the prompt as it is, no chat template")
    s = sub.add_parser("export", help="a finished run as one full model (adapters merged)")
    s.add_argument("run")
    s.add_argument("out")
    s.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    s = sub.add_parser("eval", help="measure finished rm/ppo runs again, side by side")
    s.add_argument("runs", nargs="+", help="finished rm or ppo run directories")
    s.add_argument("--data", default=None, help="one file for every run: preference pairs (rm) or prompts (ppo); "
                                                "default: each run's own eval set")
    s.add_argument("--prompts", type=int, default=None, help="ppo: completions to sample (default: the run's num_eval_prompts)")
    s.add_argument("--json", default=None, metavar="OUT", help="also write the rows as JSON")
    s = sub.add_parser("serve-reward", help="serve a reward model over HTTP (reward.url in a PPO recipe)")
    s.add_argument("model", help="a reward model directory (an rm run's output_dir)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--host", default="127.0.0.1", help="127.0.0.1: this machine only; 0.0.0.0: every interface")
    s.add_argument("--tokenizer", default=None, help="the model's tokenizer, when not in its directory")
    s.add_argument("--batch-size", type=int, default=16, help="completions per forward pass")
    s.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    s = sub.add_parser("convert", help="convert a checkpoint to a native transformers architecture")
    s.add_argument("kind", choices=["chatglm"], help="chatglm: ChatGLM2/ChatGLM3 (remote code) -> native GLM")
    s.add_argument("src", help="checkpoint directory or hub id")
    s.add_argument("out", help="output directory (must not hold a model)")
    return p


def serve_reward(args) -> int:
    from hfalign import rewards
    from hfalign.errors import UserError

    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise UserError(f"{args.model} is not a model directory (no config.json).",
                        fix="give a reward model directory, e.g. outputs/rm after make rm")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    scorer = rewards.ModelScorer.load(args.model, args.tokenizer, device=device, batch_size=args.batch_size)
    rewards.serve(scorer, args.host, args.port, name=args.model)
    return 0


def validate(path: str, overrides: list[str], judge: bool = True):
    """Everything checkable before a model loads (preflight.check): the checked recipe and its data rows. `judge`:
    the trainer config class judges train: too (imports the trainer stack; `validate` and `show` leave it to the run)."""
    from hfalign import preflight, recipe

    return preflight.check(recipe.load(path, overrides), judge)


def _run(argv: list[str]) -> int:
    if argv and argv[0] not in COMMANDS and (argv[0].endswith((".yaml", ".yml")) or os.path.isfile(argv[0])):
        argv = ["train", *argv]  # python -m hfalign RECIPE ... (what `accelerate launch -m hfalign` runs)
    if argv and argv[0] == "launch":  # its options are accelerate's: passed on, not parsed here
        from hfalign.launch import launch

        return launch(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "schema":
        from hfalign.recipe import Recipe
        from hfalign.schema import describe_schema

        print("\n".join(describe_schema(Recipe)))
        print("train.*  fields of the stage's config class (trl.SFTConfig, trl.RewardConfig, hfalign PPOConfig)")
        return 0
    if args.command == "build-tiny":
        from hfalign.demo.tiny import build_tiny

        out = build_tiny(args.dir, seed=args.seed, task=args.task, family=args.family, pretrain_steps=args.pretrain,
                         tie_embeddings=args.tie, zero_unseen=args.zero_unseen)
        print(f"built {out}")
        return 0
    if args.command == "plot":
        from pathlib import Path

        from hfalign import report

        runs = [Path(r) for r in args.runs]
        if len(runs) == 1:
            print(f"wrote {report.write_report(runs[0])} and {runs[0] / 'plots'}")
        else:
            for path in report.plot(runs, Path(args.out)):
                print(f"wrote {path}")
        return 0
    if args.command == "generate":
        from hfalign.generate import generate

        for prompt, text in zip(args.prompts, generate(args.run, args.prompts, args.max_new_tokens, args.temperature,
                                                       args.seed, args.chat)):
            print(f"{prompt}\n  -> {text}")
        return 0
    if args.command == "export":
        from hfalign.export import export

        print(f"exported {args.run} -> {export(args.run, args.out, args.dtype)} ({args.dtype})")
        return 0
    if args.command == "eval":
        from hfalign import evaluation

        rows = evaluation.evaluate(args.runs, args.data, args.prompts)
        print(evaluation.format_table(rows))
        if args.json:
            evaluation.write_json(rows, args.json)
            print(f"wrote {args.json}")
        return 0
    if args.command == "serve-reward":
        return serve_reward(args)
    if args.command == "convert":
        from hfalign.convert import convert_chatglm

        print(f"converted {args.src} -> {convert_chatglm(args.src, args.out)} (transformers' native glm)")
        return 0
    if args.command == "make-data":
        from hfalign.demo import write_data

        for path in write_data(args.task, args.dir, args.seed, chat=args.chat):
            print(f"wrote {path}")
        return 0
    if args.command == "new":
        from hfalign.scaffold import new

        written = new(args.dir, args.template, args.model, args.data)
        print(f"wrote {', '.join(p.name for p in written)} in {args.dir}/ (runs: outputs/{os.path.basename(os.path.normpath(args.dir))}/<stage>)")
        first = next((p for p in written if p.name == "sft.yaml"), written[0])
        print(f"next: hfalign validate {first}   then   make ppo RECIPES={args.dir}")
        return 0
    checked = validate(args.recipe, args.overrides, judge=args.command == "train" or getattr(args, "full", False))
    r = checked.recipe
    if args.command == "validate":
        print(f"ok: {args.recipe} is a valid {r.stage} recipe (output_dir {r.output_dir})")
        from hfalign import stages

        describe = getattr(stages.get(r.stage), "describe", None)  # a stage may say what the run will do
        if describe and describe(checked.recipe, checked.rows):
            print(describe(checked.recipe, checked.rows))
        return 0
    if args.command == "show":
        from hfalign.rundir import resolved

        print(yaml.safe_dump(resolved(r), sort_keys=False), end="")
        return 0
    from hfalign import stages

    stages.run(checked)
    return 0


def _leave_distributed(code: int) -> None:
    """End a distributed run without interpreter teardown. Left to exit normally, a rank sometimes aborted
    ('terminate called without an active exception', exit -6) after a finished 2-process ZeRO-3 run on CPU,
    turning a good run red. All files are written by now; Python's exit handlers (wandb, tensorboard) still run."""
    import atexit

    if "torch" not in sys.modules:  # nothing imported torch (validate, show, schema): no process group either
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if code == 0:
        dist.barrier()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    from hfalign.console import quiet

    quiet()  # before any library import: their noise is printed at import time
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = _run(argv)
    except UserError as e:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"hfalign: error: {e.format()}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("hfalign: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        code = 130
    _leave_distributed(code)
    sys.exit(code)
