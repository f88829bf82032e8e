"""`hfalign convert chatglm SRC OUT`: a ChatGLM2 / ChatGLM3 checkpoint as transformers' native GLM (`glm`).

ChatGLM2/3 ship their own Python code (`trust_remote_code`), written for transformers 4.x: its generation calls
`GenerationMixin._extract_past_from_model_output`, which transformers 5 no longer has. Their architecture is the one
transformers' native `glm` implements (GLM-4-9B-chat-hf was converted the same way), so the weights carry over as
they are, renamed:

    transformer.embedding.word_embeddings           -> model.embed_tokens
    transformer.encoder.layers.N.input_layernorm    -> model.layers.N.input_layernorm          (RMSNorm)
    ...self_attention.query_key_value [q; k; v]     -> ...self_attn.{q,k,v}_proj (rows split; multi-query groups)
    ...self_attention.dense                         -> ...self_attn.o_proj
    ...post_attention_layernorm                     -> ...post_attention_layernorm
    ...mlp.dense_h_to_4h [gate; up] (fused SwiGLU)  -> ...mlp.gate_up_proj
    ...mlp.dense_4h_to_h                            -> ...mlp.down_proj
    transformer.encoder.final_layernorm             -> model.norm
    transformer.output_layer                        -> lm_head

Rotary embeddings: ChatGLM rotates the first half of each head in interleaved pairs with base 10000 * rope_ratio;
native GLM does the same with partial_rotary_factor 0.5. The tokenizer is ChatGLM's SentencePiece model
(tokenizer.model) as a fast tokenizer, read with protobuf (no sentencepiece needed), with ChatGLM's special tokens at
their ids after the SentencePiece vocabulary ([gMASK] sop <|user|> ...) and a chat template in ChatGLM3's layout.
The equivalence of the forward pass is tested against a reference of ChatGLM's forward (tests/test_convert.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hfalign.errors import UserError

# ChatGLM's tokenizer adds these after the SentencePiece vocabulary, in this order (ChatGLM2 has the first five)
CHATGLM_SPECIAL = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                   "<|observation|>"]
CHATGLM3_TEMPLATE = (
    "[gMASK]sop{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# architecture switches of ChatGLM2/3 that native GLM fixes: (config key, the value GLM implements)
FIXED = {"rmsnorm": True, "apply_residual_connection_post_layernorm": False, "add_bias_linear": False,
         "post_layer_norm": True, "original_rope": True}
LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
TOP_RENAMES = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}


def _source_dir(src: str) -> Path:
    if os.path.isdir(src):
        return Path(src)
    from huggingface_hub import snapshot_download

    try:  # the weights, configs and the SentencePiece model; not the remote code (it is not run)
        return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.bin", "tokenizer.model"]))
    except Exception as e:  # offline, unknown id, gated
        raise UserError(f"could not get {src!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                        fix="give a local directory holding the checkpoint, or check the id and your network") from None


def glm_config(cfg: dict, where: str):
    """transformers.GlmConfig for a ChatGLM2/3 config.json (as a dict)."""
    from transformers import GlmConfig

    if cfg.get("model_type") != "chatglm" or "multi_query_attention" not in cfg:
        raise UserError(f"{where} is not a ChatGLM2/ChatGLM3 config (model_type {cfg.get('model_type')!r}); ChatGLM-6B "
                        "(the first one) is a different architecture.", fix="give a ChatGLM2 or ChatGLM3 checkpoint")
    for key, value in FIXED.items():
        if cfg.get(key, value) != value:
            raise UserError(f"{where}: {key} = {cfg[key]!r}; transformers' GLM implements only {key} = {value!r}.",
                            fix="this checkpoint needs its own code; it cannot be converted")
    heads = cfg["num_attention_heads"]
    return GlmConfig(
        vocab_size=cfg["padded_vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["ffn_hidden_size"],
        num_hidden_layers=cfg["num_layers"], num_attention_heads=heads,
        num_key_value_heads=cfg["multi_query_group_num"] if cfg["multi_query_attention"] else heads,
        head_dim=cfg.get("kv_channels", cfg["hidden_size"] // heads), hidden_act="silu",
        max_position_embeddings=cfg.get("seq_length", 8192), rms_norm_eps=cfg.get("layernorm_epsilon", 1e-5),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * cfg.get("rope_ratio", 1)},
        attention_bias=cfg.get("add_qkv_bias", True), tie_word_embeddings=False,
        dtype=cfg.get("torch_dtype") or cfg.get("dtype") or "float16",
    )


def glm_state_dict(chatglm: dict, config) -> dict:
    """ChatGLM2/3 weights renamed (and q/k/v split) for native GLM; every source weight must be used."""
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    out, left = {}, dict(chatglm)
    left.pop("transformer.rotary_pos_emb.inv_freq", None)  # recomputed from rope_theta
    for old, new in TOP_RENAMES.items():
        out[new] = left.pop(old)
    for i in range(config.num_hidden_layers):
        src, dst = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        for old, new in LAYER_RENAMES.items():
            out[dst + new] = left.pop(src + old)
        for kind in ("weight", "bias"):
            fused = left.pop(f"{src}self_attention.query_key_value.{kind}")
            q, k, v = fused.split([q_rows, kv_rows, kv_rows], dim=0)
            for name, part in (("q", q), ("k", k), ("v", v)):
                out[f"{dst}self_attn.{name}_proj.{kind}"] = part.contiguous()
    if left:
        raise UserError(f"the checkpoint has weights native GLM has no place for: {', '.join(sorted(left)[:5])}",
                        fix="this is not a ChatGLM2/3 checkpoint hfalign can convert")
    return out


def _read_weights(src: Path) -> dict:
    import torch

    files = sorted(src.glob("*.safetensors")) or sorted(src.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"{src} holds no *.safetensors or pytorch_model*.bin weights.", fix="give a complete checkpoint")
    weights = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            weights.update(load_file(str(f)))
        else:
            weights.update(torch.load(f, map_location="cpu", weights_only=True))
    return weights


def chatglm_tokenizer(model_file: Path):
    """ChatGLM's SentencePiece model as a fast tokenizer: the same pieces at the same ids, ChatGLM's special tokens
    after them, EOS </s>, pad <unk> (as ChatGLM pads), left padding, ChatGLM3's chat layout."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    if backend is None:
        raise UserError(f"{model_file} is not a SentencePiece BPE model.", fix="give ChatGLM's tokenizer.model")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHATGLM_SPECIAL])
    n = len(proto.pieces)
    assert backend.token_to_id(CHATGLM_SPECIAL[-1]) == n + len(CHATGLM_SPECIAL) - 1  # ChatGLM's ids, in order
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", pad_token="<unk>",
                                  padding_side="left")
    tok.chat_template = CHATGLM3_TEMPLATE
    return tok


def convert_chatglm(src: str, out: str | os.PathLike) -> Path:
    """Write SRC (a ChatGLM2/3 directory or hub id) to OUT as a native GLM checkpoint with its tokenizer."""
    import torch
    from transformers import GenerationConfig, GlmForCausalLM

    source, out = _source_dir(src), Path(out)
    if (out / "config.json").exists():
        raise UserError(f"{out} already holds a model.", fix="choose another output directory or remove it")
    config_path = source / "config.json"
    if not config_path.is_file() or not (source / "tokenizer.model").is_file():
        raise UserError(f"{source} needs config.json and tokenizer.model (a ChatGLM2/3 checkpoint).", fix="check SRC")
    config = glm_config(json.loads(config_path.read_text(encoding="utf-8")), str(config_path))
    tok = chatglm_tokenizer(source / "tokenizer.model")
    stops = [tok.eos_token_id, *tok.convert_tokens_to_ids(["<|user|>", "<|observation|>"])]
    config.pad_token_id, config.eos_token_id, config.bos_token_id = tok.pad_token_id, stops, None
    weights = glm_state_dict(_read_weights(source), config)
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    model.load_state_dict(weights, strict=True, assign=True)
    model.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=tok.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
