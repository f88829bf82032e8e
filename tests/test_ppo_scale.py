"""PPO as real users run it: on-policy sampling whatever the checkpoint's generation_config says, correct gradients
under activation checkpointing with adapter stacks, seeded reproducibility, rollout tensors on the accelerator's
device, and logits memory that does not scale with the prompt or with copies of the vocabulary."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import ROOT, read_jsonl, train_shipped

from hfalign.ppo import core
from hfalign.ppo.config import PPOConfig
from hfalign.ppo.rollout import Rollout, left_pad
from hfalign.ppo.trainer import PPOTrainer


@pytest.fixture(scope="module")
def wild_sft(pipeline, tmp_path_factory):
    """The SFT model with attention dropout on and a generation_config that would change sampling (greedy top_k=1,
    repetition penalty): what a hub checkpoint can carry."""
    out = tmp_path_factory.mktemp("wild") / "sft"
    shutil.copytree(pipeline["sft"], out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["attention_dropout"] = 0.1
    (out / "config.json").write_text(json.dumps(cfg))
    gen = json.loads((out / "generation_config.json").read_text())
    gen.update(top_k=1, repetition_penalty=1.3, temperature=0.3, do_sample=False)
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out


def make_trainer(policy_dir, rm_dir, tmp_path, peft: bool = False, checkpointed: bool = False, **overrides) -> PPOTrainer:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_dir, padding_side="left")
    prompts = read_jsonl(ROOT / "data/ppo_prompts.jsonl")[:64]
    kw = dict(output_dir=str(tmp_path / "api"), per_device_train_batch_size=8, num_mini_batches=2, num_ppo_epochs=2,
              total_episodes=16, response_length=16, temperature=0.7, report_to="none", save_strategy="no", seed=0,
              learning_rate=1e-3, local_rollout_forward_batch_size=512)
    kw.update(overrides)
    value = None if peft else AutoModelForSequenceClassification.from_pretrained(rm_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    if checkpointed:  # as PEFT's prepare_model_for_kbit_training hands it over
        policy.gradient_checkpointing_enable({"use_reentrant": False})
    return PPOTrainer(args=PPOConfig(**kw), processing_class=tok, model=policy,
                      reward_model=AutoModelForSequenceClassification.from_pretrained(rm_dir), value_model=value,
                      train_dataset=datasets.Dataset.from_list(prompts),
                      peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM") if peft else None)


@pytest.mark.parametrize("peft", [False, True], ids=["full", "shared-base"])
def test_sampling_is_the_temperature_softmax_whatever_the_checkpoint_says(wild_sft, pipeline, tmp_path, peft):
    """Pitfall 16: a checkpoint's generation_config (top_k=1, repetition_penalty 1.3) must not change what PPO samples;
    the first sampled token follows softmax(logits / 0.7). And with lr 0 the ratio is exactly 1 (pitfall 1) on a
    model that carries dropout, at that temperature."""
    trainer = make_trainer(wild_sft, pipeline["rm"], tmp_path, peft=peft, response_length=1)
    tok = trainer.tokenizer
    prompt = tok("Write a review of the red door. the")["input_ids"]  # next: one of 8 subjects, none dominant
    n = 4000
    q, m = left_pad([prompt] * n, tok.pad_token_id)
    torch.manual_seed(0)
    sampled = trainer.generator(trainer.model, trainer.accelerator, q, m, "policy")[:, 0]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logits, _ = trainer.model(ids, torch.ones_like(ids), core.position_ids(torch.ones_like(ids)), mode="train")
    expected = torch.softmax(logits[0, -1].float() / 0.7, -1)
    observed = torch.bincount(sampled, minlength=expected.numel()).float() / n
    assert expected.max() < 0.6  # the test means something: no single token dominates
    assert 0.5 * (observed - expected).abs().sum() < 0.05  # total variation distance: sampling noise only

    trainer = make_trainer(wild_sft, pipeline["rm"], tmp_path, peft=peft, learning_rate=0.0, total_episodes=16)
    trainer.train()
    (log,) = [h for h in trainer.state.log_history if "objective/kl" in h]
    assert log["val/ratio"] == pytest.approx(1.0, abs=1e-6) and log["policy/approxkl_avg"] < 1e-10
    assert log["policy/clipfrac_avg"] == 0.0


def _adapter_grads(wrapper, loss_of) -> dict[str, torch.Tensor]:
    wrapper.zero_grad(set_to_none=True)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46], [0, 0, 1, 50, 51, 52, 53, 54]])
    mask = (ids != 0).long()
    logits, values = wrapper(ids, mask, core.position_ids(mask), mode="train")
    loss_of(logits, values).backward()
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in wrapper.named_parameters()
            if ".default." in n or ".value." in n}


def test_checkpointing_recomputes_each_pass_under_its_own_adapter(pipeline, tmp_path):
    """Pitfall 17: with one base carrying the policy and value adapters, activation checkpointing (reentrant or not)
    gives every adapter exactly the gradients it gets without checkpointing; a value-only loss gives the policy
    adapter nothing."""
    trainer = make_trainer(pipeline["sft"], pipeline["rm"], tmp_path, peft=True)
    wrapper = trainer.model
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B and the value head start at zero, which would hide every gradient
        for n, p in wrapper.named_parameters():
            if "lora_B" in n or n.startswith("value_head"):
                p.normal_(0, 0.1)
    wrapper.train()
    value_only = lambda logits, values: values.pow(2).sum()  # noqa: E731
    policy_only = lambda logits, values: logits.float().logsumexp(-1).sum()  # noqa: E731
    results = {}
    for mode in ("off", "non-reentrant", "reentrant"):
        if mode != "off":
            wrapper.activation_checkpointing_enable({"use_reentrant": mode == "reentrant"})
            assert wrapper.is_activation_checkpointing
        results[mode] = (_adapter_grads(wrapper, value_only), _adapter_grads(wrapper, policy_only))
    off_value, off_policy = results["off"]
    assert any(g.abs().sum() > 0 for n, g in off_value.items() if ".value." in n)
    assert all(g.abs().sum() == 0 for n, g in off_value.items() if ".default." in n)
    for mode in ("non-reentrant", "reentrant"):
        value, policy = results[mode]
        for name in off_value:
            assert torch.allclose(value[name], off_value[name], atol=1e-6), (mode, name)
            assert torch.allclose(policy[name], off_policy[name], atol=1e-6), (mode, name)
        assert all(g.abs().sum() == 0 for n, g in value.items() if ".default." in n), mode
    # Issue 18 item 12: a model that arrives checkpointed (not through args) gets the same, once training starts
    arrived = make_trainer(pipeline["sft"], pipeline["rm"], tmp_path, peft=True, checkpointed=True)
    arrived.model.load_state_dict(wrapper.state_dict())
    arrived.model.wrap_checkpointed_layers()  # what the training loop does first
    arrived.model.train()
    assert arrived.model.is_activation_checkpointing
    value = _adapter_grads(arrived.model, value_only)
    for name in off_value:
        assert torch.allclose(value[name], off_value[name], atol=1e-6), ("arrived", name)


def test_same_recipe_and_seed_give_identical_runs(tiny_model, tmp_path):
    """Pitfall 19: LoRA adapters and fresh heads are initialised after seeding, so two runs of the same recipe end
    with identical weights and metrics, in every stage."""
    from safetensors.torch import load_file

    def run_all(root, rng_state: int):
        sft, rm, ppo = root / "sft", root / "rm", root / "ppo"
        lora = ["lora.enabled=true", "lora.r=4", "train.learning_rate=1e-2", "data.max_rows=128",
                "train.num_train_epochs=1"]
        for recipe, args in (("sft.yaml", [f"output_dir={sft}", f"model.name_or_path={tiny_model}", *lora]),
                             ("rm.yaml", [f"output_dir={rm}", f"model.name_or_path={tiny_model}", f"model.adapter={sft}",
                                          *lora]),
                             ("ppo.yaml", [f"output_dir={ppo}", f"model.name_or_path={tiny_model}", f"model.adapter={sft}",
                                           f"reward.model={rm}", "lora.enabled=true", "lora.r=4",
                                           "train.total_episodes=64", "train.num_eval_prompts=8"])):
            torch.manual_seed(rng_state)  # whatever ran before in this process (or did not) must not matter
            torch.rand(rng_state)
            code, _, err = train_shipped(recipe, *args)
            assert code == 0, err[-3000:]
        return sft, rm, ppo

    first, second = run_all(tmp_path / "a", 1), run_all(tmp_path / "b", 2)
    volatile = ("runtime", "per_second", "timing/", "eps")
    for a, b in zip(first, second):
        wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), a.name
        ma, mb = (read_jsonl(d / "metrics.jsonl") for d in (a, b))
        strip = lambda rows: [{k: v for k, v in r.items() if not any(s in k for s in volatile)} for r in rows]  # noqa: E731
        assert strip(ma) == strip(mb), a.name
    va, vb = (load_file(str(d / "value" / "adapter_model.safetensors")) for d in (first[2], second[2]))
    assert all(torch.equal(va[k], vb[k]) for k in va)


def test_reward_function_scores_land_on_the_accelerator_device(pipeline, tmp_path):
    """Every rollout tensor lives on accelerator.device; a Python reward function's scores too (they met CUDA
    tensors and crashed). On CPU the accelerator's device is faked as 'meta' to tell the two apart."""
    from types import SimpleNamespace

    trainer = make_trainer(pipeline["sft"], pipeline["rm"], tmp_path)
    trainer.reward_fn = lambda prompts, completions: [1.0] * len(completions)
    real, trainer.accelerator = trainer.accelerator, SimpleNamespace(device=torch.device("meta"))
    try:
        from hfalign.ppo.rollout import call_reward_fn

        assert call_reward_fn(trainer.reward_fn, ["p"] * 3, ["c"] * 3, trainer.accelerator.device).device.type == "meta"
    finally:
        trainer.accelerator = real
    q, m = left_pad(trainer.prompts[:4], trainer.tokenizer.pad_token_id)
    r = trainer.rollout(q, m)
    tensors = {k: v for k, v in vars(r).items() if isinstance(v, torch.Tensor)}
    assert len(tensors) == 12 and all(v.device == trainer.accelerator.device for v in tensors.values())


def test_update_keeps_one_copy_of_response_logits(tmp_path, pipeline):
    """Pitfall 18, at a 32k vocabulary: what one micro-step saves for backward holds the logits of the response
    positions once (no prompt positions, no fp32 / temperature / log-softmax / entropy copies)."""
    import datasets
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    vocab = 32768
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(pipeline["sft"], padding_side="left")
    args = PPOConfig(output_dir=str(tmp_path / "m"), per_device_train_batch_size=4, report_to="none",
                     save_strategy="no", temperature=0.7, total_episodes=4)
    trainer = PPOTrainer(args=args, processing_class=tok, model=LlamaForCausalLM(cfg),
                         value_model=LlamaForSequenceClassification(cfg.__class__(**{**cfg.to_dict(), "num_labels": 1})),
                         reward_model=lambda p, c: [0.0] * len(c),
                         train_dataset=datasets.Dataset.from_list([{"prompt": "a"}] * 4))
    B, Q, T = 4, 24, 16
    full = torch.randint(3, vocab, (B, Q + T))
    attn = torch.ones_like(full)
    zeros = torch.zeros(B, T)
    r = Rollout(queries=full[:, :Q], responses=full[:, Q:], full=full, attn=attn, pos=core.position_ids(attn),
                mask=torch.ones(B, T, dtype=torch.long), last=torch.full((B,), T - 1), has_eos=torch.ones(B, dtype=torch.bool),
                logprobs=zeros - 10, ref_logprobs=zeros - 10, values=zeros, scores=torch.zeros(B))
    saved, weights = [], {p.data_ptr() for p in trainer.model.parameters()}

    def pack(t):
        if t.dim() and t.shape[-1] == vocab and t.data_ptr() not in weights:  # activations over the vocabulary
            saved.append(t.numel() * t.element_size())
        return t

    trainer.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer._micro_steps(trainer.model, r, torch.randn(B, T), torch.randn(B, T))(torch.arange(B))
    one_copy = B * (T + 1) * vocab * 4  # fp32 logits of the response positions (+1: the slice keeps one more)
    assert 0 < sum(saved) <= one_copy, (sum(saved) / one_copy, saved)


def test_precision_comes_from_the_launch_unless_the_recipe_says(write_recipe, sft_recipe, monkeypatch):
    """One rule for every stage: train.bf16/fp16 if set, else the launch's mixed precision; under DeepSpeed a
    disagreement is one clear line naming both."""
    from helpers import cli

    from hfalign import preflight, recipe, trainargs

    path = write_recipe(sft_recipe)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    r = preflight.check(recipe.load(path)).recipe
    assert trainargs.precision(r) == "bf16"
    args = trainargs.build(r, preflight.stages.get("sft").config_class(), probe=True)
    assert args.bf16 and not args.fp16
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    code, _, err = cli("validate", str(path), "train.bf16=false")
    assert code == 2 and "mixed precision 'bf16'" in err and "train.bf16/train.fp16 for 'no'" in err
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    assert trainargs.precision(recipe.load(path, ["train.bf16=false"])) == "no"  # without DeepSpeed the recipe wins
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert trainargs.precision(recipe.load(path)) == "no"


def test_heads_and_values_stay_fp32_under_bf16_autocast_and_bf16_storage(pipeline, tmp_path):
    """Pitfall 11 under mixed precision: autocast would run the value head's matmul in bf16, and DeepSpeed bf16
    stores the head in bf16; the head still computes in fp32 (from the stored weight) in both cases."""
    trainer = make_trainer(pipeline["sft"], pipeline["rm"], tmp_path)
    wrapper = trainer.model
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    mask, pos = torch.ones_like(ids), core.position_ids(torch.ones_like(ids))
    with torch.no_grad():
        _, plain = wrapper(ids, mask, pos, mode="train")
        hidden = wrapper._hidden(wrapper.critic, ids, mask, pos)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, auto = wrapper(ids, mask, pos, mode="train")
            head = wrapper.critic.score(hidden.bfloat16())
    assert auto.dtype == torch.float32 and head.dtype == torch.float32
    exact = hidden.bfloat16().float() @ wrapper.critic.score.weight.float().T
    assert torch.equal(head, exact)  # an fp32 product of the bf16 input, not a bf16 matmul
    wrapper.store_heads_as(torch.bfloat16)
    assert wrapper.critic.score.weight.dtype == torch.bfloat16
    with torch.no_grad():
        _, stored = wrapper(ids, mask, pos, mode="train")
    assert stored.dtype == torch.float32 and torch.allclose(stored, plain, atol=0.05)


def test_score_read_at_the_stop_token_in_a_mixed_left_padded_batch(pipeline, tmp_path):
    """Pitfalls 4, 8, 9: prompts of different lengths (left padding) and responses that end at EOS, at another stop
    token, or not at all (truncated): each score equals the reward model's own score of prompt + response up to and
    including its stop token, computed alone; truncated responses are penalised."""
    from transformers import AutoModelForSequenceClassification

    stop = 300  # any token id: declared a stop token for this run
    trainer = make_trainer(pipeline["sft"], pipeline["rm"], tmp_path, stop_token_ids=[stop], missing_eos_penalty=1.0,
                           normalize_scores=False)
    tok = trainer.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert trainer.stop_ids == [eos, stop]
    prompts = [tok("Write a review of the red door.")["input_ids"], tok("Write a review of it.")["input_ids"],
               tok("Write a review of the quiet winter river, please.")["input_ids"]]
    responses = torch.tensor([[40, 41, eos, 42, 43, 44],  # EOS, then tokens generate would not produce (all masked)
                              [50, stop, 51, 52, 53, 54],  # an end-of-turn token
                              [60, 61, 62, 63, 64, 65]])  # truncated
    trainer.generator = lambda *args: responses.clone()  # the sampling seam: fixed responses
    q, m = left_pad(prompts, pad)
    r = trainer.rollout(q, m)
    assert r.last.tolist() == [2, 1, 5] and r.has_eos.tolist() == [True, True, False]
    rm = AutoModelForSequenceClassification.from_pretrained(pipeline["rm"]).eval()
    for i, prompt in enumerate(prompts):
        alone = torch.tensor([prompt + responses[i, : r.last[i] + 1].tolist()])
        with torch.no_grad():
            expected = rm(input_ids=alone).logits[0, 0].item()
        assert r.scores[i].item() == pytest.approx(expected, abs=1e-4), i
    shaped = trainer.shape_scores(r.scores, r.has_eos)
    assert (r.scores - shaped).tolist() == pytest.approx([0.0, 0.0, 1.0])


def test_unknown_stop_token_is_a_clear_error(pipeline, tmp_path):
    from helpers import ppo_args

    code, _, err = train_shipped("ppo.yaml", *ppo_args(pipeline, tmp_path / "o", "train.stop_tokens=['<|eot_id|>']"))
    assert code == 2 and "'<|eot_id|>', which is not a token of this tokenizer" in err


def test_long_prompts_lose_their_beginning_and_are_counted(pipeline, tmp_path, capsys):
    trainer = make_trainer(pipeline["sft"], pipeline["rm"], tmp_path, max_prompt_length=5)
    full = trainer.tokenizer(read_jsonl(ROOT / "data/ppo_prompts.jsonl")[0]["prompt"])["input_ids"]
    assert len(full) > 5 and trainer.prompts[0] == full[-5:]  # the end, where the policy continues, is kept
    assert "64 of 64 train prompts are longer than max_prompt_length 5" in capsys.readouterr().out


def test_truncated_sampling_is_said_to_be_off_policy_and_no_template_truncates(pipeline, tmp_path, capsys):
    """Issue 18 item 11: top_p / top_k make sampling differ from the softmax the logprobs describe; a recipe that
    sets them is told so (the note used to say the opposite), and no shipped template sets them."""
    import yaml

    from hfalign.ppo.rollout import left_pad

    trainer = make_trainer(pipeline["sft"], pipeline["rm"], tmp_path, response_length=1, top_p=0.9)
    q, m = left_pad([trainer.prompts[0]], trainer.tokenizer.pad_token_id)
    trainer.rollout(q, m)
    out = capsys.readouterr().out
    assert "train.top_p=0.9 truncates sampling" in out and "off-policy" in out
    assert "describe what was sampled" not in out
    for path in sorted(ROOT.glob("recipes/**/*.yaml")):
        train = (yaml.safe_load(path.read_text()) or {}).get("train") or {}
        assert not {"top_k", "top_p"} & set(train), path
