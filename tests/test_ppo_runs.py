"""PPO as users launch it: real 2-process DeepSpeed ZeRO-2/ZeRO-3 runs of recipes/ppo.yaml through
`accelerate launch -m hfalign`, and a run killed mid-way that resumes when the same command is run again."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import pytest
import torch
from helpers import ACCELERATE, PYTHON, ROOT, ppo_args, read_jsonl, run
from safetensors.torch import load_file

from hfalign import rundir

pytestmark = pytest.mark.slow


def launch_cmd(config: str, port: int, args: list[str], precision: str | None = None) -> list[str]:
    extra = ["--mixed_precision", precision] if precision else []
    return [*ACCELERATE, "--config_file", str(ROOT / "accelerate_configs" / config), "--num_processes", "2", *extra,
            "--main_process_port", str(port), "-m", "hfalign", "recipes/ppo.yaml", *args]


def launch(config: str, port: int, args: list[str], precision: str | None = None):
    return run(launch_cmd(config, port, args, precision))


def kill_once_written(cmd: list[str], out, marker) -> None:
    """Start the run, kill -9 every process of it (the workers run in sessions of their own; each names its
    output_dir) as soon as `marker` exists, and check that it died mid-way."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    subprocess.run(["pkill", "-9", "-f", f"output_dir={out}"], check=False)
    proc.wait()
    time.sleep(0.5)
    assert marker.exists() and not (out / "hfalign_done.json").exists(), "the run was not killed mid-way"


@pytest.mark.parametrize("config, port", [("zero2.yaml", 29541), ("zero3.yaml", 29542)])
def test_deepspeed_ppo_two_processes(pipeline, tmp_path, config, port):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out = tmp_path / "ppo"
    proc = launch(config, port, ppo_args(pipeline, out, "train.per_device_train_batch_size=8"))
    updates = read_jsonl(out / "metrics.jsonl", having="objective/kl")
    assert [u["episode"] for u in updates] == [32, 64, 96, 128]  # 2 processes x 16 prompts per update
    # DeepSpeed's collectives call torch's old names on every rank, every step (issue 18 item 15): filtered
    for old_name in ("reduce_scatter_tensor` is deprecated", "all_gather_into_tensor` is deprecated"):
        assert old_name not in proc.stdout + proc.stderr
    sft, ppo = load_file(str(pipeline["sft"] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert ppo.keys() == sft.keys() and all(ppo[k].shape == sft[k].shape for k in sft)  # full weights, gathered
    assert any(not torch.equal(sft[k], ppo[k]) for k in sft)
    AutoModelForCausalLM.from_pretrained(out)
    AutoModelForSequenceClassification.from_pretrained(out / "value")
    assert json.loads((out / "summary.json").read_text())["after (policy)"]["prompts"] == 8



def test_zero3_rloo_two_processes_then_eval(pipeline, tmp_path):
    """RLOO under ZeRO-3 on 2 processes: groups of 4 responses stay on their process, no critic is built or saved,
    the policy is gathered whole; `hfalign eval` rebuilds the run (critic-free) and measures it again."""
    from helpers import cli

    out = tmp_path / "rloo"
    launch("zero3.yaml", 29548, ppo_args(pipeline, out, "train.per_device_train_batch_size=8",
                                         "train.advantage_estimator=rloo", "train.num_generations=4"))
    updates = read_jsonl(out / "metrics.jsonl", having="objective/kl")
    assert [u["episode"] for u in updates] == [32, 64, 96, 128]  # responses: 2 processes x 4 prompts x 4
    assert all("loss/value_avg" not in u and "val/explained_variance" not in u for u in updates)
    assert not (out / "value").exists()
    sft, ppo = load_file(str(pipeline["sft"] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert ppo.keys() == sft.keys() and any(not torch.equal(sft[k], ppo[k]) for k in sft)
    code, _, err = cli("eval", str(out), "--json", str(tmp_path / "eval.json"))
    assert code == 0, err[-3000:]
    rows = json.loads((tmp_path / "eval.json").read_text())
    summary = json.loads((out / "summary.json").read_text())["after (policy)"]
    assert [r["model"] for r in rows] == ["reference (SFT)", "PPO policy"]
    assert rows[1]["prompts"] == summary["prompts"] == 8
    assert rows[0]["kl"] == 0 < rows[1]["kl"]  # the trained policy was loaded, not the SFT model again

def test_zero3_lora_shared_base_saves_non_empty_adapters(lora_pipeline, tmp_path):
    """LoRA under ZeRO-3 has written empty adapters elsewhere (peft#2500, trl#4416)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    launch("zero3.yaml", 29543, [f"output_dir={out}", f"model.name_or_path={lora_pipeline['base']}",
                                 f"model.adapter={lora_pipeline['sft']}", f"reward.model={lora_pipeline['rm']}",
                                 "lora.enabled=true", "lora.r=8", "train.total_episodes=64", "train.num_eval_prompts=8",
                                 "train.per_device_train_batch_size=8", "train.learning_rate=1e-2"])
    before = load_file(str(lora_pipeline["sft"] / "adapter_model.safetensors"))
    after = load_file(str(out / "adapter_model.safetensors"))
    assert after.keys() == before.keys() and all(after[k].shape == before[k].shape for k in before)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    value = load_file(str(out / "value" / "adapter_model.safetensors"))
    assert value and all(v.numel() > 0 for v in value.values())
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lora_pipeline["base"]), out)


def test_killed_run_resumes_with_the_same_command(pipeline, tmp_path):
    out = tmp_path / "ppo"
    cmd = [PYTHON, "-m", "hfalign", "recipes/ppo.yaml",
           *ppo_args(pipeline, out, "train.total_episodes=1280", "train.per_device_train_batch_size=8",
                     "train.num_mini_batches=2", "train.save_steps=3", "train.adaptive_kl=true")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "checkpoint-6" / "hfalign_ppo_state.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (out / "hfalign_done.json").exists(), "the run was not killed mid-way"
    saved = json.loads(marker.read_text())

    resumed = run(cmd)
    assert "resuming ppo from" in resumed.stdout
    updates = read_jsonl(out / "metrics.jsonl", having="objective/kl")
    steps = [u["step"] for u in updates]
    assert steps == list(range(1, 81)), "each update logged once, none lost or repeated"
    episodes = [u["episode"] for u in updates]
    assert episodes == [16 * s for s in steps]  # the episode counter came back from the checkpoint
    first_resumed = next(u for u in updates if u["step"] == _ckpt(resumed) + 1)
    assert first_resumed["objective/kl"] != 0.0  # the policy weights came back (an SFT policy has KL 0 exactly)
    assert saved["kl_coef"] != 0.2  # adaptive KL had moved from the recipe's 0.2, and was checkpointed
    assert (out / "hfalign_done.json").exists()
    ckpt = rundir.checkpoints(out)[-1]  # a checkpoint holds each trainable tensor once, and no frozen one
    assert [f.name for f in ckpt.glob("*.safetensors")] == ["trainable.safetensors"] and not (ckpt / "value").exists()
    sampled = [r["update"] for r in read_jsonl(out / "samples.jsonl")]
    assert sampled == sorted(sampled)  # the sample table was trimmed at the checkpoint, not appended twice


def _ckpt(proc) -> int:
    line = next(ln for ln in proc.stdout.splitlines() if "resuming ppo from" in ln)
    return int(line.rsplit("-", 1)[-1])


@pytest.mark.parametrize("config, port", [("zero2.yaml", 29544), ("zero3.yaml", 29545)])
def test_deepspeed_bf16_from_the_launch(pipeline, tmp_path, config, port):
    """`--mixed_precision bf16` on the launch is the run's precision (it died on DeepSpeed's 'ds bf16.enabled=True vs
    hf bf16=False'); the heads are stored as DeepSpeed stores every trainable parameter, values stay fp32."""
    out = tmp_path / "ppo"
    proc = launch(config, port, ppo_args(pipeline, out, "train.per_device_train_batch_size=8",
                                         "train.total_episodes=64", "train.save_steps=1"), precision="bf16")
    assert "acts as stop" not in proc.stdout  # the shipped recipe's rollback guards stay rollback guards
    updates = read_jsonl(out / "metrics.jsonl", having="objective/kl")
    assert [u["episode"] for u in updates] == [32, 64]
    assert all(abs(u["val/ratio"] - 1) < 0.1 for u in updates)
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.bf16 and not args.fp16
    # a DeepSpeed checkpoint is DeepSpeed's own (trainable weights + optimizer): no consolidated copy of the four
    # models beside it, no second copy of policy and value
    ckpt = out / "checkpoint-2"
    assert (ckpt / "trainer_state.json").exists() and list(ckpt.glob("global_step*"))
    assert not list(ckpt.glob("*.safetensors")) and not (ckpt / "value").exists()


def test_rollback_under_zero3_two_processes(pipeline, tmp_path):
    """A guard's rollback under DeepSpeed loads the engine's own checkpoint on every rank (it used to act as stop)."""
    out = tmp_path / "ppo"
    guard = "{name: kl_guard, max_kl: 1.0e-9, action: rollback}"  # any KL above 0 trips it
    proc = launch("zero3.yaml", 29547, ppo_args(pipeline, out, "train.per_device_train_batch_size=8",
                                                 "train.total_episodes=96", f"callbacks=[metrics, {guard}]"))
    updates = read_jsonl(out / "metrics.jsonl", having="objective/kl")
    # update 1 samples from the SFT policy itself (KL 0); update 2 trips and rolls back to checkpoint-0, so update 3
    # samples from the start's weights again (KL 0: every shard came back) with the KL coefficient doubled
    assert [u["objective/kl"] == 0 for u in updates] == [True, False, True]
    assert ["guard/KL_guard" in u for u in updates] == [False, True, False]
    # (adaptive KL nudges beta by < 0.1% per update in between)
    assert [u["objective/kl_coef"] for u in updates] == pytest.approx([0.2, 0.2, 0.4], rel=1e-2)
    assert proc.stdout.count("rolled back to") == 1 and "checkpoint-0; kl_coef" in proc.stdout
    # the rollback saved the restored weights as checkpoint-2 (the newest vetted one; rotation then dropped checkpoint-0)
    assert list((out / "checkpoint-2").glob("global_step*")) and (out / "hfalign_done.json").exists()
    assert json.loads((out / "checkpoint-2" / "hfalign_ppo_state.json").read_text())["vetted"][-1] == 2


def test_zero2_run_killed_after_a_rollback_resumes_with_the_same_guard_decisions(pipeline, tmp_path):
    """Issue 18: a 2-process ZeRO-2 run killed after a rollback and resumed decides as the uninterrupted one: the
    rollback saved the restored weights as the newest checkpoint, the guard's spent budget came back with it, so the
    second trip gives up (to a vetted checkpoint) in both. Also: a checkpoint torn by the kill is passed over (and
    removed), and after a 2-process resume each update is logged once (both ranks did write: 380 lines for 200
    updates)."""
    guard = "{name: kl_guard, max_kl: 1.0e-9, action: rollback, max_rollbacks: 1}"  # any KL above 0 trips it

    def cmd(out, port):
        return launch_cmd("zero2.yaml", port, ppo_args(pipeline, out, "train.per_device_train_batch_size=8",
                                                       "train.save_steps=1", "train.total_episodes=320",
                                                       f"callbacks=[metrics, {guard}]"))

    whole = run(cmd(tmp_path / "whole", 29548))
    out = tmp_path / "cut"
    kill_once_written(cmd(out, 29549), out, out / "checkpoint-2" / "trainer_state.json")  # the rollback's save
    for ckpt in rundir.checkpoints(out):  # anything after checkpoint-2: as if the kill came mid-save
        if int(ckpt.name.rsplit("-", 1)[-1]) > 2:
            (ckpt / "trainer_state.json").unlink(missing_ok=True)
    torn = out / "checkpoint-3"
    if not torn.exists():  # the kill came before the next save: make the torn one it could have left
        shutil.copytree(out / "checkpoint-2", torn, ignore=shutil.ignore_patterns("trainer_state.json"))
    resumed = run(cmd(out, 29549))
    assert "checkpoint-2" in next(ln for ln in resumed.stdout.splitlines() if "resuming ppo from" in ln)
    assert f"{torn} is incomplete" in resumed.stdout

    def decisions(run_dir):
        return [(u["step"], "guard/KL_guard" in u, round(u["objective/kl_coef"], 3))
                for u in read_jsonl(run_dir / "metrics.jsonl", having="objective/kl")]

    # update 1 samples the SFT policy (KL 0), update 2 trips and rolls back; the k1 estimate can come out negative, so
    # the 2nd trip comes at an update the seed decides -- the same one in both runs: without the guard's state the
    # resumed run had a fresh budget there, rolled back again and went on
    whole_decisions = decisions(tmp_path / "whole")
    assert whole_decisions[:2] == [(1, False, 0.2), (2, True, 0.2)] and sum(t for _, t, _ in whole_decisions) == 2
    assert whole_decisions[-1][1] and whole_decisions[-1][0] < 10  # the run ended on the 2nd trip, giving up
    assert decisions(out) == whole_decisions
    for proc_out in (whole.stdout, resumed.stdout):
        assert "1 rollbacks already; stopping on" in proc_out
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
