"""Model loading for tiny llama, glm and glm4 checkpoints: LoRA target defaults, QLoRA 4-bit, the pad-token rule."""

from __future__ import annotations

import pytest
import torch

from hfalign import models
from hfalign.errors import UserError
from hfalign.recipe import LoraSection, ModelSection, QuantizationSection


def _save_tiny(family: str, tokenizer, path):
    from transformers import AutoModelForCausalLM, Glm4Config, GlmConfig, LlamaConfig

    cls = {"llama": LlamaConfig, "glm": GlmConfig, "glm4": Glm4Config}[family]
    cfg = cls(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
              eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("family", ["llama", "glm", "glm4"])
def test_family_loads_with_lora_on_all_linear(family, tiny_model, tmp_path):
    from peft import get_peft_model

    tok = models.load_tokenizer(ModelSection(name_or_path=str(tiny_model)))
    path = _save_tiny(family, tok, tmp_path / family)
    m = ModelSection(name_or_path=path)
    model = models.load_causal_lm(m, QuantizationSection(), models.load_tokenizer(m))
    assert model.config.model_type == family
    cfg = models.lora_config(LoraSection(enabled=True, r=4), model, "CAUSAL_LM")
    assert cfg.target_modules == {"all-linear"} or cfg.target_modules == "all-linear"
    linears = {n.rsplit(".", 1)[-1] for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    peft_model = get_peft_model(model, cfg)
    adapted = {n.rsplit(".", 1)[-1] for n, mod in peft_model.named_modules() if hasattr(mod, "lora_A")}
    assert "lm_head" not in adapted
    assert adapted == linears - {"lm_head"}  # every decoder Linear (q/k/v/o or fused qkv, the MLP), never the head
    out = peft_model(input_ids=torch.tensor([[1, 5, 6]]))
    assert out.logits.shape == (1, 3, len(tok))


def test_chatglm_targets_fused_qkv_and_never_output_layer():
    targets = models.lora_targets("chatglm")
    assert "query_key_value" in targets and "output_layer" not in targets
    assert models.lora_targets("llama") == "all-linear"


def test_pad_token_distinct_from_eos(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.pad_token = tok.eos_token  # what many checkpoints ship (LLaMA-2 has no pad; people set pad = eos)
    tok.save_pretrained(tmp_path / "t")
    m = ModelSection(name_or_path=str(tiny_model), tokenizer=str(tmp_path / "t"))
    fixed = models.load_tokenizer(m)
    assert fixed.pad_token_id != fixed.eos_token_id
    assert fixed.pad_token == "<unk>"  # an existing token, so no embedding resize is needed
    with pytest.raises(UserError, match="distinct from EOS"):
        models.load_tokenizer(ModelSection(name_or_path=str(tiny_model), pad_token="</s>"))


def test_new_pad_token_grows_embeddings(tiny_model, tmp_path):
    m = ModelSection(name_or_path=str(tiny_model), pad_token="<|mypad|>")
    tok = models.load_tokenizer(m)
    model = models.load_causal_lm(m, QuantizationSection(), tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.config.pad_token_id == tok.convert_tokens_to_ids("<|mypad|>") == model.generation_config.pad_token_id


def test_chat_template_override(tiny_model, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}")
    tok = models.load_tokenizer(ModelSection(name_or_path=str(tiny_model), chat_template=str(path)))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi"


def test_qlora_4bit_nf4_trains_adapter(tiny_model):
    """bitsandbytes NF4 on CPU: the base is quantized and frozen, the LoRA adapter learns."""
    from peft import get_peft_model

    m = ModelSection(name_or_path=str(tiny_model))
    q = QuantizationSection(load_in_4bit=True, compute_dtype="float32")
    tok = models.load_tokenizer(m)
    model = models.prepare_quantized(models.load_causal_lm(m, q, tok))
    import bitsandbytes as bnb

    assert any(isinstance(mod, bnb.nn.Linear4bit) for mod in model.modules())
    assert model.model.layers[0].self_attn.q_proj.weight.quant_type == "nf4"
    model = get_peft_model(model, models.lora_config(LoraSection(enabled=True, r=4), model, "CAUSAL_LM"))
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tok(["Write a review of the red door. the plot was great."], return_tensors="pt").input_ids
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert changed, "no LoRA parameter changed"


def test_4bit_kernel_check_passes_here_and_catches_the_repack_path():
    """prepare_quantized checks bitsandbytes' CPU 4-bit paths against the dequantized layer before QLoRA trains on
    them; without hfalign's fix the repack path (AVX512-BF16 CPUs) has no autograd and the check refuses it."""
    assert models.check_4bit_kernels() < 1e-4
    try:
        err = models.check_4bit_kernels(keep_layout=False)
    except UserError as e:  # an AVX512-BF16 CPU: the inference repack would have run
        assert "quantization.load_in_4bit: false" in str(e)
    else:  # no repack on this CPU: the same kernels as with the fix
        assert err < 1e-4


def test_qlora_gradients_are_the_same_after_an_inference_forward(tiny_model):
    """bitsandbytes repacks a 4-bit weight for inference on an AVX512-BF16 CPU at the first eval-mode no-grad forward
    (PPO's generation) and then multiplies with a kernel that has no autograd: LoRA gradients below it came out wrong
    (QLoRA PPO ran to KL 15). prepare_quantized keeps the training layout. On a CPU without AVX512-BF16 the repack
    never happens and this passes either way."""
    from peft import get_peft_model

    m = ModelSection(name_or_path=str(tiny_model))
    q = QuantizationSection(load_in_4bit=True, compute_dtype="float32")
    tok = models.load_tokenizer(m)
    ids = tok(["the plot was great. the music felt long."], return_tensors="pt").input_ids

    def first_layer_grads(inference_first: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = models.prepare_quantized(models.load_causal_lm(m, q, tok))
        model = get_peft_model(model, models.lora_config(LoraSection(enabled=True, r=4, dropout=0.0), model, "CAUSAL_LM"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.1)  # B = 0 would hide the input gradient LoRA layers pass down
        if inference_first:
            model.eval()
            with torch.no_grad():
                model(ids)
            model.train()
        model(ids, labels=ids).loss.backward()
        return model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad

    plain, after_inference = first_layer_grads(False), first_layer_grads(True)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(after_inference, plain, rtol=1e-5, atol=1e-6)
