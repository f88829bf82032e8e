"""PPO guards, in one place: what they watch (the Guard callbacks below: `trip(metrics)` says why a run is going wrong)
and what the trainer then does (`check`, `act`): warn, stop with a checkpoint, or roll back to the newest *vetted*
checkpoint and go on more carefully (higher KL coefficient, lower lr). Recipes name them through hfalign.callbacks.

A guard at update s judges the rollout sampled from the weights after update s-1. So checkpoint-k (the weights after
update k) is vetted only once update k+1's rollout has passed every acting guard; until then it is unjudged, and a
rollback never restores it. checkpoint-0 (the run's start, saved when a rollback guard is on) is vetted by definition.
The trainer keeps the vetted steps (`trainer.vetted`) and every guard's state in each checkpoint, so a resumed run
judges and rolls back exactly as the uninterrupted one would."""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from hfalign.ppo import checkpoint as checkpoint_io


class Guard(TrainerCallback):
    """A PPO guard: after every update `trip(metrics)` answers why the run is going wrong, or None. PPOTrainer then
    acts: `warn` prints, `stop` saves a checkpoint and stops, `rollback` restores the newest vetted checkpoint's weights and
    optimizer state and continues with the KL coefficient times `kl_factor` and the learning rate times `lr_factor`
    (at most `max_rollbacks` times, then it stops). Reward hacking shows as KL running away or answers collapsing
    while the score rises (PPO_NOTES #15, "Secrets of RLHF" §5)."""

    name = "guard"

    def __init__(self, action: str = "warn", kl_factor: float = 2.0, lr_factor: float = 1.0, max_rollbacks: int = 3):
        self.action, self.kl_factor, self.lr_factor, self.max_rollbacks = action, kl_factor, lr_factor, max_rollbacks
        self.rollbacks = 0

    def trip(self, metrics: dict) -> str | None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What a checkpoint keeps so that a resumed run decides as the uninterrupted one (PPOTrainer saves it)."""
        return {"rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        self.rollbacks = state["rollbacks"]


class KLGuardCallback(Guard):
    """objective/kl above `max_kl` (nats per response)."""

    name = "KL guard"

    def __init__(self, max_kl: float, action: str = "warn", **kw):
        super().__init__(action, **kw)
        self.max_kl = max_kl

    def trip(self, metrics: dict) -> str | None:
        kl = metrics.get("objective/kl")
        return None if kl is None or kl <= self.max_kl else f"objective/kl {kl:.3g} > max_kl {self.max_kl}"


class CollapseGuardCallback(Guard):
    """Answers degenerating while the score is above its mean over the first `window` updates: response length or
    entropy below `drop` x their early mean, or the share of repeated bigrams in a response (val/repetition) above
    its early mean + `rise`. The policy found short, certain or repetitive answers the reward model still likes."""

    name = "collapse guard"
    FALLING = ("val/response_length", "policy/entropy_avg")
    RISING = ("val/repetition",)  # optional: a metric stream without it is watched for the falling ones only

    def __init__(self, window: int = 5, drop: float = 0.5, rise: float = 0.15, action: str = "warn", **kw):
        super().__init__(action, **kw)
        self.window, self.drop, self.rise, self.seen = window, drop, rise, []

    def trip(self, metrics: dict) -> str | None:
        keys = (*self.FALLING, "objective/scores")
        if any(k not in metrics for k in keys):
            return None
        rising = [k for k in self.RISING if k in metrics and all(k in m for m in self.seen)]
        if len(self.seen) < self.window:
            self.seen.append({k: metrics[k] for k in (*keys, *self.RISING) if k in metrics})
            return None
        ref = {k: sum(m[k] for m in self.seen) / len(self.seen) for k in (*keys, *rising)}
        if metrics["objective/scores"] <= ref["objective/scores"]:
            return None
        for key in self.FALLING:
            if metrics[key] < self.drop * ref[key]:
                return f"{key} {metrics[key]:.3g} < {self.drop} x its early mean {ref[key]:.3g} while the score rose"
        for key in rising:
            if metrics[key] > ref[key] + self.rise:
                return f"{key} {metrics[key]:.3g} > its early mean {ref[key]:.3g} + {self.rise} while the score rose"
        return None

    def state_dict(self) -> dict:
        return {**super().state_dict(), "seen": [dict(m) for m in self.seen]}  # the early window: the baseline

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.seen = [dict(m) for m in state["seen"]]


# -- acting on their verdicts -----------------------------------------------------------------------------------------
def guards(trainer) -> list:
    return [cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "trip")]


def prepare(trainer, resuming: bool) -> None:
    """A run with a rollback guard has something to roll back to from the start: checkpoint-0."""
    rollback = [g for g in guards(trainer) if g.action == "rollback"]
    if rollback and trainer.args.save_only_model:
        raise ValueError(f"the {rollback[0].name} rolls back to checkpoints, and save_only_model=True writes them without "
                         "optimizer state: set save_only_model to false, or the guard's action to stop or warn")
    if rollback and not resuming:
        trainer.vetted.add(0)
        trainer._save_checkpoint(trainer.model, trial=None)


def check(trainer, metrics: dict) -> list[tuple]:
    """(guard, reason) for every guard this update trips; their names go into the update's metrics."""
    tripped = []
    for guard in guards(trainer):
        reason = guard.trip(metrics)
        if reason:
            tripped.append((guard, reason))
            metrics[f"guard/{guard.name.replace(' ', '_')}"] = 1.0
            if trainer.is_world_process_zero():
                print(f"hfalign: {guard.name}: {reason} at update {trainer.state.global_step} "
                      f"({ {'warn': 'warning only', 'stop': 'stopping and saving', 'rollback': 'rolling back'}[guard.action]})",
                      flush=True)
    if not any(g.action in ("stop", "rollback") for g, _ in tripped):
        trainer.vetted.add(trainer.state.global_step - 1)  # the weights this rollout was sampled from passed
    if any(g.action == "stop" for g, _ in tripped):
        trainer.control.should_save = trainer.control.should_training_stop = True
    elif any(g.action == "rollback" for g, _ in tripped):
        trainer.control.should_save = False  # this update's weights are the ones being rolled back
    return tripped


def act(trainer, tripped: list[tuple]) -> None:
    """After the update is logged: roll back once for all rollback guards that tripped -- also on the run's last
    update (the Trainer has set should_training_stop at max_steps: the run then ends on the restored weights); not
    when a stop guard tripped too (it ends the run where it is, saved)."""
    rollback = [g for g, _ in tripped if g.action == "rollback"]
    if not rollback or any(g.action == "stop" for g, _ in tripped):
        return
    guard = rollback[0]
    checkpoint = newest_vetted(trainer)
    if guard.rollbacks >= guard.max_rollbacks or checkpoint is None:
        # giving up: the run ends on the last checkpoint the guards let through, not on the weights just judged broken
        if trainer.is_world_process_zero():
            print(f"hfalign: {guard.name}: {guard.rollbacks} rollbacks already; stopping on "
                  f"{checkpoint or 'the current weights (no checkpoint)'} and saving", flush=True)
        if checkpoint is not None:
            checkpoint_io.restore(trainer, checkpoint)
            trainer.vetted.add(trainer.state.global_step)  # the checkpoint below holds those vetted weights
        trainer.control.should_save = trainer.control.should_training_stop = True
        trainer._save_checkpoint(trainer.model, trial=None)
        return
    checkpoint_io.restore(trainer, checkpoint, kl_factor=guard.kl_factor, lr_factor=guard.lr_factor)
    for g in rollback:
        g.rollbacks += 1
    if trainer.args.save_strategy != "no":  # (a str enum)
        # The restored weights, the raised KL coefficient and the guards' counts as the newest checkpoint: a kill from
        # here resumes where the rollback left the run, never from a checkpoint of the trajectory it abandoned.
        trainer.vetted.add(trainer.state.global_step)
        trainer._save_checkpoint(trainer.model, trial=None)


def newest_vetted(trainer) -> str | None:
    """The newest complete checkpoint whose weights passed the guards (None: there is none)."""
    from hfalign.rundir import complete_checkpoint

    for step in sorted(trainer.vetted, reverse=True):
        path = Path(trainer.args.output_dir) / f"checkpoint-{step}"
        if complete_checkpoint(path):
            return str(path)
    return None


def state(trainer) -> list[dict]:
    """Every guard's state (rollbacks taken, a collapse guard's early window), for a checkpoint."""
    return [{"name": g.name, **g.state_dict()} for g in guards(trainer)]


def load_state(trainer, saved: list[dict]) -> None:
    """A checkpoint's guard states back into this run's guards (the same guards, in the same order); a guard the
    checkpoint does not know starts fresh, and says so."""
    for i, g in enumerate(guards(trainer)):
        if i < len(saved) and saved[i].get("name") == g.name:
            g.load_state_dict(saved[i])
        elif trainer.is_world_process_zero():
            print(f"hfalign: {g.name} is not in the checkpoint's guards; it starts afresh", flush=True)
