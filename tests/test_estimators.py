"""train.advantage_estimator through the real trainer: gae as it always was, the critic-free estimators without a
critic, grouped rollouts, KL in the loss, ReMax's greedy baseline; the recipes and their validation. The estimators'
math is in test_advantages.py."""

from __future__ import annotations

import pytest
import torch
from helpers import ROOT, cli, read_jsonl

from hfalign.ppo.config import PPOConfig
from hfalign.ppo.trainer import PPOTrainer

# Metrics of two gae updates on the tiny random model (below), recorded on 2026-12-04 with the trainer as it was
# before advantage_estimator existed (commit 3622340); the code after the change gave them bit for bit on that machine
# (AMD EPYC). Compared at 1e-5 relative: another CPU's kernels may differ in the last bits.
RECORDED_GAE = [
    {"objective/kl": 0.0, "objective/entropy": 49.565773010253906, "objective/rlhf_reward": -1.341104507446289e-07,
     "objective/scores": 0.11450479179620743, "policy/approxkl_avg": 0.01892615668475628, "policy/clipfrac_avg": 0.265625,
     "loss/policy_avg": -0.06637099385261536, "loss/value_avg": 0.4355931282043457, "val/clipfrac_avg": 0.21875,
     "policy/entropy_avg": 6.171512603759766, "val/ratio": 1.0121225118637085, "val/ratio_var": 0.03484640270471573,
     "val/explained_variance": -0.10395073890686035, "objective/kl_coef": 0.2},
    {"objective/kl": 0.023629367351531982, "objective/entropy": 49.691314697265625,
     "objective/rlhf_reward": -0.22415947914123535, "objective/scores": 0.05771372467279434,
     "policy/approxkl_avg": 0.0017036881763488054, "policy/clipfrac_avg": 0.0, "loss/policy_avg": -0.029846519231796265,
     "loss/value_avg": 0.18424607813358307, "val/clipfrac_avg": 0.125, "policy/entropy_avg": 6.170907497406006,
     "val/ratio": 0.9968202114105225, "val/ratio_var": 0.003127585630863905,
     "val/explained_variance": -0.05776989459991455, "objective/kl_coef": 0.199968},
]
VALUE_KEYS = ("loss/value_avg", "val/clipfrac_avg", "val/explained_variance")


def tiny_trainer(tiny_model, tmp_path, reward=None, value=True, peft_config=None, **overrides) -> PPOTrainer:
    """The TRL-style API on the tiny random model: policy, and (seeded) fresh scalar heads for reward and value
    (with `peft_config` and value=False: the critic an adapter on the policy's shared base)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model, padding_side="left")
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    vm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    kw = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_mini_batches=2, num_ppo_epochs=2,
              total_episodes=16, response_length=8, temperature=1.0, report_to="none", save_strategy="no", seed=0,
              learning_rate=1e-3, local_rollout_forward_batch_size=8)
    kw.update(overrides)
    return PPOTrainer(args=PPOConfig(**kw), processing_class=tok, model=AutoModelForCausalLM.from_pretrained(tiny_model),
                      reward_model=reward or rm, value_model=vm if value else None, peft_config=peft_config,
                      train_dataset=datasets.Dataset.from_list(read_jsonl(ROOT / "data/ppo_prompts.jsonl")[:32]))


def updates(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "objective/kl" in h]


@pytest.mark.parametrize("generation", ["hf", "static"])
def test_gae_reproduces_the_metrics_recorded_before_estimators(tiny_model, tmp_path, generation):
    """The static-cache decoder draws generate's tokens on CPU, so a run with it is this very run (issue 20)."""
    trainer = tiny_trainer(tiny_model, tmp_path, generation=generation)  # advantage_estimator defaults to gae
    trainer.train()
    got = updates(trainer)
    assert len(got) == 2
    for logged, recorded in zip(got, RECORDED_GAE):
        for key, value in recorded.items():
            assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_critic_free_estimator_builds_trains_and_saves_no_critic(tiny_model, tmp_path):
    """rloo with 2 responses per prompt: no critic in the model or the optimizer, no value metrics, the KL-in-reward
    numbers as usual, no value/ directory in the result; every group of 2 rows holds one prompt twice."""
    seen = []

    def reward(prompts, completions):
        seen.append(prompts)
        return [float(len(c)) for c in completions]

    trainer = tiny_trainer(tiny_model, tmp_path, reward=reward, value=False, advantage_estimator="rloo",
                           num_generations=2)
    assert not trainer.model.has_critic and trainer.model.critic is None
    optimized = {id(p) for g in trainer.create_optimizer().param_groups for p in g["params"]}
    assert optimized == {id(p) for p in trainer.model.policy.parameters() if p.requires_grad}
    trainer.train()
    logs = updates(trainer)
    assert len(logs) == 2 and all(not set(VALUE_KEYS) & set(log) for log in logs)
    assert [log["episode"] for log in logs] == [8, 16]  # responses: 4 prompts x 2 per update
    assert all(len(p) == 8 and all(p[i] == p[i + 1] for i in range(0, 8, 2)) for p in seen)
    assert all(len(set(p)) == 4 for p in seen)
    trainer.save_model(str(tmp_path / "result"))
    assert (tmp_path / "result" / "model.safetensors").is_file() and not (tmp_path / "result" / "value").exists()
    with pytest.warns(UserWarning, match="value_model is not used"):  # passed anyway: said, and not built
        assert not tiny_trainer(tiny_model, tmp_path / "w", advantage_estimator="rloo", num_generations=2).model.has_critic


def test_kl_in_loss_is_logged_and_leaves_the_reward_alone(tiny_model, tmp_path):
    trainer = tiny_trainer(tiny_model, tmp_path, value=False, advantage_estimator="grpo", num_generations=4,
                           kl_placement="in_loss", loss_aggregation="seq_mean_token_sum_norm", total_episodes=32)
    trainer.train()
    logs = updates(trainer)
    assert logs[-1]["objective/kl"] != 0  # the policy moved from the reference...
    assert all(log["objective/non_score_reward"] == 0 for log in logs)  # ...and the reward holds no KL
    assert logs[-1]["loss/kl_avg"] > 0  # k3 is >= 0, and > 0 once the policy differs


def test_remax_scores_one_greedy_response_per_prompt(tiny_model, tmp_path):
    calls = []

    def reward(prompts, completions):
        calls.append((prompts, completions))
        return [float(c.count("a")) for c in completions]

    trainer = tiny_trainer(tiny_model, tmp_path, reward=reward, value=False, advantage_estimator="remax",
                           total_episodes=8, num_generations=2)
    trainer.train()
    sampled, greedy = calls[0], calls[1]  # one update: the 8 sampled responses, then 4 greedy ones
    assert len(sampled[0]) == 8 and len(greedy[0]) == 4
    assert greedy[0] == sampled[0][::2]
    q = trainer.generator  # greedy decoding is deterministic: the same prompts give the same responses again
    ids, mask = torch.tensor([trainer.prompts[0]] * 2), torch.ones(2, len(trainer.prompts[0]), dtype=torch.long)
    a = q(trainer.model_wrapped, trainer.accelerator, ids, mask, "policy", None, True)
    assert torch.equal(a[0], a[1])


def test_estimator_settings_that_cannot_work_are_refused(tmp_path):
    for bad, match in (({"advantage_estimator": "grpo"}, "needs num_generations >= 2"),
                       ({"advantage_estimator": "rloo", "num_generations": 2, "value_warmup_updates": 2},
                        "has no critic"),
                       ({"lam_actor": 1.5}, r"lam_actor must be in \[0, 1\]"),
                       ({"lam_actor_alpha": 0.0}, "lam_actor_alpha must be > 0")):
        with pytest.raises(ValueError, match=match):
            PPOConfig(output_dir=str(tmp_path), report_to="none", **bad)


def test_validate_says_what_is_wrong_with_a_grouped_batch_and_notes_unused_critic_settings(pipeline):
    ppo = [str(ROOT / "recipes/ppo.yaml"), f"model.name_or_path={pipeline['sft']}", f"reward.model={pipeline['rm']}",
           f"data.train={ROOT / 'data/ppo_prompts.jsonl'}", f"data.eval={ROOT / 'data/ppo_eval_prompts.jsonl'}"]
    code, _, err = cli("validate", *ppo, "train.advantage_estimator=rloo")
    assert code == 2 and "needs num_generations >= 2" in err and "Traceback" not in err
    code, _, err = cli("validate", *ppo, "train.advantage_estimator=rloo", "train.num_generations=3")
    assert code == 2 and "does not split into groups of num_generations 3" in err
    code, out, err = cli("validate", *ppo, "train.advantage_estimator=rloo", "train.num_generations=4",
                         "train.vf_coef=0.5", "train.lam_critic=1.0")
    assert code == 0, err
    assert "trains no critic, so train.vf_coef, train.lam_critic has no effect" in out
    code, out, _ = cli("validate", *ppo, "train.advantage_estimator=rloo", "train.num_generations=4")
    assert code == 0 and "trains no critic" not in out  # ppo.yaml's vf_coef is the default: nothing to say
    assert "plan: 120 updates of 8 prompts x 4 responses per process" in out and "rloo (no critic)" in out


def test_plan_counts_responses_and_groups():
    from types import SimpleNamespace

    from hfalign.ppo.plan import plan, plan_problem

    args = SimpleNamespace(per_device_train_batch_size=8, gradient_accumulation_steps=1, num_mini_batches=2,
                           total_episodes=64, num_train_epochs=1, max_steps=-1, num_ppo_epochs=1, num_generations=4)
    p = plan(args, world_size=2, dataset_size=100)
    assert (p.rollout_batch, p.prompts_per_update, p.global_rollout_batch, p.num_updates) == (16, 4, 32, 2)
    assert plan_problem(p, 100) is None
    assert plan_problem(p, 8) is None  # 4 prompts per process feed 16 responses
    assert "give 3 per process, fewer than one rollout batch of 16" in plan_problem(p, 6)
    assert "= 4 prompts x 4 responses" in plan_problem(p, 6)


def test_api_peft_adapters_start_from_the_run_seed(tiny_model, tmp_path):
    """PPOTrainer(peft_config=...) draws the LoRA init after seeding with args.seed: the same seed, the same adapters
    (the global RNG's state before the call no longer matters); another seed, others."""
    from peft import LoraConfig

    def lora_a(seed: int, noise: int) -> dict:
        import datasets
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        torch.manual_seed(noise)  # whatever the caller's RNG did before
        torch.rand(noise)
        t = PPOTrainer(args=PPOConfig(output_dir=str(tmp_path / "o"), report_to="none", seed=seed),
                       processing_class=AutoTokenizer.from_pretrained(tiny_model, padding_side="left"),
                       model=AutoModelForCausalLM.from_pretrained(tiny_model),
                       reward_model=AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1),
                       train_dataset=datasets.Dataset.from_list([{"prompt": "a b c"}] * 4),
                       peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
        return {n: p.detach().clone() for n, p in t.model.named_parameters() if "lora_A" in n}

    a, b, c = lora_a(0, 1), lora_a(0, 7), lora_a(1, 1)
    assert a and all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)
