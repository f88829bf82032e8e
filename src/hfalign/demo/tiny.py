"""Build the tiny models of the demo, deterministically and offline.

A byte-level BPE tokenizer trained on a demo task's own text (hfalign.demo.TASKS) and a randomly initialised model
from a fixed seed; `hfalign build-tiny DIR` writes both in HF format. `--family` picks what the model imitates:

    llama    the embedded default: LlamaConfig, <s> </s>, a pad distinct from EOS, a plain chat template
    llama2   LLaMA-2 chat: <s> added by the tokenizer, [INST] ... [/INST] template, no pad token (as shipped)
    llama3   LLaMA-3 instruct: <|begin_of_text|>, turns end with <|eot_id|> (the tokenizer's EOS), generation stops
             at <|end_of_text|> or <|eot_id|>, no pad token (as shipped; a reserved special token serves as one)
    glm      transformers' native GLM (GlmConfig): [gMASK]<sop> prefix, <|user|> / <|assistant|> turns,
    glm4     GLM-4 (Glm4Config): EOS <|endoftext|> which is also the pad (as shipped); generation stops at
             <|endoftext|>, <|user|> or <|observation|>

The family facts hfalign acts on (stop tokens, LoRA targets, ...) are in hfalign.models.FAMILIES; these only make
checkpoints that look like the real ones, for tests.

`--pretrain N` then trains the model for N steps as a plain language model on the task's text (prompts and answers
as separate documents, never a prompt followed by its answer): a *pretrained* base, as real users start from. It knows
the words and sentences but not the task, so a LoRA adapter has something to adapt (a randomly initialised base gave
QLoRA SFT an eval loss of 5.42 against full SFT's 1.24).
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}assistant:{% generation %} {{ m['content'] }}{{ eos_token }}{% endgeneration %}\n"
    "{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)

LLAMA2_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GLM_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
QWEN2_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_GLM_TOKENS = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
# family: config class, special tokens (first ones: bos, eos, pad, unk as named), chat template, BOS added by the
# tokenizer, the tokens generation stops at
TINY_FAMILIES = {
    "llama": dict(config="LlamaConfig", specials=["<pad>", "<s>", "</s>", "<unk>"], bos="<s>", eos="</s>",
                  pad="<pad>", unk="<unk>", template=CHAT_TEMPLATE, add_bos=True, stop=["</s>"]),
    "llama2": dict(config="LlamaConfig", specials=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", pad=None,
                   unk="<unk>", template=LLAMA2_TEMPLATE, add_bos=True, stop=["</s>"]),
    "llama3": dict(config="LlamaConfig", specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                   "<|end_header_id|>", "<|eot_id|>", "<|reserved_special_token_0|>"],
                   bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, unk=None, template=LLAMA3_TEMPLATE,
                   add_bos=True, stop=["<|end_of_text|>", "<|eot_id|>"]),
    "glm": dict(config="GlmConfig", specials=_GLM_TOKENS, bos=None, eos="<|endoftext|>", pad="<|endoftext|>",
                unk=None, template=GLM_TEMPLATE, add_bos=False, stop=["<|endoftext|>", "<|user|>", "<|observation|>"]),
}
TINY_FAMILIES["glm4"] = {**TINY_FAMILIES["glm"], "config": "Glm4Config"}  # GLM-4 ships GLM's tokens and template
# Qwen2.5(-Instruct): ChatML, no BOS, pad <|endoftext|>; its embedding has spare rows beyond the tokenizer (151936 for
# 151665 tokens), so a script that adds a [PAD] token (TRL's PPO examples) needs no resize: vocab_multiple rounds up
TINY_FAMILIES["qwen2"] = dict(config="Qwen2Config", specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None,
                              eos="<|im_end|>", pad="<|endoftext|>", unk=None, template=QWEN2_TEMPLATE, add_bos=False,
                              stop=["<|im_end|>", "<|endoftext|>"], vocab_multiple=64)

SIZES = {
    # name: (hidden, intermediate, layers, heads, kv_heads)
    "tiny": (64, 192, 2, 4, 2),  # widths divisible by 32: bitsandbytes' CPU 4-bit kernels need it (QLoRA eval)
    "100m": (768, 3072, 12, 12, 4),  # ~104M parameters: the memory benchmark's model
}


def build_tokenizer(vocab_size: int = 512, seed: int = 0, task: str = "reviews", family: str = "llama"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from hfalign.demo import get_task

    corpus, spec = get_task(task).corpus, TINY_FAMILIES[family]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["specials"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    if spec["add_bos"]:
        bos = (spec["bos"], tok.token_to_id(spec["bos"]))
        tok.post_processor = processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B",
                                                           special_tokens=[bos])
    named = {f"{k}_token": spec[k] for k in ("bos", "eos", "pad", "unk") if spec[k]}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **named)
    fast.chat_template = spec["template"]
    return fast


def pretrain(model, tokenizer, texts: list[str], steps: int, seed: int = 0, batch: int = 32, lr: float = 3e-3,
             end: str | None = None) -> float:
    """Causal-LM training on shuffled documents (each text + `end`, default EOS; right-padded); returns the last
    step's loss."""
    import random

    import torch

    rng, side, pad = random.Random(seed), tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side, tokenizer.pad_token = "right", pad or tokenizer.eos_token  # pads are masked out
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20) * (1 - step / steps))
    model.train()
    for _ in range(steps):
        docs = [t + (end or tokenizer.eos_token) for t in rng.sample(texts, batch)]
        enc = tokenizer(docs, padding=True, truncation=True, max_length=64, return_tensors="pt")
        loss = model(**enc, labels=enc.input_ids.masked_fill(enc.attention_mask == 0, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
    tokenizer.padding_side, tokenizer.pad_token = side, pad  # saved as the family ships it (LLaMA: no pad)
    return loss.item()


def build_tiny(out_dir: str | Path, size: str = "tiny", seed: int = 0, vocab_size: int = 512, task: str = "reviews",
               family: str = "llama", pretrain_steps: int = 0, vocab_multiple: int | None = None,
               tie_embeddings: bool = False, zero_unseen: bool = False) -> Path:
    """`vocab_multiple`: round the embedding up to a multiple of it (spare rows beyond the tokenizer, as Qwen's and
    padded checkpoints have; default: the family's). `zero_unseen` (with pretraining): a base as Meta ships LLaMA-3's
    -- documents end with the end-of-text token (the family's first stop token), and every token the pretraining never
    saw (the chat template's header and end-of-turn tokens among them) keeps an all-zero input and output row."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    out, spec = Path(out_dir), TINY_FAMILIES[family]
    tokenizer = build_tokenizer(vocab_size, seed, task, family)
    hidden, inter, layers, heads, kv = SIZES[size]
    stop = [tokenizer.convert_tokens_to_ids(t) for t in spec["stop"]]
    multiple = vocab_multiple or spec.get("vocab_multiple", 1)
    config = getattr(transformers, spec["config"])(
        vocab_size=-(-len(tokenizer) // multiple) * multiple, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads, max_position_embeddings=256,
        tie_word_embeddings=tie_embeddings, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop if len(stop) > 1 else stop[0], dtype="float32",
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=config.eos_token_id)
    if pretrain_steps:
        from hfalign.demo import get_task

        docs, end = get_task(task).documents(seed), spec["stop"][0] if zero_unseen else None
        pretrain(model, tokenizer, docs, pretrain_steps, seed, end=end)
        if zero_unseen:
            seen = {i for ids in tokenizer([d + end for d in docs])["input_ids"] for i in ids}
            unseen = torch.tensor([i for i in range(config.vocab_size) if i not in seen])
            with torch.no_grad():
                model.get_input_embeddings().weight[unseen] = 0.0
                model.get_output_embeddings().weight[unseen] = 0.0
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
