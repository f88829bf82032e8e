"""Reward modelling with trl.RewardTrainer: a scalar head trained on chosen/rejected pairs.

    hfalign train recipes/rm.yaml
    accelerate launch --config_file accelerate_configs/zero3.yaml -m hfalign recipes/rm.yaml
"""

from __future__ import annotations

from hfalign import models
from hfalign.recipe import Recipe

FORMATS = ("preference",)


def config_class() -> type:
    from trl import RewardConfig

    return RewardConfig


def check(recipe: Recipe, rows: dict) -> None:
    """Nothing beyond the shared checks."""


def trainer(recipe: Recipe, args, tokenizer, train_set, eval_set, callbacks):
    from trl import RewardTrainer

    # A sequence classifier with num_labels=1; an SFT adapter is merged in, a new LoRA config trains on top
    model = models.load_sequence_classifier(recipe.model, recipe.quantization, tokenizer)
    if recipe.model.adapter:
        model = models.apply_adapter(model, recipe.model.adapter, trainable=False)
    model = models.prepare_quantized(model, args.activation_checkpointing)
    # the rows the base never trained (hfalign.tokens); not for an adapter on an SFT adapter: PPO's shared base runs
    # the two as one stack, and PEFT lets one adapter of a stack train token rows (the SFT adapter's did)
    stacked = recipe.model.adapter and recipe.lora.enabled
    rows = [] if stacked else models.untrained_token_rows(recipe.lora, model, tokenizer, train_set)
    peft_config = models.lora_config(recipe.lora, model, "SEQ_CLS", rows)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                            processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    trainer.untrained_token_rows = rows  # the run header lists them
    return models.undo_bf16_cast(trainer, recipe.quantization)
