"""Reward modelling with trl.RewardTrainer: a scalar head trained on chosen/rejected pairs.

    hfalign train recipes/rm.yaml
    accelerate launch --config_file accelerate_configs/zero3.yaml -m hfalign recipes/rm.yaml
"""

from __future__ import annotations

from hfalign import callbacks, data, models, rundir
from hfalign.recipe import Recipe, build_train_args


def run(recipe: Recipe) -> dict:
    from trl import RewardTrainer

    # 1. Run directory (refuse clobber; find the checkpoint to resume from)
    args = build_train_args(recipe)
    resume_from = rundir.prepare(recipe, is_main=args.process_index == 0)

    # 2. Tokenizer
    tokenizer = models.load_tokenizer(recipe.model)

    # 3. Model: sequence classifier with num_labels=1 (+ an SFT adapter merged in, + a new LoRA config)
    model = models.load_sequence_classifier(recipe.model, recipe.quantization, tokenizer)
    if recipe.model.adapter:
        model = models.apply_adapter(model, recipe.model.adapter, trainable=False)
    model = models.prepare_quantized(model, args.gradient_checkpointing)
    peft_config = models.lora_config(recipe.lora, model, "SEQ_CLS")

    # 4. Data
    train_set, eval_set = data.load(recipe.data, "rm")

    # 5. Trainer with callbacks
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                            processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks.build(recipe))
    callbacks.quiet_printer(trainer)

    # 6. Train (resumes when a checkpoint exists)
    trainer.train(resume_from_checkpoint=resume_from)
    summary = trainer.evaluate() if eval_set is not None else {}

    # 7. Save and finish
    trainer.save_model(recipe.output_dir)
    rundir.finish(recipe, trainer.is_world_process_zero(), summary)
    return summary
