"""`hfalign convert chatglm`: a ChatGLM2/3 checkpoint as transformers' native GLM. A tiny ChatGLM3 checkpoint is
written here in ChatGLM's own layout (weight names, config keys, SentencePiece tokenizer.model); the converted model
must give the logits of a reference forward pass written below from ChatGLM's published architecture ([seq, batch]
layout, RMSNorm, multi-query groups, rotary on half of each head in interleaved pairs, fused SwiGLU)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import cli, train_shipped

CONFIG = {  # a ChatGLM3-6B config.json, shrunk
    "model_type": "chatglm", "architectures": ["ChatGLMModel"],
    "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"},
    "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "kv_channels": 16, "num_attention_heads": 4,
    "multi_query_attention": True, "multi_query_group_num": 2, "seq_length": 128, "layernorm_epsilon": 1e-5,
    "rmsnorm": True, "apply_residual_connection_post_layernorm": False, "post_layer_norm": True,
    "add_bias_linear": False, "add_qkv_bias": True, "original_rope": True, "rope_ratio": 2.5,
    "torch_dtype": "float32", "eos_token_id": 2, "pad_token_id": 0,
}
WORDS = "the plot was great . script felt dull review of write a red door music".split()


def sentencepiece_model() -> bytes:
    """A SentencePiece BPE model like ChatGLM's: <unk> <s> </s>, 256 byte-fallback pieces, then pieces whose scores
    rank the merges (every prefix of every word, shorter first)."""
    from transformers.convert_slow_tokenizer import import_protobuf

    pb = import_protobuf()
    m = pb.ModelProto()
    for piece, kind in (("<unk>", 2), ("<s>", 3), ("</s>", 3)):
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, 0.0, kind
    for b in range(256):
        p = m.pieces.add()
        p.piece, p.score, p.type = f"<0x{b:02X}>", 0.0, 6
    normal = sorted({w[:k] for w in ["▁" + x for x in WORDS] + list("▁abcdefghijklmnopqrstuvwxyz.")
                     for k in range(1, len(w) + 1)}, key=lambda x: (len(x), x))
    for piece in normal:
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, -float(len(piece)), 1
    m.trainer_spec.model_type, m.trainer_spec.byte_fallback = 2, True  # BPE
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.trainer_spec.unk_piece = "<unk>"
    m.normalizer_spec.name, m.normalizer_spec.add_dummy_prefix = "identity", True
    m.normalizer_spec.escape_whitespaces, m.normalizer_spec.remove_extra_whitespaces = True, False
    return m.SerializeToString()


@pytest.fixture(scope="module")
def chatglm_dir(tmp_path_factory):
    """A ChatGLM3 checkpoint in ChatGLM's layout, random weights (norms and biases too: a swap would show)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("chatglm3")
    (root / "tokenizer.model").write_bytes(sentencepiece_model())
    n = 3 + 256 + len({w[:k] for w in ["▁" + x for x in WORDS] + list("▁abcdefghijklmnopqrstuvwxyz.")
                       for k in range(1, len(w) + 1)})
    cfg = {**CONFIG, "padded_vocab_size": (n + 9 + 63) // 64 * 64}
    (root / "config.json").write_text(json.dumps(cfg))
    H, F_, hn, nh, g, V = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["kv_channels"], cfg["num_attention_heads"], \
        cfg["multi_query_group_num"], cfg["padded_vocab_size"]
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    w = {"transformer.embedding.word_embeddings.weight": rnd(V, H, scale=1.0),
         "transformer.rotary_pos_emb.inv_freq": torch.zeros(hn // 4),  # a buffer some checkpoints carry
         "transformer.encoder.final_layernorm.weight": 1 + rnd(H), "transformer.output_layer.weight": rnd(V, H)}
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        w |= {p + "input_layernorm.weight": 1 + rnd(H), p + "post_attention_layernorm.weight": 1 + rnd(H),
              p + "self_attention.query_key_value.weight": rnd((nh + 2 * g) * hn, H),
              p + "self_attention.query_key_value.bias": rnd((nh + 2 * g) * hn),
              p + "self_attention.dense.weight": rnd(H, nh * hn),
              p + "mlp.dense_h_to_4h.weight": rnd(2 * F_, H), p + "mlp.dense_4h_to_h.weight": rnd(H, F_)}
    save_file(w, str(root / "model.safetensors"))
    return root


def chatglm_reference_logits(w: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """ChatGLM2/3's forward pass, from its published architecture, in its own [seq, batch, ...] layout."""
    s, b = ids.shape[1], ids.shape[0]
    nh, g, hn, eps = cfg["num_attention_heads"], cfg["multi_query_group_num"], cfg["kv_channels"], cfg["layernorm_epsilon"]
    rot = hn // 2  # RotaryEmbedding(kv_channels // 2): only the first half of each head turns
    theta = 1.0 / ((10000 * cfg["rope_ratio"]) ** (torch.arange(0, rot, 2).float() / rot))
    angles = torch.outer(torch.arange(s).float(), theta)[:, None, None, :]  # [s, 1, 1, rot/2]
    cos, sin = angles.cos(), angles.sin()

    def rope(x):  # [s, b, heads, hn]; pairs (0,1), (2,3), ... of the first `rot` channels
        pairs = x[..., :rot].reshape(*x.shape[:-1], rot // 2, 2)
        turned = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], -1)
        return torch.cat([turned.flatten(-2), x[..., rot:]], -1)

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def groups(x):  # [s, b, g, hn] -> [s, b, nh, hn]: group j serves query heads j*nh/g ... (j+1)*nh/g - 1
        return x.unsqueeze(3).expand(s, b, g, nh // g, hn).reshape(s, b, nh, hn)

    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)
    h = w["transformer.embedding.word_embeddings.weight"][ids].transpose(0, 1)  # [s, b, H]
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        x = rms(h, w[p + "input_layernorm.weight"])
        qkv = x @ w[p + "self_attention.query_key_value.weight"].T + w[p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split([nh * hn, g * hn, g * hn], -1)
        q, k, v = rope(q.reshape(s, b, nh, hn)), groups(rope(k.reshape(s, b, g, hn))), groups(v.reshape(s, b, g, hn))
        scores = torch.einsum("sbnd,tbnd->bnst", q, k) / math.sqrt(hn)
        probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
        context = torch.einsum("bnst,tbnd->sbnd", probs, v).reshape(s, b, nh * hn)
        h = h + context @ w[p + "self_attention.dense.weight"].T
        gate, up = (rms(h, w[p + "post_attention_layernorm.weight"]) @ w[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, -1)
        h = h + (F.silu(gate) * up) @ w[p + "mlp.dense_4h_to_h.weight"].T
    h = rms(h, w["transformer.encoder.final_layernorm.weight"])
    return (h @ w["transformer.output_layer.weight"].T).transpose(0, 1)  # [b, s, V]


@pytest.fixture(scope="module")
def converted(chatglm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "chatglm3-glm"
    code, stdout, err = cli("convert", "chatglm", str(chatglm_dir), str(out))
    assert code == 0, err
    assert "native glm" in stdout
    return out


def test_converted_model_gives_chatglm_logits(chatglm_dir, converted):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    assert type(model).__name__ == "GlmForCausalLM" and model.config.model_type == "glm"
    cfg = json.loads((chatglm_dir / "config.json").read_text())
    ids = torch.randint(0, cfg["padded_vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    expected = chatglm_reference_logits(load_file(str(chatglm_dir / "model.safetensors")), cfg, ids)
    with torch.no_grad():
        got = model(ids).logits
    assert expected.abs().mean() > 0.1  # not a trivially small signal
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_converted_tokenizer_keeps_chatglm_ids_and_chat_layout(converted):
    from transformers import AutoTokenizer

    from hfalign import models
    from hfalign.convert import CHATGLM_SPECIAL
    from hfalign.recipe import ModelSection

    tok = AutoTokenizer.from_pretrained(converted)
    n = tok.convert_tokens_to_ids(CHATGLM_SPECIAL[0])
    assert tok.convert_tokens_to_ids(CHATGLM_SPECIAL) == list(range(n, n + len(CHATGLM_SPECIAL)))  # ChatGLM's order
    assert tok.eos_token == "</s>" and tok.eos_token_id == 2 and tok.pad_token_id == 0 == tok.unk_token_id
    assert tok.convert_ids_to_tokens(tok("the plot was great.").input_ids) == ["▁the", "▁plot", "▁was", "▁great", "."]
    assert tok.decode(tok("the plot was great.").input_ids) == "the plot was great."
    assert tok.decode(tok("é").input_ids) == "é"  # an unknown character through byte fallback, as SentencePiece does
    turn = [{"role": "user", "content": "write a review"}]
    assert tok.apply_chat_template(turn, tokenize=False, add_generation_prompt=True) == \
        "[gMASK]sop<|user|>\nwrite a review<|assistant|>\n"
    ids = tok.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids[:3] == tok.convert_tokens_to_ids(["[gMASK]", "sop", "<|user|>"])
    # what hfalign makes of it: a pad distinct from EOS (unk), PPO stops at EOS, <|user|> and <|observation|>
    loaded = models.load_tokenizer(ModelSection(name_or_path=str(converted)))
    assert loaded.pad_token_id == 0 != loaded.eos_token_id
    from transformers import GenerationConfig

    stops = tok.convert_tokens_to_ids(["</s>", "<|user|>", "<|observation|>"])
    assert GenerationConfig.from_pretrained(converted).eos_token_id == stops


def test_converted_model_trains_with_the_chatglm3_template(converted, tmp_path):
    """recipes/chatglm3/sft.yaml (LoRA, bf16, activation checkpointing) on the converted tiny model."""
    from helpers import ROOT

    out = tmp_path / "sft"
    code, _, err = train_shipped("chatglm3/sft.yaml", f"output_dir={out}", f"model.name_or_path={converted}",
                                 f"data.train={ROOT / 'data/sft_train.jsonl'}", "data.max_rows=64",
                                 "train.max_steps=4", "train.per_device_train_batch_size=8",
                                 "train.gradient_accumulation_steps=1", "train.max_length=64", "train.eval_steps=4",
                                 "train.save_steps=4")
    assert code == 0, err[-3000:]
    assert (out / "adapter_model.safetensors").is_file()


def test_convert_refuses_what_it_cannot_convert(chatglm_dir, converted, tmp_path):
    code, _, err = cli("convert", "chatglm", str(chatglm_dir), str(converted))
    assert code == 2 and "already holds a model" in err
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "chatglm", "num_layers": 2}))  # ChatGLM-6B (v1)
    (other / "tokenizer.model").write_bytes(b"")
    code, _, err = cli("convert", "chatglm", str(other), str(tmp_path / "out"))
    assert code == 2 and "not a ChatGLM2/ChatGLM3 config" in err
    (other / "config.json").write_text(json.dumps({**CONFIG, "padded_vocab_size": 512, "rmsnorm": False}))
    code, _, err = cli("convert", "chatglm", str(other), str(tmp_path / "out"))
    assert code == 2 and "rmsnorm = False" in err
    assert not (tmp_path / "out").exists()  # nothing half-written
