"""The stages, and the one run() they all share.

A stage module declares only what is particular to it:

    FORMATS                       the data formats its rows may take (keys of data.FORMATS)
    config_class()                its trainer config class (trl.SFTConfig, trl.RewardConfig, hfalign PPOConfig)
    check(recipe, rows)           its own checks before any model loads (rows: what data.check read)
    trainer(recipe, args, tokenizer, train_set, eval_set, callbacks)   its model(s) and Trainer
    summarize(recipe, trainer, eval_set)   optional: the summary after training (default: evaluate on eval_set)

Adding a stage (say DPO) = one module with those + one line in STAGES. Stage modules import their trainer
libraries inside functions, so importing this registry stays cheap.
"""

from __future__ import annotations

from pathlib import Path

from hfalign.errors import UserError
from hfalign.stages import ppo, rm, sft

STAGES = {"sft": sft, "rm": rm, "ppo": ppo}


def get(name):
    if name not in STAGES:
        raise UserError(f"'stage' must be one of {', '.join(STAGES)}, got {name!r}.", fix=f"set stage: {' | '.join(STAGES)}")
    return STAGES[name]


def run(checked) -> dict:
    """Train a checked recipe's stage (preflight.check made `checked`): the same steps for every stage."""
    from transformers import set_seed

    from hfalign import callbacks, data, models, rundir, trainargs

    recipe = checked.recipe
    stage = get(recipe.stage)

    # 1. Trainer config and run directory (refuse clobber; find the checkpoint to resume from)
    args = trainargs.build(recipe, stage.config_class())
    resume_from = rundir.prepare(recipe, is_main=args.process_index == 0, logs=callbacks.LOG_FILES)

    # 2. Tokenizer
    tokenizer = models.load_tokenizer(recipe.model)

    # 3. Data (local files were read and checked by preflight; not read again)
    train_set, eval_set = data.load(recipe.data, recipe.stage, stage.FORMATS, checked.rows)

    # 4. The stage's model(s) and trainer, with the recipe's callbacks; seeded first, because LoRA adapters and fresh
    #    heads are initialised while the models are built (pitfall 19), before Trainer would seed
    set_seed(args.seed)
    trainer = stage.trainer(recipe, args, tokenizer, train_set, eval_set, callbacks.build(recipe))
    callbacks.quiet_printer(trainer)
    if trainer.is_world_process_zero():
        print(header(recipe, args, train_set, eval_set, tokenizer, getattr(trainer, "untrained_token_rows", None)), flush=True)

    # 5. Train (resumes when a checkpoint exists), then summarize
    trainer.train(resume_from_checkpoint=resume_from)
    if hasattr(stage, "summarize"):
        summary = stage.summarize(recipe, trainer, eval_set)
    else:
        summary = trainer.evaluate() if eval_set is not None else {}

    # 6. Save, mark the run finished, then draw its curves and write its report (both can be drawn again later:
    #    `hfalign plot RUN_DIR`)
    trainer.save_model(recipe.output_dir)
    rundir.finish(recipe, trainer.is_world_process_zero(), summary)
    if trainer.is_world_process_zero():
        from hfalign import report

        print(f"hfalign: report {report.write_report(Path(recipe.output_dir))} (plots under "
              f"{Path(recipe.output_dir) / 'plots'})", flush=True)
    return summary


def header(recipe, args, train_set, eval_set, tokenizer=None, token_rows: list[int] | None = None) -> str:
    """The run in one line: stage, recipe, model (how it trains), data, batch plan, output directory; a second line
    when the adapter also trains embedding rows the base never trained (hfalign.tokens)."""
    m, how = recipe.model, "full"
    if recipe.lora.enabled:
        q = recipe.quantization
        how = f"{('QLoRA 4-bit' if q.load_in_4bit else 'LoRA 8-bit') if q.enabled else 'LoRA'} r{recipe.lora.r}"
    model = m.name_or_path + (f" + adapter {m.adapter}" if m.adapter else "")
    mixed = "bf16" if args.bf16 else "fp16" if args.fp16 else m.dtype
    rows = "hub set" if train_set is None else f"{len(train_set)} train"
    rows += f" + {len(eval_set)} eval rows" if eval_set is not None else " rows"
    batch = f"batch {args.per_device_train_batch_size} x accumulate {args.gradient_accumulation_steps} x {args.world_size} process(es)"
    length = f"max_steps {args.max_steps}" if args.max_steps and args.max_steps > 0 else \
        f"{getattr(args, 'total_episodes', None)} episodes" if getattr(args, "total_episodes", None) else f"{args.num_train_epochs:g} epoch(s)"
    line = (f"hfalign {recipe.stage} | recipe {recipe.source} | model {model} ({how}, {mixed}) | data {rows} | "
            f"{batch}, {length} | -> {recipe.output_dir}")
    if token_rows:
        from hfalign import tokens

        trains = "the adapter trains them too" if recipe.lora.enabled else "they train"
        line += (f"\nhfalign: the base never trained the embedding rows of {len(token_rows)} token(s) the data uses "
                 f"({tokens.describe(tokenizer, token_rows)}): {trains}, from the mean row "
                 f"(lora.train_untrained_tokens: false turns this off)")
    return line
