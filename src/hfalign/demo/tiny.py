"""Build the tiny LLaMA-architecture model of the embedded default, deterministically and offline.

A byte-level BPE tokenizer trained on a demo task's own text (hfalign.demo.TASKS) (with a pad token distinct from EOS) and a randomly
initialised LlamaForCausalLM from a fixed seed. `hfalign build-tiny DIR` writes both in HF format.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}assistant:{% generation %} {{ m['content'] }}{{ eos_token }}{% endgeneration %}\n"
    "{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)

SIZES = {
    # name: (hidden, intermediate, layers, heads, kv_heads)
    "tiny": (64, 192, 2, 4, 2),  # widths divisible by 32: bitsandbytes' CPU 4-bit kernels need it (QLoRA eval)
    "100m": (768, 3072, 12, 12, 4),  # ~104M parameters: the memory benchmark's model
}


def build_tokenizer(vocab_size: int = 512, seed: int = 0, task: str = "reviews"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from hfalign.demo import get_task

    corpus = get_task(task).corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", padding_side="left"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny(out_dir: str | Path, size: str = "tiny", seed: int = 0, vocab_size: int = 512, task: str = "reviews") -> Path:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = build_tokenizer(vocab_size, seed, task)
    hidden, inter, layers, heads, kv = SIZES[size]
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
