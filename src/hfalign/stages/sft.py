"""Supervised fine-tuning with trl.SFTTrainer.

    hfalign train recipes/sft.yaml
    accelerate launch --config_file accelerate_configs/zero3.yaml -m hfalign recipes/sft.yaml
"""

from __future__ import annotations

from hfalign import models
from hfalign.recipe import Recipe

FORMATS = ("messages", "prompt_completion", "text")


def config_class() -> type:
    from trl import SFTConfig

    return SFTConfig


def check(recipe: Recipe, rows: dict) -> None:
    """Nothing beyond the shared checks."""


def trainer(recipe: Recipe, args, tokenizer, train_set, eval_set, callbacks):
    from trl import SFTTrainer

    # The causal LM; continue a trained adapter, or give the trainer a new LoRA config to apply
    model = models.load_causal_lm(recipe.model, recipe.quantization, tokenizer)
    model = models.prepare_quantized(model, args.activation_checkpointing)
    peft_config, rows = None, []
    if recipe.model.adapter:
        model = models.apply_adapter(model, recipe.model.adapter, trainable=True)
    else:  # a new adapter, with the embedding rows of tokens the base never trained (hfalign.tokens)
        rows = models.untrained_token_rows(recipe.lora, model, tokenizer, train_set)
        peft_config = models.lora_config(recipe.lora, model, "CAUSAL_LM", rows)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                      processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    models.expose_head_bias(trainer.model)
    trainer.untrained_token_rows = rows  # the run header lists them
    return models.undo_bf16_cast(trainer, recipe.quantization)
