"""Embedding rows the base never trained, for the tokens a LoRA run's data uses -- found before training, trained.

LLaMA-3 base ships its chat header and end-of-turn tokens (<|start_header_id|>, <|end_header_id|>, <|eot_id|>) with
all-zero rows, as many bases ship tokens their pretraining never used. LoRA freezes the embeddings, so such a token
stays invisible (a zero row is a zero vector after the first norm, whose gradient there is huge: NaNs) and, untied, its
output row gives a constant logit: SFT on the chat template cannot learn where a turn starts or ends. hfalign starts
those rows at the mean trained row (Unsloth's fix) and trains exactly them beside the adapter (PEFT's
`trainable_token_indices`, input and output rows; tied bases share one), saved in the adapter, so merge, export,
generate, eval and the PPO shared base all see them. `lora.train_untrained_tokens: false` turns it off.

A row counts as untrained when its norm is below 1e-3 x the median row's: zero or numerically zero, as shipped. A
never-trained row left at its random initialisation cannot be told from a trained one by its weights, and is not found.
"""

from __future__ import annotations

from contextlib import nullcontext

SAMPLE_ROWS = 2000  # rows of the training data whose tokens are looked at
THRESHOLD = 1e-3  # x the median row norm


def _conversation(value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def used_token_ids(tok, dataset) -> set[int]:
    """Token ids of the first SAMPLE_ROWS rows as the trainers render them: conversations through the chat template
    (a prompt before each conversational answer), plain text as it is, and EOS."""
    ids = {i for i in (tok.eos_token_id, tok.bos_token_id) if i is not None}
    for row in dataset.select(range(min(SAMPLE_ROWS, len(dataset)))):
        prompt = row.get("prompt") if _conversation(row.get("prompt")) else []
        for key, value in row.items():
            if _conversation(value):
                messages = value if key in ("prompt", "messages") else [*prompt, *value]
                text = tok.apply_chat_template(messages, tokenize=False)
            elif isinstance(value, str):
                text = value
            else:
                continue
            ids.update(tok(text, add_special_tokens=not _conversation(value))["input_ids"])
    return ids


def _gathered(weight):
    """ZeRO-3 partitions weights at load: gather this one (rank 0 may modify it) while it is read or written."""
    if hasattr(weight, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([weight], modifier_rank=0)
    return nullcontext()


def _row_weights(model) -> list:
    """The input embedding and, when untied (another tensor), the output embedding."""
    inp = model.get_input_embeddings().weight
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = getattr(out, "weight", None)
    return [inp] if out is None or out is inp or out.shape != inp.shape else [inp, out]


def _trained(weight):
    """Which rows count as trained: norm above THRESHOLD x the median row's (see the module doc)."""
    norms = weight.detach().float().norm(dim=1)
    return norms > THRESHOLD * norms.median()


def untrained(model, ids: set[int]) -> list[int]:
    """Which of `ids` have an untrained input or output row (see the module doc)."""
    found = set()
    for weight in _row_weights(model):
        with _gathered(weight):
            low = (~_trained(weight)).nonzero().flatten().tolist()
        found.update(i for i in low if i in ids)
    return sorted(found)


def start_at_mean(model, rows: list[int]) -> None:
    """Set `rows` of the input (and untied output) embedding to the mean of the trained rows: a start the first norm
    can take (a zero row is not)."""
    import torch

    for weight in _row_weights(model):
        with _gathered(weight), torch.no_grad():
            weight[rows] = weight[_trained(weight)].float().mean(dim=0).to(weight.dtype)


def trainable_token_indices(model, rows: list[int]) -> dict[str, list[int]]:
    """PEFT's trainable_token_indices for `rows`: the input embedding, and the output embedding when untied."""
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    out = {names[id(model.get_input_embeddings())]: rows}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and len(_row_weights(model)) == 2:
        out[names[id(head)]] = rows
    return out


def describe(tok, rows: list[int], limit: int = 6) -> str:
    names = [tok.convert_ids_to_tokens(i) for i in rows[:limit]]
    return ", ".join(names) + (f" and {len(rows) - limit} more" if len(rows) > limit else "")
