"""Tokenizer and model loading: LLaMA family, native GLM/GLM-4, ChatGLM2/3 (remote code), LoRA, QLoRA.

Per-family facts live in one table, FAMILIES, and nowhere else; so does the pad-token rule (a pad distinct from
EOS, so EOS stays a learnable token: arXiv 2403.17031).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Literal

from hfalign.errors import UserError
from hfalign.recipe import LoraSection, ModelSection, QuantizationSection

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "auto": "auto"}


@dataclass(frozen=True)
class Family:
    """What hfalign must know about one model family (a config's `model_type`)."""

    lora_targets: tuple[str, ...] | str = "all-linear"  # default LoRA target modules (lora.target_modules: null)
    head: str = "score"  # attribute name of the *ForSequenceClassification scalar head
    hidden_layout: Literal["batch_first", "seq_first"] = "batch_first"  # the backbone's last_hidden_state
    padding_side: Literal["left"] | None = None  # a constraint of the family's tokenizer, if it has one
    stop_tokens: tuple[str, ...] = ()  # end-of-turn tokens that end a response besides EOS, where the vocab has them
    chat_template: str = ""  # how the family's chat template is handled
    pad_tokens: tuple[str, ...] = ()  # unused tokens of the shipped vocab to pad with when there is no pad (or pad ==
    # EOS), tried before <unk> and before adding a token (a new token means a new embedding row, saved with adapters)


FAMILIES = {
    "llama": Family(stop_tokens=("<|eot_id|>",),  # LLaMA-3 chat ends a turn with <|eot_id|>, not <|end_of_text|>
                    chat_template="the tokenizer's own; its BOS is not doubled on conversational prompts",
                    # LLaMA-2/3 ship no pad: LLaMA-3.1's own pad, LLaMA-3's first reserved token; LLaMA-2 pads with <unk>
                    pad_tokens=("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>")),
    "glm": Family(stop_tokens=("<|user|>", "<|observation|>"),
                  chat_template="the tokenizer's own ([gMASK]<sop> prefix); EOS closes a final assistant turn"),
    "glm4": Family(stop_tokens=("<|user|>", "<|observation|>"),
                   chat_template="the tokenizer's own ([gMASK]<sop> prefix); EOS closes a final assistant turn"),
    # Qwen2/2.5: ChatML; a chat turn ends with <|im_end|> (the base models' EOS is <|endoftext|>)
    "qwen2": Family(stop_tokens=("<|im_end|>",), chat_template="the tokenizer's own (ChatML)"),
    # ChatGLM2/3 (remote code): q/k/v fused into query_key_value; the LM head is `output_layer`, which "all-linear"
    # would not recognise as a head (PEFT excludes only lm_head-like names), so the targets are named. Its
    # transformer returns [seq, batch, hidden] and its tokenizer pads on the left only (trlx#474).
    "chatglm": Family(lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"), head="classifier_head",
                      hidden_layout="seq_first", padding_side="left", stop_tokens=("<|user|>", "<|observation|>"),
                      chat_template="the remote code's build_chat_input; not a Jinja template"),
}
OTHER = Family()  # architectures outside the table: transformers' conventions


def family(model_type: str | None) -> Family:
    return FAMILIES.get(model_type or "", OTHER)


def family_of(model) -> Family:
    """The family of a model (through a PeftModel too)."""
    return family(getattr(getattr(model, "config", None), "model_type", None))


def lora_targets(model_type: str) -> list[str] | str:
    """Default LoRA target modules for a config's model_type."""
    targets = family(model_type).lora_targets
    return targets if isinstance(targets, str) else list(targets)


def _local_config(path: str) -> dict | None:
    cfg = os.path.join(os.path.expanduser(path), "config.json")
    if os.path.isfile(cfg):
        with open(cfg, encoding="utf-8") as f:
            return json.load(f)
    return None


def native(model_type: str | None) -> bool:
    """Does this transformers know the architecture? Its own model directory answers without importing the auto
    classes (~2 s); only a type without one asks CONFIG_MAPPING (names that differ from their directory)."""
    import importlib.util

    if not model_type:
        return False
    spec = importlib.util.find_spec("transformers")
    if spec and spec.origin and os.path.isdir(os.path.join(os.path.dirname(spec.origin), "models", model_type.replace("-", "_"))):
        return True
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def check_model(m: ModelSection, where: str = "model") -> None:
    """Checks that need the checkpoint's config but no weights: remote code must be asked for."""
    local = os.path.expanduser(m.name_or_path)
    if os.path.isdir(local) and not os.path.isfile(os.path.join(local, "config.json")):
        hint = " (it holds a LoRA adapter: set model.adapter to it and model.name_or_path to its base)" \
            if os.path.isfile(os.path.join(local, "adapter_config.json")) else ""
        raise UserError(f"'{where}.name_or_path' ({m.name_or_path}) has no config.json, so it is not a model directory{hint}.",
                        fix="point it at a directory written by save_pretrained, or a hub id")
    cfg = _local_config(m.name_or_path)
    model_type = (cfg or {}).get("model_type") or ("chatglm" if "chatglm" in m.name_or_path.lower() else None)
    if model_type == "chatglm" and not m.trust_remote_code:
        raise UserError(
            f"'{where}.name_or_path' ({m.name_or_path}) is a ChatGLM2/3 checkpoint: its own code was written for "
            "transformers 4 and cannot generate on transformers 5.",
            fix=f"convert it once to transformers' native GLM: `hfalign convert chatglm {m.name_or_path} "
                "models/chatglm3-6b`, and set name_or_path to that directory (recipes/chatglm3 does); or, if your copy's "
                f"code runs on transformers 5, set {where}.trust_remote_code: true",
        )
    if cfg is None:
        return
    if "auto_map" in cfg and not native(model_type) and not m.trust_remote_code:
        raise UserError(
            f"'{where}.name_or_path' ({m.name_or_path}) is a '{model_type}' checkpoint that needs its own Python code.",
            fix=f"set {where}.trust_remote_code: true if you trust that code (hfalign never implies it)",
        )


@contextlib.contextmanager
def loading(what: str, name: str):
    """OSError from from_pretrained (unknown id, offline, missing files) -> a UserError naming what failed."""
    try:
        yield
    except (OSError, ValueError) as e:  # both are how from_pretrained says "not loadable"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"could not load the {what} {name!r}: {first}",
                        fix="check the id or path; without network use a local directory (or the hub cache)") from None


def check_adapter_base(adapter: str, base: str, where: str) -> None:
    """A LoRA adapter only means something on the base it was trained on; a mismatch would load silently."""
    cfg_path = os.path.join(adapter, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        return
    with open(cfg_path, encoding="utf-8") as f:
        trained_on = json.load(f).get("base_model_name_or_path")
    if not trained_on:
        return
    same = trained_on == base or (os.path.exists(trained_on) and os.path.exists(base)
                                  and os.path.realpath(trained_on) == os.path.realpath(base))
    if not same:
        raise UserError(f"'{where}' ({adapter}) is a LoRA adapter trained on {trained_on!r}, but model.name_or_path is "
                        f"{base!r}.", fix="point model.name_or_path at the adapter's base model")


def _model_type(m: ModelSection) -> str | None:
    cfg = _local_config(m.name_or_path)
    if cfg is not None:
        return cfg.get("model_type")
    from transformers import AutoConfig

    try:  # a hub id: its config.json (small, cached with the rest of the checkpoint)
        return AutoConfig.from_pretrained(m.name_or_path, revision=m.revision,
                                          trust_remote_code=m.trust_remote_code).model_type
    except (OSError, ValueError):
        return None


def load_tokenizer(m: ModelSection):
    from transformers import AutoTokenizer

    with loading("tokenizer", m.tokenizer or m.name_or_path):
        tok = AutoTokenizer.from_pretrained(
            m.tokenizer or m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code
        )
    if m.chat_template:
        if m.chat_template.endswith((".jinja", ".j2")):
            with open(m.chat_template, encoding="utf-8") as f:
                tok.chat_template = f.read()
        else:
            tok.chat_template = m.chat_template
    close_assistant_turn(tok)
    if m.pad_token:
        if m.pad_token not in tok.get_vocab():
            tok.add_special_tokens({"pad_token": m.pad_token})
        tok.pad_token = m.pad_token
    elif tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        # pad == eos would mask every real EOS out of the loss, and the model would never learn to stop.
        unused = [t for t in family(_model_type(m)).pad_tokens if t in tok.get_vocab()]
        if unused:
            tok.pad_token = unused[0]
        elif tok.unk_token is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
    if tok.pad_token_id == tok.eos_token_id:
        raise UserError(f"'model.pad_token' equals the EOS token {tok.eos_token!r}.", fix="choose a pad token distinct from EOS")
    return tok


def close_assistant_turn(tok) -> bool:
    """A chat template that writes nothing after an assistant's answer (GLM-4, ChatGLM3: the model goes on with
    <|user|>) never shows a model trained on single-turn conversations where to stop: TRL adds EOS to plain text only,
    not to conversations. Such a template gets EOS after a conversation that ends with the assistant (what GLM's own
    fine-tuning scripts append), so SFT learns to stop and the reward model scores at that token, where PPO reads it.
    Generation prompts (add_generation_prompt) render as before. Returns whether the template was changed."""
    if not tok.chat_template or not isinstance(tok.chat_template, str) or tok.eos_token is None:
        return False
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                                       tokenize=False)
    except Exception:  # a template that cannot render this probe (tools, system-only): leave it alone
        return False
    if not text.rstrip().endswith("y"):
        return False
    tok.chat_template += ("{% if messages and messages[-1]['role'] == 'assistant' and not add_generation_prompt %}"
                          "{{ eos_token }}{% endif %}")
    return True


def from_pretrained_kwargs(m: ModelSection, q: QuantizationSection) -> dict:
    import torch

    kwargs = {"revision": m.revision, "trust_remote_code": m.trust_remote_code, "dtype": DTYPES[m.dtype]}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    if q.enabled:
        from transformers import BitsAndBytesConfig

        compute = getattr(torch, q.compute_dtype)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=q.load_in_4bit, load_in_8bit=q.load_in_8bit, bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_compute_dtype=compute, bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_quant_storage=compute,
        )
    return kwargs


def _fit_tokenizer(model, tok) -> None:
    """Grow the embeddings when the tokenizer gained a pad token; keep config and generation config in step."""
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = tok.pad_token_id
        if gen.eos_token_id is None:
            gen.eos_token_id = tok.eos_token_id


def load_causal_lm(m: ModelSection, q: QuantizationSection, tok):
    from transformers import AutoModelForCausalLM

    check_model(m)
    with loading("model", m.name_or_path):
        model = AutoModelForCausalLM.from_pretrained(m.name_or_path, **from_pretrained_kwargs(m, q))
    _fit_tokenizer(model, tok)
    return model


def load_sequence_classifier(m: ModelSection, q: QuantizationSection, tok, path: str | None = None):
    """A scalar-head model (num_labels=1) for reward or value, from `path` or the recipe's base model."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    check_model(m)
    source = path or m.name_or_path
    # a causal LM (the SFT model) gets a new head and drops its LM head: expected, so transformers' load report of
    # exactly that is not printed (any other checkpoint keeps it: there it may say something is wrong)
    archs = (_local_config(source) or {}).get("architectures") or []
    expected = bool(archs) and all(a.endswith("ForCausalLM") for a in archs)
    level = hf_logging.get_verbosity()
    if expected:
        hf_logging.set_verbosity_error()
    try:
        with loading("model", source):
            model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1,
                                                                       **from_pretrained_kwargs(m, q))
    finally:
        hf_logging.set_verbosity(level)
    _fit_tokenizer(model, tok)
    return model


def lora_config(lora: LoraSection, model, task_type: str, token_rows: list[int] | None = None):
    """PEFT LoraConfig with per-architecture target defaults; None when LoRA is off. `token_rows`: embedding rows
    trained beside the adapter (hfalign.tokens)."""
    if not lora.enabled:
        return None
    from peft import LoraConfig

    from hfalign import tokens

    targets = lora.target_modules or lora_targets(getattr(model.config, "model_type", ""))
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
        modules_to_save=lora.modules_to_save, task_type=task_type, bias="none",
        trainable_token_indices=tokens.trainable_token_indices(model, token_rows) if token_rows else None,
    )


def untrained_token_rows(lora: LoraSection, model, tok, train_set) -> list[int]:
    """The untrained rows of the tokens the data uses (hfalign.tokens), started at the mean row: a new adapter trains
    them beside it; full fine-tuning trains them anyway, from a start the first norm can take. [] when
    lora.train_untrained_tokens is off."""
    if not lora.train_untrained_tokens or train_set is None:
        return []
    from hfalign import tokens

    rows = tokens.untrained(model, tokens.used_token_ids(tok, train_set))
    if rows:
        tokens.start_at_mean(model, rows)
    return rows


def adapters_beside_token_rows() -> None:
    """PEFT 0.21 cannot load or save an adapter without trained token rows in a model whose embedding carries another
    adapter's (the PPO shared base: the SFT adapter's rows, then the reward and value adapters): the embedding's
    TrainableTokensWrapper asks every adapter for rows (KeyError '...trainable_tokens_delta'), where
    ModulesToSaveWrapper asks only the adapters it holds. From this call on, it asks only those too (idempotent)."""
    from peft.utils.other import TrainableTokensWrapper

    if getattr(TrainableTokensWrapper, "_hfalign_patched", False):
        return
    load_map, state = TrainableTokensWrapper.adapter_state_dict_load_map, TrainableTokensWrapper.adapter_state_dict

    def holds(wrapper, name: str) -> bool:
        return name in wrapper.token_adapter.trainable_tokens_delta

    TrainableTokensWrapper.adapter_state_dict_load_map = lambda self, name: load_map(self, name) if holds(self, name) else {}
    TrainableTokensWrapper.adapter_state_dict = lambda self, name, sd: state(self, name, sd) if holds(self, name) else {}
    TrainableTokensWrapper._hfalign_patched = True


def expose_head_bias(model) -> None:
    """TRL's SFTTrainer computes the loss with a fused LM head that reads `lm_head.weight` and `lm_head.bias`; PEFT's
    wrapper round a head with trained token rows (hfalign.tokens) answers `.weight` (the merged rows, differentiable)
    but not `.bias`: 'TrainableTokensWrapper' object has no attribute 'bias'. Give it the head's own."""
    from peft.utils.other import TrainableTokensWrapper

    for module in model.modules():
        if isinstance(module, TrainableTokensWrapper) and "bias" not in module.__dict__:
            object.__setattr__(module, "bias", getattr(module.token_adapter.base_layer, "bias", None))


def check_4bit_kernels(dtype=None, tol: float = 1e-4, keep_layout: bool = True) -> float:
    """QLoRA trains through bitsandbytes' 4-bit kernels, which differ by device and CPU (AVX512-BF16 or not, AMX, the
    kernels package). On a small layer, run every path a run takes -- a training forward and backward, an eval-mode
    no-grad forward (generation, rollout scoring), then training again -- and compare outputs and the input gradient
    with the same layer dequantized, in fp32 arithmetic. Returns the largest relative error; above `tol`, a clear
    error: LoRA on such a path would learn from wrong numbers, silently. `keep_layout=False`: without hfalign's fix
    for the inference repack (tests)."""
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit

    dtype = dtype or torch.float32
    gen = torch.Generator().manual_seed(0)
    layer = Linear4bit(128, 64, bias=False, compute_dtype=dtype, quant_type="nf4")
    layer.weight.data = torch.randn(64, 128, generator=gen).to(layer.weight.dtype)
    layer.weight = layer.weight._quantize("cpu")
    if keep_layout:
        _keep_training_layout(layer)
    x = torch.randn(5, 128, generator=gen)
    w = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    want = x @ w.t()
    worst = 0.0
    for training in (True, False, True):
        layer.train(training)
        a = x.clone().requires_grad_(training)
        with torch.set_grad_enabled(training):
            out = layer(a.to(dtype)).float()
        worst = max(worst, ((out - want).abs().max() / want.abs().max()).item())
        if training:
            out.pow(2).sum().backward()
            grad = 2 * want @ w
            worst = max(worst, float("inf") if a.grad is None else ((a.grad - grad).abs().max() / grad.abs().max()).item())
    if worst > tol * (1 if dtype == torch.float32 else 100):
        raise UserError(f"bitsandbytes' 4-bit kernels on this machine compute wrong numbers (relative error {worst:.2g} "
                        "against the dequantized layer): QLoRA would train on them.",
                        fix="train LoRA without quantization on this machine (quantization.load_in_4bit: false)")
    return worst


def _keep_training_layout(module) -> None:
    """bitsandbytes on an AVX512-BF16 CPU repacks a 4-bit weight for inference on its first eval-mode, no-grad
    forward (PPO's generation, an eval loop) and from then on multiplies with a kernel that has no autograd:
    gradients to every LoRA layer below it come out wrong, silently (one warning). Measured here: QLoRA PPO went to
    KL 15 and 0.18 well-formed. Keep the training layout."""
    for m in module.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def prepare_quantized(model, activation_checkpointing: bool = False):
    """QLoRA: freeze the 4/8-bit base, cast norms to fp32, enable input grads; on CPU, check the 4-bit kernels."""
    from peft import prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=activation_checkpointing)
        _keep_training_layout(model)
        if getattr(model, "is_loaded_in_4bit", False) and model.device.type == "cpu":
            check_4bit_kernels(getattr(model.config, "dtype", None))
    return model


def undo_bf16_cast(trainer, q: QuantizationSection):
    """TRL's SFT/Reward trainers cast every trainable parameter of a quantized model to bf16 (the QLoRA paper's
    recipe), whatever the compute dtype. Without bf16 autocast, a plain module among them (the reward head, any
    modules_to_save) then meets fp32 activations: 'expected m1 and m2 to have the same dtype'. Unless the run is
    bf16, put them back in the compute dtype the recipe asked for."""
    import torch

    if not q.enabled or trainer.args.bf16:
        return trainer
    dtype = getattr(torch, q.compute_dtype)
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype == torch.bfloat16 != dtype:
            param.data = param.data.to(dtype)
    return trainer


def apply_adapter(model, path: str, trainable: bool):
    """Load a trained PEFT adapter: trainable to continue it, else merged into the weights (e.g. SFT LoRA -> RM base)."""
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(path)
    if not trainable:
        config.task_type = None  # merge only: a causal-LM adapter may land on a classifier, so no task wrapper
        rows = getattr(config, "trainable_token_indices", None)
        if isinstance(rows, dict):  # a classifier has no LM head: merge the SFT adapter's input rows only
            names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
            config.trainable_token_indices = {k: v for k, v in rows.items() if k in names} or None
    peft_model = PeftModel.from_pretrained(model, path, config=config, is_trainable=trainable)
    return peft_model if trainable else peft_model.merge_and_unload()
