"""hfalign's PPOTrainer on tiny models: the pitfalls of PPO_NOTES.md, one test each, and the stage end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import ROOT, load_shipped, ppo_args, read_jsonl, train_shipped
from safetensors.torch import load_file

from hfalign import models, recipe
from hfalign.ppo import core
from hfalign.ppo.build import build
from hfalign.ppo.config import PPOConfig
from hfalign.ppo.rollout import call_reward_fn, left_pad
from hfalign.ppo.trainer import PPOTrainer

ISSUE_KEYS = ["objective/kl", "objective/kl_coef", "objective/entropy", "objective/scores", "objective/rlhf_reward",
              "objective/non_score_reward", "policy/approxkl_avg", "policy/clipfrac_avg", "policy/entropy_avg",
              "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "val/ratio", "val/ratio_var", "val/num_eos_tokens",
              "val/explained_variance", "val/response_length", "timing/generate", "timing/score", "timing/update", "eps",
              "episode", "lr"]


def api_trainer(pipeline, tmp_path, **overrides) -> PPOTrainer:
    """The TRL-style API: PPOTrainer(args, processing_class, model, ref_model, reward_model, value_model, ...)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pipeline["sft"], padding_side="left")
    prompts = read_jsonl(ROOT / "data/ppo_prompts.jsonl")[:64]
    kw = dict(output_dir=str(tmp_path / "api"), per_device_train_batch_size=8, num_mini_batches=2, num_ppo_epochs=2,
              total_episodes=32, response_length=16, temperature=1.0, report_to="none", save_strategy="no", seed=0,
              learning_rate=1e-3, local_rollout_forward_batch_size=16)
    kw.update(overrides)
    return PPOTrainer(args=PPOConfig(**kw), processing_class=tok,
                      model=AutoModelForCausalLM.from_pretrained(pipeline["sft"]),
                      reward_model=AutoModelForSequenceClassification.from_pretrained(pipeline["rm"]),
                      value_model=AutoModelForSequenceClassification.from_pretrained(pipeline["rm"]),
                      train_dataset=datasets.Dataset.from_list(prompts))


def logged(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "objective/kl" in h]


def test_lr_zero_gives_ratio_exactly_one(pipeline, tmp_path):
    """Pitfall 1: same weights, same tokens -> ratio 1, approx-KL 0, clipfrac 0 (dropout off, same forward)."""
    trainer = api_trainer(pipeline, tmp_path, learning_rate=0.0, total_episodes=16, per_device_train_batch_size=8,
                          num_mini_batches=2)
    trainer.train()
    (log,) = logged(trainer)
    assert log["val/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert log["policy/approxkl_avg"] < 1e-10
    assert log["policy/clipfrac_avg"] == 0.0
    assert log["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference


def test_left_padding_does_not_change_logprobs_values_or_rewards(pipeline, tmp_path):
    """Pitfalls 3 and 4: position ids from the mask; the score read at the last real token."""
    trainer = api_trainer(pipeline, tmp_path)
    wrapper, tok = trainer.model, trainer.tokenizer
    seq = tok("Write a review of the red door. the plot was great.")["input_ids"] + [tok.eos_token_id]
    outs = []
    for pad in (0, 7):
        ids, mask = left_pad([seq, [5] * (len(seq) + pad)], tok.pad_token_id)  # a longer neighbour forces padding
        ids, mask = ids[:1], mask[:1]
        pos = core.position_ids(mask)
        with torch.no_grad():
            logits, values = wrapper(ids, mask, pos, mode="train")
            scores = wrapper(ids, mask, pos, mode="reward")
        n = len(seq)
        outs.append((core.logprobs_from_logits(logits[:, -n:-1], ids[:, -n + 1:]), values[:, -n:], scores[:, -1]))
    (lp0, v0, s0), (lp1, v1, s1) = outs
    assert torch.allclose(lp0, lp1, atol=1e-5) and torch.allclose(v0, v1, atol=1e-5) and torch.allclose(s0, s1, atol=1e-5)


def test_rollout_reward_on_eos_and_masks_after_the_end(pipeline, tmp_path):
    trainer = api_trainer(pipeline, tmp_path)
    trainer.train()  # prepares the model; then look at one more rollout directly
    q, m = left_pad(trainer.prompts[:8], trainer.tokenizer.pad_token_id)
    r = trainer.rollout(q, m)
    eos = trainer.tokenizer.eos_token_id
    assert r.has_eos.any()  # the check below is not vacuous: at least one response ended on EOS
    for i in range(8):
        last = r.last[i].item()
        if r.has_eos[i]:
            assert r.responses[i, last].item() == eos
        assert (r.mask[i, last + 1:] == 0).all() and (r.responses[i, last + 1:] == trainer.tokenizer.pad_token_id).all()
        for key in ("logprobs", "ref_logprobs", "values"):
            assert (getattr(r, key)[i, last + 1:] == 0).all(), key
    kl = core.kl_penalty(r.logprobs, r.ref_logprobs) * r.mask
    rewards, _ = core.token_rewards(r.scores, kl, 0.05, r.last, r.mask)
    adv, _ret = core.gae(rewards, r.values, r.mask, 1.0, 0.95)
    assert ((rewards != 0) <= r.mask.bool()).all() and ((adv != 0) <= r.mask.bool()).all()


def test_optimizer_steps_counted_with_minibatches_and_accumulation(pipeline, tmp_path):
    """Pitfall 12: 2 epochs x 2 minibatches = 4 optimizer steps per update, with 2 accumulation steps each."""
    trainer = api_trainer(pipeline, tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                          num_mini_batches=2, num_ppo_epochs=2, total_episodes=32)
    assert trainer.train().global_step == 2  # 32 episodes / rollout batch 16
    assert [log["train/optimizer_steps"] for log in logged(trainer)] == [4, 4]
    adam_steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert adam_steps == {8}


def test_function_reward(pipeline, tmp_path):
    from hfalign.demo.task import objective

    out = tmp_path / "fn"
    code, _, err = train_shipped("ppo.yaml", *ppo_args(pipeline, out, "reward.model=null",
                                "reward.function=hfalign.demo.task:positivity_reward", "train.total_episodes=64",
                                "train.missing_eos_penalty=null"))
    assert code == 0, err[-3000:]
    rows = read_jsonl(out / "samples.jsonl")
    assert rows and all(r["score"] == pytest.approx(objective(r["completion"]), abs=1e-6) for r in rows)
    assert {r["ended_with"] for r in rows} <= {"</s>", None}  # the stop token the response ended on, or cut
    critic = load_file(str(out / "value" / "model.safetensors"))  # no RM to start from: critic = SFT + new head
    assert "score.weight" in critic


def test_ppo_stage_end_to_end(pipeline, tmp_path):
    """The recipe stage: every metric key, entropy >= 0, weights change, output loads, EOS survives saving."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "ppo"
    code, stdout, err = train_shipped("ppo.yaml", *ppo_args(pipeline, out))
    assert code == 0, err[-3000:]
    logs = read_jsonl(out / "metrics.jsonl")
    updates = [r for r in logs if "objective/kl" in r]
    assert len(updates) == 4  # 128 episodes / 32 per update
    for key in ISSUE_KEYS:
        assert all(key in r for r in updates), key
    assert all(0 < r["objective/entropy"] < r["val/response_length"] * math.log(len(AutoTokenizer.from_pretrained(
        pipeline["sft"]))) for r in updates)  # nats per response: positive and below a uniform distribution's
    sft, ppo = load_file(str(pipeline["sft"] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(not torch.equal(sft[k], ppo[k]) for k in sft if "layers" in k), "some policy weights did not change"
    rm, value = load_file(str(pipeline["rm"] / "model.safetensors")), load_file(str(out / "value/model.safetensors"))
    assert not torch.equal(rm["score.weight"], value["score.weight"])
    policy = AutoModelForCausalLM.from_pretrained(out)
    assert policy.generation_config.eos_token_id == 2 and policy.generation_config.pad_token_id == 0
    AutoModelForSequenceClassification.from_pretrained(out / "value")
    summary = json.loads((out / "summary.json").read_text())
    assert {"score", "kl", "objective", "well_formed", "eos_rate"} <= set(summary["after (policy)"])
    assert "hfalign ppo summary" in stdout


def shared_recipe(lora_pipeline, tmp_path, *extra):
    return load_shipped("ppo.yaml", f"output_dir={tmp_path / 'lora'}", f"model.name_or_path={lora_pipeline['base']}",
                        f"model.adapter={lora_pipeline['sft']}", f"reward.model={lora_pipeline['rm']}", "lora.enabled=true",
                        "lora.r=8", *extra)


def base_numel(module) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if "lora_" not in n and "head" not in n and "score" not in n)


def test_lora_shared_base_holds_one_copy(lora_pipeline, tmp_path):
    from transformers import AutoModelForCausalLM

    r = shared_recipe(lora_pipeline, tmp_path)
    tok = models.load_tokenizer(r.model)
    wrapper = build(r, tok)
    one = base_numel(AutoModelForCausalLM.from_pretrained(lora_pipeline["base"]))
    assert base_numel(wrapper) == one
    assert set(wrapper.policy.peft_config) == {"default", "ref", "reward", "value"}
    assert wrapper.stacks["reward"] == ["ref", "reward"]  # the RM adapter was trained on the SFT-merged base
    trainable = {n for n, p in wrapper.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n or ".value." in n or n.startswith("value_head") for n in trainable)

    # the reference is the SFT model (base + SFT adapter), not the raw base (pitfall 14)
    from peft import PeftModel

    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lora_pipeline["base"]), lora_pipeline["sft"])
    ids = torch.tensor([tok("Write a review of the red door. the plot was great.")["input_ids"]])
    mask, pos = torch.ones_like(ids), core.position_ids(torch.ones_like(ids))
    with torch.no_grad():
        assert torch.allclose(wrapper(ids, mask, pos, mode="ref"), sft(input_ids=ids).logits, atol=1e-5)
        # and the adapter stack scores exactly as the merged reward model
        from hfalign.ppo.build import _seq_classifier

        rm = _seq_classifier(r, tok, str(lora_pipeline["rm"]))
        expected = rm(input_ids=ids).logits.squeeze()
        assert wrapper(ids, mask, pos, mode="reward")[0, -1].item() == pytest.approx(expected.item(), abs=1e-4)


def test_lora_shared_base_trains_and_saves_adapters(lora_pipeline, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora_run"
    code, stdout, err = train_shipped("ppo.yaml", f"output_dir={out}",
                                f"model.name_or_path={lora_pipeline['base']}", f"model.adapter={lora_pipeline['sft']}",
                                f"reward.model={lora_pipeline['rm']}", "lora.enabled=true", "lora.r=8",
                                "train.total_episodes=128", "train.num_eval_prompts=8", "train.learning_rate=1e-2")
    assert code == 0, err[-3000:]
    # a LoRA policy's acting defaults: the trust region and the reference-tail KL, on and said so
    assert "hfalign ppo step control: adaptive_lr on, vocab_kl_coef 10 (mass on tokens the reference gives < 0.001)" in stdout
    updates = read_jsonl(out / "metrics.jsonl", having="objective/kl")
    assert all("policy/vocab_kl" in u for u in updates) and updates[-1]["policy/vocab_kl"] > 0
    before = load_file(str(lora_pipeline["sft"] / "adapter_model.safetensors"))
    after = load_file(str(out / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "policy adapter did not change"
    assert all(v.numel() > 0 for v in after.values())
    value = load_file(str(out / "value" / "adapter_model.safetensors"))
    assert value and (out / "value" / "value_head.safetensors").exists()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lora_pipeline["base"]), out)


def test_early_stop_on_approx_kl(pipeline, tmp_path):
    trainer = api_trainer(pipeline, tmp_path, early_stop_kl=1e-12, num_ppo_epochs=4, num_mini_batches=2,
                          total_episodes=16, learning_rate=1e-2)
    trainer.train()
    (log,) = logged(trainer)
    assert log["train/optimizer_steps"] == 2  # one epoch of 2 minibatches, then approx-KL > 1e-12 stops the rest


def test_adaptive_lr_undoes_a_step_that_moved_the_policy_too_far(pipeline, tmp_path):
    """The trust region of adaptive_lr: the step after which the measured approx-KL exceeds early_stop_kl is undone
    (weights and optimizer state back as before it), the update ends there and the learning rate is halved."""
    trainer = api_trainer(pipeline, tmp_path, adaptive_lr=True, early_stop_kl=1e-12, num_ppo_epochs=4,
                          num_mini_batches=2, total_episodes=16, learning_rate=1e-2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    (log,) = logged(trainer)
    assert log["train/optimizer_steps"] == 0 and log["train/rejected_steps"] == 1
    assert trainer.lr_scale == log["train/lr_scale"] == 0.5
    assert trainer.lr_scheduler.base_lrs == [pytest.approx(0.5e-2)] * len(trainer.lr_scheduler.base_lrs)
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert all(not s for s in trainer.optimizer.state.values())  # Adam's moments as before the step: none yet


def test_adaptive_lr_follows_the_measured_kl(pipeline, tmp_path):
    """Steps that move the policy less than half the target raise the rate (up to the configured one), more than twice
    the target lower it; the rate stays within [0.01, 1] x the configured one."""
    low = api_trainer(pipeline, tmp_path, adaptive_lr=True, adaptive_lr_target=1e-9, early_stop_kl=None,
                      learning_rate=1e-3)
    low.train()
    # 2 updates of 4 steps: each update's first minibatch measures the rollout's own weights (no change), the 3 after
    # it far above 2e-9 (/ 1.5 each)
    assert low.lr_scale == pytest.approx(1.5 ** -6)
    assert all(h["train/rejected_steps"] == 0 for h in logged(low))
    high = api_trainer(pipeline, tmp_path, adaptive_lr=True, adaptive_lr_target=10.0, learning_rate=1e-3)
    high.train()
    assert high.lr_scale == 1.0


def test_score_shaping(pipeline, tmp_path):
    trainer = api_trainer(pipeline, tmp_path, missing_eos_penalty=2.0, score_clip=1.5, normalize_scores=False)
    shaped = trainer.shape_scores(torch.tensor([0.5, 3.0, 0.5]), torch.tensor([True, True, False]))
    assert shaped.tolist() == [0.5, 1.5, -1.5]  # -2 for the truncated one, then clip to +-1.5
    trainer = api_trainer(pipeline, tmp_path, normalize_scores=True)
    shaped = trainer.shape_scores(torch.tensor([1.0, 3.0]), torch.tensor([True, True]))
    assert shaped.tolist() == pytest.approx([-1.0, 1.0], abs=1e-4)  # running mean 2, std 1


def test_default_pipeline_does_what_the_readme_says(pipeline, tmp_path):
    """The embedded default: a well-formed SFT policy, an RM well above chance, and PPO that beats SFT on the
    rule-based objective while staying well-formed with bounded KL (the full recipes/ppo.yaml budget)."""
    rm_eval = read_jsonl(pipeline["rm"] / "metrics.jsonl", having="eval_accuracy")
    assert rm_eval[-1]["eval_accuracy"] > 0.9
    out = tmp_path / "ppo"
    code, _, err = train_shipped("ppo.yaml", f"output_dir={out}",
                                f"model.name_or_path={pipeline['sft']}", f"reward.model={pipeline['rm']}")
    assert code == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["before (reference)"], summary["after (policy)"]
    assert before["well_formed"] >= 0.8  # the SFT model writes well-formed reviews
    assert after["objective"] > before["objective"] + 0.5
    assert after["score"] > before["score"]
    assert after["well_formed"] >= 0.9 and after["eos_rate"] >= 0.9
    assert after["kl"] < 25
    assert before["kl"] == 0.0  # the reference against itself


def test_lora_critic_of_its_own(lora_pipeline, tmp_path):
    """value.shared_base: false gives the critic its own (merged) model beside the shared policy base."""
    r = shared_recipe(lora_pipeline, tmp_path, "value.shared_base=false")
    wrapper = build(r, models.load_tokenizer(r.model))
    assert wrapper.critic is not None and "value" not in wrapper.policy.peft_config
    assert all(p.requires_grad for p in wrapper.critic.parameters())


def test_api_with_peft_config(pipeline, tmp_path):
    """TRL-style: a causal LM plus peft_config -> policy adapter, reference = adapter off, value adapter + head."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pipeline["sft"], padding_side="left")
    prompts = read_jsonl(ROOT / "data/ppo_prompts.jsonl")[:32]
    args = PPOConfig(output_dir=str(tmp_path / "peft"), per_device_train_batch_size=8, num_mini_batches=2,
                     total_episodes=16, response_length=12, report_to="none", save_strategy="no", learning_rate=1e-2,
                     adaptive_lr=False)  # which adapters train, not the trust region (it may undo a 1e-2 step)
    trainer = PPOTrainer(args=args, processing_class=tok, model=AutoModelForCausalLM.from_pretrained(pipeline["sft"]),
                         reward_model=AutoModelForSequenceClassification.from_pretrained(pipeline["rm"]),
                         train_dataset=datasets.Dataset.from_list(prompts),
                         peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(".default." in n or ".value." in n or n.startswith("value_head") for n in changed)
    assert any(".value." in n for n in changed) and any(".default." in n for n in changed)
    trainer.save_model(str(tmp_path / "peft_out"))
    assert (tmp_path / "peft_out" / "adapter_model.safetensors").exists()
    assert trainer.vocab_kl_coef == 10.0 and "policy/vocab_kl" in logged(trainer)[-1]  # a LoRA policy's default, here too


def test_kl_guard_stops_and_saves(pipeline, tmp_path):
    out = tmp_path / "guarded"
    code, stdout, err = train_shipped("ppo.yaml", *ppo_args(pipeline, out, "train.total_episodes=512",
                                     "train.learning_rate=3e-3", "train.save_steps=1000",
                                     "callbacks=[metrics, {name: kl_guard, max_kl: 0.01, action: stop}]"))
    assert code == 0, err[-3000:]
    updates = read_jsonl(out / "metrics.jsonl", having="objective/kl")
    assert updates[-1]["objective/kl"] > 0.01 and all(u["objective/kl"] <= 0.01 for u in updates[:-1])
    assert len(updates) < 8  # stopped before the 8 updates it was given
    assert (out / f"checkpoint-{len(updates)}" / "hfalign_ppo_state.json").exists()  # saved when it stopped
    assert "KL guard" in stdout


def test_conversational_prompts(pipeline, tmp_path):
    """Prompts as messages go through the tokenizer's chat template with the generation prompt."""
    import datasets

    trainer = api_trainer(pipeline, tmp_path, total_episodes=16)
    convo = [{"prompt": [{"role": "user", "content": "Write a review of the red door."}]}] * 16
    trainer2 = PPOTrainer(args=trainer.args, processing_class=trainer.tokenizer, model=trainer.model,
                          train_dataset=datasets.Dataset.from_list(convo))
    text = trainer.tokenizer.decode(trainer2.prompts[0])
    assert text.startswith("<s>user: Write a review of the red door.") or "user: Write a review" in text
    assert text.rstrip().endswith("assistant:")
    trainer2.train()
    assert logged(trainer2)


def test_gradient_checkpointing(pipeline, tmp_path):
    """Trainer turns it on through PolicyAndValue; generation turns it off and back on (trl's unwrap); the update
    trains exactly the weights it trains without checkpointing."""
    trainer = api_trainer(pipeline, tmp_path / "gc", total_episodes=16, gradient_checkpointing=True)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.model.policy.is_gradient_checkpointing and trainer.model.critic.is_gradient_checkpointing
    plain = api_trainer(pipeline, tmp_path / "plain", total_episodes=16)
    plain.train()
    ours = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    theirs = {n: p for n, p in plain.model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(start[n], ours[n]) for n in start)
    assert all(torch.allclose(ours[n], theirs[n], atol=1e-5) for n in ours)


def test_reward_function_returning_wrong_count(pipeline, tmp_path):
    from hfalign.errors import UserError

    trainer = api_trainer(pipeline, tmp_path)
    trainer.reward_fn = lambda prompts, completions: [1.0]
    with pytest.raises(UserError, match=r"returned 1 scores for 8 completions"):
        call_reward_fn(trainer.reward_fn, ["p"] * 8, ["c"] * 8, trainer.accelerator.device)


def test_bf16_models_keep_fp32_heads_and_values(pipeline, tmp_path):
    """Pitfall 11: with a bf16 checkpoint dtype, the critic's and reward model's heads and the values stay fp32."""
    r = load_shipped("ppo.yaml", f"output_dir={tmp_path / 'bf16'}", f"model.name_or_path={pipeline['sft']}",
                     f"reward.model={pipeline['rm']}", "model.dtype=bfloat16")
    wrapper = build(r, models.load_tokenizer(r.model))
    assert wrapper.policy.dtype == torch.bfloat16
    assert wrapper.critic.score.weight.dtype == torch.float32 and wrapper.critic.score.weight.requires_grad
    assert wrapper.reward.score.weight.dtype == torch.float32 and not wrapper.reward.score.weight.requires_grad
    ids = torch.tensor([[1, 400, 318, 401]])
    mask, pos = torch.ones_like(ids), core.position_ids(torch.ones_like(ids))
    with torch.no_grad():
        _, values = wrapper(ids, mask, pos, mode="train")
        scores = wrapper(ids, mask, pos, mode="reward")
    assert values.dtype == torch.float32 and scores.dtype == torch.float32


def test_reward_stack_reuses_the_sft_adapter_however_its_path_is_spelled(lora_pipeline, tmp_path, monkeypatch):
    monkeypatch.chdir(lora_pipeline["root"])
    r = recipe.load(ROOT / "recipes/ppo.yaml", [f"output_dir={tmp_path / 'p'}", f"model.name_or_path={lora_pipeline['base']}",
                                                "model.adapter=./sft/", f"reward.model={lora_pipeline['rm']}",
                                                "lora.enabled=true", "lora.r=8", f"data.train={ROOT / 'data/ppo_prompts.jsonl'}",
                                                f"data.eval={ROOT / 'data/ppo_eval_prompts.jsonl'}"])
    wrapper = build(r, models.load_tokenizer(r.model))
    assert wrapper.stacks["reward"] == ["ref", "reward"] and "rm_base" not in wrapper.policy.peft_config


def test_vocab_kl_term_is_logged_and_pulls_the_policy_to_the_reference(pipeline, tmp_path):
    """train.vocab_kl_coef with vocab_kl_tail null: the exact KL over the whole vocabulary at the rollout's response
    positions joins the loss (logged as policy/vocab_kl); a large coefficient keeps the policy nearer the reference
    than none does."""
    free = api_trainer(pipeline, tmp_path / "free", total_episodes=32, learning_rate=1e-2, early_stop_kl=None)
    free.train()
    held = api_trainer(pipeline, tmp_path / "held", total_episodes=32, learning_rate=1e-2, early_stop_kl=None,
                       vocab_kl_coef=100.0, vocab_kl_tail=None)
    held.train()
    assert free.vocab_kl_coef == 0.0 and "policy/vocab_kl" not in logged(free)[-1]  # full fine-tuning: off by default
    last = logged(held)[-1]
    assert last["policy/vocab_kl"] > 0
    assert last["objective/kl"] < logged(free)[-1]["objective/kl"]


def test_scores_are_logged_raw_and_logs_follow_logging_steps(pipeline, tmp_path):
    """README's TRL table: `objective/scores` is the reward's raw score (TRL 1.12 logged it after the missing-EOS
    penalty), the penalty shows in `objective/rlhf_reward`; and an update is logged every `logging_steps` (TRL 1.12
    logged every one)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pipeline["sft"], padding_side="left")
    args = PPOConfig(output_dir=str(tmp_path / "raw"), per_device_train_batch_size=8, total_episodes=32,
                     response_length=3, missing_eos_penalty=3.0, normalize_scores=False, logging_steps=2,
                     report_to="none", save_strategy="no", seed=0)
    trainer = PPOTrainer(args=args, processing_class=tok, model=AutoModelForCausalLM.from_pretrained(pipeline["sft"]),
                         reward_model=lambda prompts, completions: [1.0] * len(completions),
                         value_model=AutoModelForSequenceClassification.from_pretrained(pipeline["rm"]),
                         train_dataset=datasets.Dataset.from_list(read_jsonl(ROOT / "data/ppo_prompts.jsonl")[:32]))
    trainer.train()
    logs = logged(trainer)
    assert [h["step"] for h in logs] == [2, 4]  # 4 updates, logging_steps 2
    for h in logs:
        assert h["objective/scores"] == 1.0 and h["val/truncated_frac"] > 0  # 3 tokens: most responses are cut
        shaped = 1.0 - 3.0 * h["val/truncated_frac"]
        assert h["objective/rlhf_reward"] == pytest.approx(shaped + h["objective/non_score_reward"], abs=1e-5)


def test_a_reference_pass_on_the_raw_base_keeps_the_value_adapter_trainable(pipeline):
    """With the reference = the base with adapters off (TRL-style peft_config, or a recipe's LoRA from the raw base),
    PEFT re-enables the layers through set_adapter, which froze every inactive adapter: the value adapter stopped
    training whenever a reference pass came between a forward and its backward (the reference-tail KL's does)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from hfalign.ppo.build import from_trl_args

    wrapper = from_trl_args(AutoModelForCausalLM.from_pretrained(pipeline["sft"]), None,
                            AutoModelForSequenceClassification.from_pretrained(pipeline["rm"]), None,
                            LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = {n for n, p in wrapper.named_parameters() if p.requires_grad}
    assert any(".value." in n for n in trainable) and any(".default." in n for n in trainable)
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    logits, values = wrapper(ids, mask, core.position_ids(mask), mode="train")
    with torch.no_grad():
        wrapper(ids, mask, core.position_ids(mask), mode="ref")
    assert {n for n, p in wrapper.named_parameters() if p.requires_grad} == trainable
    (logits.float().mean() + values.mean()).backward()
    assert all(p.grad is not None for n, p in wrapper.named_parameters() if ".value." in n and "lora_B" in n)


def test_policy_loss_knobs_reach_the_update(pipeline, tmp_path):
    """train.loss_aggregation, cliprange_low/high and dual_clip are what the micro-step's loss uses: at lr 0 (ratio
    1, nothing clips) the same rollouts give a different policy loss summed per response than averaged per token,
    and the same one with clip-higher and the dual clip on; values that make no sense refuse."""
    runs = {}
    for name, knobs in {"mean": {}, "sum": {"loss_aggregation": "seq_mean_token_sum"},
                        "clips": {"cliprange_low": 0.2, "cliprange_high": 0.28, "dual_clip": 3.0}}.items():
        trainer = api_trainer(pipeline, tmp_path / name, learning_rate=0.0, total_episodes=16, **knobs)
        trainer.train()
        runs[name] = logged(trainer)[-1]
    assert runs["sum"]["objective/scores"] == runs["mean"]["objective/scores"]  # the same rollouts
    assert runs["sum"]["loss/policy_avg"] != pytest.approx(runs["mean"]["loss/policy_avg"], abs=1e-4)
    assert runs["clips"]["loss/policy_avg"] == pytest.approx(runs["mean"]["loss/policy_avg"], abs=1e-6)
    for bad in ({"dual_clip": 1.0}, {"cliprange_low": 1.5}, {"cliprange_high": -0.1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PPOConfig(output_dir=str(tmp_path / "bad"), report_to="none", **bad)
