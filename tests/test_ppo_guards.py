"""Guards that act (issue 8): stop, roll back to the last checkpoint with a higher KL coefficient, the collapse
detector, critic warm-up, and the guards the shipped recipe turns on."""

from __future__ import annotations

import pytest
import torch
from helpers import ROOT, read_jsonl
from transformers import TrainerCallback

from hfalign import callbacks, recipe
from hfalign.ppo import core
from hfalign.ppo.guards import CollapseGuardCallback, KLGuardCallback


def make(pipeline, out, guard_callbacks, **overrides):
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from hfalign.ppo.config import PPOConfig
    from hfalign.ppo.trainer import PPOTrainer

    tok = AutoTokenizer.from_pretrained(pipeline["sft"], padding_side="left")
    kw = dict(output_dir=str(out), per_device_train_batch_size=8, num_mini_batches=2, num_ppo_epochs=2,
              total_episodes=64, response_length=12, report_to="none", save_strategy="no", seed=0, learning_rate=1e-2,
              adaptive_kl=False)  # beta moves only by the guards here
    kw.update(overrides)
    return PPOTrainer(args=PPOConfig(**kw), processing_class=tok,
                      model=AutoModelForCausalLM.from_pretrained(pipeline["sft"]),
                      reward_model=AutoModelForSequenceClassification.from_pretrained(pipeline["rm"]),
                      value_model=AutoModelForSequenceClassification.from_pretrained(pipeline["rm"]),
                      train_dataset=datasets.Dataset.from_list(read_jsonl(ROOT / "data/ppo_prompts.jsonl")[:64]),
                      callbacks=guard_callbacks)


class Snapshots(TrainerCallback):
    """Trainable weights at the start of every update."""

    def __init__(self):
        self.at = {}
        self.trainer = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.at[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_rollback_restores_the_checkpoint_and_raises_the_kl_coefficient(pipeline, tmp_path, capsys):
    guard = KLGuardCallback(1e-9, action="rollback", kl_factor=2.0, max_rollbacks=2)  # any KL trips it
    snaps = Snapshots()
    t = make(pipeline, tmp_path / "run", [guard, snaps], total_episodes=112)  # room for 7 updates
    t.train()
    logs = [h for h in t.state.log_history if "objective/kl" in h]
    # a rollout of the SFT policy itself has KL 0: updates 1, 3 and 5 (after each rollback to the start) pass;
    # updates 2 and 4 trip and roll back; update 6 trips once more than max_rollbacks allows and stops the run
    assert [("guard/KL_guard" in h) for h in logs] == [False, True, False, True, False, True]
    assert [h["objective/kl_coef"] for h in logs] == pytest.approx([0.2, 0.2, 0.4, 0.4, 0.8, 0.8])
    start = snaps.at[0]
    assert any(not torch.equal(start[n], snaps.at[1][n]) for n in start)  # update 1 trained
    for step in (2, 4):  # each rollback put back the weights of checkpoint-0 (the run's start)
        assert all(torch.equal(start[n], snaps.at[step][n]) for n in start), step
    out = capsys.readouterr().out
    assert out.count("rolled back to") == 3  # twice going on, once to end on the last good weights
    assert "2 rollbacks already; stopping on" in out and "checkpoint-0 and saving" in out
    assert (tmp_path / "run" / "checkpoint-6" / "trainer_state.json").exists()
    assert guard.rollbacks == 2 and t.state.global_step == 6
    # the run ends with checkpoint-0's weights, not update 6's that the guard judged broken
    final = {n: p for n, p in t.model.named_parameters() if p.requires_grad}
    assert all(torch.equal(start[n], final[n]) for n in start)


def test_a_trip_on_the_last_update_still_rolls_back(pipeline, tmp_path, capsys):
    """Issue 18 item 2: the Trainer marks the run stopped at max_steps before the guards act; a rollback guard that
    trips on the final update must not let the run end (and be saved) on the weights it judged broken."""
    guard = KLGuardCallback(1e-9, action="rollback", kl_factor=2.0, max_rollbacks=2)
    snaps = Snapshots()
    t = make(pipeline, tmp_path / "run", [guard, snaps], total_episodes=32)  # 2 updates: the 2nd trips
    t.train()
    logs = [h for h in t.state.log_history if "objective/kl" in h]
    assert [("guard/KL_guard" in h) for h in logs] == [False, True]
    assert "rolled back to" in capsys.readouterr().out and guard.rollbacks == 1
    start = snaps.at[0]
    final = {n: p for n, p in t.model.named_parameters() if p.requires_grad}
    assert all(torch.equal(start[n], final[n]) for n in start)  # checkpoint-0's weights, not update 2's


def test_a_rollback_restores_only_vetted_weights_and_rotation_keeps_them(pipeline, tmp_path, capsys):
    """Issue 18 item 1: checkpoint-k holds the weights after update k, which only update k+1's rollout judges. With a
    checkpoint every update and a KL guard that trips on any moved policy, the rollback at update 2 must not restore
    checkpoint-1 (the weights just judged broken) but checkpoint-0; the one at update 4 goes to checkpoint-2 (saved
    after the first rollback, the vetted start weights again), which save_total_limit=1 must not have deleted."""
    guard = KLGuardCallback(1e-9, action="rollback", kl_factor=1.0, max_rollbacks=5)
    snaps = Snapshots()
    t = make(pipeline, tmp_path / "run", [guard, snaps], total_episodes=64, save_strategy="steps", save_steps=1,
             save_total_limit=1)
    t.train()
    logs = [h for h in t.state.log_history if "objective/kl" in h]
    assert [("guard/KL_guard" in h) for h in logs] == [False, True, False, True]
    out = capsys.readouterr().out
    assert [ln.split("rolled back to ")[1].split(";")[0].rsplit("/", 1)[1] for ln in out.splitlines()
            if "rolled back to" in ln] == ["checkpoint-0", "checkpoint-2"]
    start = snaps.at[0]
    assert any(not torch.equal(start[n], snaps.at[1][n]) for n in start)  # update 1 moved the policy
    assert all(torch.equal(start[n], snaps.at[2][n]) for n in start)  # update 3 began on the vetted start weights
    final = {n: p for n, p in t.model.named_parameters() if p.requires_grad}
    assert all(torch.equal(start[n], final[n]) for n in start)
    assert t.vetted >= {0, 2, 4} and 1 not in t.vetted and 3 not in t.vetted


def test_a_resumed_run_keeps_its_guards_state(pipeline, tmp_path, capsys):
    """Issue 18 item 3: a run killed after a rollback and resumed decides as the uninterrupted one: its rollback
    budget is spent (the 2nd trip gives up, as in the whole run), the collapse guard keeps its early window."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    def guards_():
        return [KLGuardCallback(1e-9, action="rollback", kl_factor=2.0, max_rollbacks=1),
                CollapseGuardCallback(window=3, action="warn")]

    kw = dict(total_episodes=64, save_strategy="steps", save_steps=1)
    whole_guards = guards_()
    whole = make(pipeline, tmp_path / "whole", whole_guards, **kw)
    whole.train()
    cut = make(pipeline, tmp_path / "cut", [*guards_(), StopAt()], **kw)
    cut.train()
    assert cut.state.global_step == 2 and cut.callback_handler.callbacks  # stopped right after the rollback
    resumed_guards = guards_()
    resumed = make(pipeline, tmp_path / "cut", resumed_guards, **kw)
    resumed.train(resume_from_checkpoint=True)  # the newest complete checkpoint: the one saved after the rollback
    decisions = lambda t: [(h["step"], "guard/KL_guard" in h, h["objective/kl_coef"])  # noqa: E731
                           for h in t.state.log_history if "objective/kl" in h]
    assert decisions(whole) == decisions(cut)[:2] + decisions(resumed)[-2:]
    assert [g.rollbacks for g in resumed_guards] == [g.rollbacks for g in whole_guards] == [1, 0]
    assert resumed_guards[1].seen == whole_guards[1].seen and len(whole_guards[1].seen) == 3
    assert resumed.state.global_step == whole.state.global_step == 4
    a = {n: p for n, p in whole.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


def test_a_rollback_keeps_the_schedule_of_the_run_not_of_the_checkpoint(pipeline, tmp_path):
    """Issue 18 item 4: the first step after a rollback runs at today's scheduled rate times lr_factor (the restored
    optimizer state carries the checkpoint's rate); save_only_model (no optimizer state) with a rollback guard is
    refused."""
    from transformers import TrainerCallback

    class Rates(TrainerCallback):
        def __init__(self):
            self.end, self.begin, self.trainer = {}, {}, None

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            self.end[state.global_step] = optimizer.param_groups[0]["lr"]

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            self.begin[state.global_step] = optimizer.param_groups[0]["lr"]

    rates = Rates()
    guard = KLGuardCallback(1e-9, action="rollback", kl_factor=1.0, lr_factor=0.5, max_rollbacks=1)
    t = make(pipeline, tmp_path / "run", [guard, rates], lr_scheduler_type="linear", total_episodes=48)
    t.train()
    assert rates.end[2] < 1e-2 * 0.75  # the linear schedule has come down from the checkpoint's 1e-2
    assert rates.begin[2] == pytest.approx(0.5 * rates.end[2])  # update 3 starts at half of where the run was
    with pytest.raises(ValueError, match="save_only_model"):
        make(pipeline, tmp_path / "only", [KLGuardCallback(1.0, action="rollback")], save_only_model=True).train()


def test_rollback_can_lower_the_learning_rate(pipeline, tmp_path):
    guard = KLGuardCallback(1e-9, action="rollback", kl_factor=1.0, lr_factor=0.5, max_rollbacks=1)
    t = make(pipeline, tmp_path / "run", [guard], lr_scheduler_type="constant")
    t.train()
    lrs = [h["lr"] for h in t.state.log_history if "objective/kl" in h]
    assert lrs == pytest.approx([1e-2, 1e-2, 5e-3, 5e-3])  # update 2 tripped: rolled back at half the rate


def test_stop_guard_saves_and_stops(pipeline, tmp_path):
    t = make(pipeline, tmp_path / "run", [KLGuardCallback(1e-9, action="stop")])
    t.train()
    assert t.state.global_step == 2 and (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").exists()


def test_collapse_detector_on_a_metric_stream():
    guard = CollapseGuardCallback(window=3, drop=0.5, action="rollback")
    healthy = {"val/response_length": 20.0, "policy/entropy_avg": 1.0, "objective/scores": 0.0}
    for _ in range(3):
        assert guard.trip(healthy) is None  # the reference window
    assert guard.trip({**healthy, "objective/scores": 2.0}) is None  # score up, answers as long: learning
    assert guard.trip({**healthy, "val/response_length": 8.0, "objective/scores": -1.0}) is None  # short but worse
    reason = guard.trip({**healthy, "val/response_length": 8.0, "objective/scores": 3.0})
    assert reason and "val/response_length 8 < 0.5 x its early mean 20" in reason
    reason = guard.trip({**healthy, "policy/entropy_avg": 0.3, "objective/scores": 3.0})
    assert reason and reason.startswith("policy/entropy_avg")


def test_collapse_detector_sees_answers_turning_repetitive():
    guard = CollapseGuardCallback(window=2, drop=0.5, rise=0.15, action="rollback")
    healthy = {"val/response_length": 12.0, "policy/entropy_avg": 1.0, "objective/scores": 0.0, "val/repetition": 0.05}
    for _ in range(2):
        assert guard.trip(healthy) is None
    assert guard.trip({**healthy, "objective/scores": 2.0, "val/repetition": 0.15}) is None  # +0.10: within rise
    assert guard.trip({**healthy, "objective/scores": -1.0, "val/repetition": 0.5}) is None  # repetitive, score fell
    reason = guard.trip({**healthy, "objective/scores": 2.0, "val/repetition": 0.3})  # ' lemon, lemon, lemon.'
    assert reason == "val/repetition 0.3 > its early mean 0.05 + 0.15 while the score rose"
    old_stream = {k: v for k, v in healthy.items() if k != "val/repetition"}  # metrics written before the signal
    guard = CollapseGuardCallback(window=1)
    assert guard.trip(old_stream) is None and guard.trip({**old_stream, "objective/scores": 1.0}) is None


def test_adaptive_kl_controller_unclipped():
    # KL 6.6 against target 6: error +0.1 (inside the +-0.2 clip); 64 episodes of a 1000-episode horizon
    assert core.adaptive_kl_coef(0.1, 6.6, 6.0, 1000, 64) == pytest.approx(0.1 * (1 + 0.1 * 64 / 1000))
    assert core.adaptive_kl_coef(0.1, 5.4, 6.0, 1000, 64) == pytest.approx(0.1 * (1 - 0.1 * 64 / 1000))


def test_critic_warm_up_keeps_the_policy_still(pipeline, tmp_path):
    """Issue 18 item 9: during the warm-up the policy does not move even with weight decay, and AdamW holds no state
    for it (zero gradients used to advance its step count with empty moments); after it the policy's Adam starts at
    step 1."""
    from transformers import TrainerCallback

    class AdamSteps(TrainerCallback):
        def __init__(self):
            self.at = {}

        def on_step_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
            policy = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("policy.")]
            self.at[state.global_step] = [int(optimizer.state[p]["step"]) if p in optimizer.state else 0 for p in policy]

    snaps, adam = Snapshots(), AdamSteps()
    t = make(pipeline, tmp_path / "run", [snaps, adam], value_warmup_updates=2, total_episodes=48, weight_decay=0.1,
             early_stop_kl=None)
    t.train()
    before = snaps.at[0]
    policy = [n for n in before if n.startswith("policy.")]
    critic = [n for n in before if n.startswith("critic.")]
    for step in (1, 2):  # updates 1 and 2: warm-up, the policy did not move; the critic did
        assert all(torch.equal(before[n], snaps.at[step][n]) for n in policy), step
        assert any(not torch.equal(before[n], snaps.at[step][n]) for n in critic), step
    assert set(adam.at[2]) == {0}  # no optimizer state for the policy after the warm-up
    final = {n: p for n, p in t.model.named_parameters() if n in policy}
    assert any(not torch.equal(before[n], final[n]) for n in policy)  # update 3 trained it
    steps = {int(t.optimizer.state[p]["step"]) for n, p in t.model.named_parameters() if n in policy}
    assert steps == {4}  # update 3's 2 epochs x 2 minibatches, counted from a clean start


def test_shipped_ppo_recipe_turns_on_acting_guards(tiny_model, tmp_path):
    r = recipe.load(ROOT / "recipes/ppo.yaml", [f"model.name_or_path={tiny_model}", f"reward.model={tiny_model}",
                                                f"output_dir={tmp_path}", f"data.train={ROOT / 'data/ppo_prompts.jsonl'}",
                                                f"data.eval={ROOT / 'data/ppo_eval_prompts.jsonl'}"])
    built = {type(cb): cb for cb in callbacks.build(r)}
    assert built[KLGuardCallback].action == "rollback" and built[CollapseGuardCallback].action == "rollback"


ROBUST_DEFAULTS = {"kl_coef": 0.2, "adaptive_kl": True, "target_kl": 3.0, "normalize_scores": True,
                   "early_stop_kl": 0.02, "missing_eos_penalty": 1.0}


def test_ppo_config_defaults_are_the_robust_ones_and_the_template_writes_them_out():
    import dataclasses

    import yaml

    from hfalign.ppo.config import PPOConfig

    defaults = {f.name: f.default for f in dataclasses.fields(PPOConfig)}
    assert {k: defaults[k] for k in ROBUST_DEFAULTS} == ROBUST_DEFAULTS  # docs/ppo-defaults.md says why
    template = yaml.safe_load((ROOT / "recipes/ppo.yaml").read_text())["train"]
    assert {k: template[k] for k in ROBUST_DEFAULTS} == ROBUST_DEFAULTS  # what the robustness table measured
    assert PPOConfig(output_dir="x", report_to="none").normalize_scores  # and what the TRL-style API gets
