"""Rewards from anywhere (hfalign.rewards): a reward model with its own tokenizer (a tiny Qwen2 RM over the tiny LLaMA
policy), a reward server in a real process on 127.0.0.1 (equal to in-process scoring; killed mid-run, the run stops at
a checkpoint and resumes), combined rewards (RM + a format rule), and the recipe checks."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request

import pytest
import torch
from helpers import PYTHON, ROOT, cli, read_jsonl, shipped, train_shipped
from transformers import TrainerCallback

from hfalign.rewards import ModelScorer, RemoteScorer, RewardUnavailable


@pytest.fixture(scope="session")
def qwen_rm(tmp_path_factory) -> object:
    """A reward model of another family and tokenizer (tiny Qwen2: ChatML, no BOS) trained on the embedded default's
    preference pairs with the shipped recipe."""
    from hfalign.demo.tiny import build_tiny

    root = tmp_path_factory.mktemp("qwen")
    base = build_tiny(root / "tiny-qwen2", family="qwen2")
    code, _, err = train_shipped("reward/rm-qwen2.yaml", f"output_dir={root / 'rm'}", f"model.name_or_path={base}",
                                 f"data.train={ROOT / 'data/rm_train.jsonl'}", f"data.eval={ROOT / 'data/rm_eval.jsonl'}")
    assert code == 0, err[-3000:]
    return root / "rm"


def test_a_foreign_rm_scores_text_as_the_rm_itself_does(qwen_rm, pipeline, tmp_path):
    """Batched, padded scoring through the RM's own tokenizer and chat template (a text prompt + response + the RM's
    EOS, as TRL's RewardTrainer trained it) equals the RM on each text alone (1e-5); inside a PPO rollout of the LLaMA policy, the scores are those of the decoded prompt and response,
    without the policy's stop token."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from hfalign.ppo import PPOConfig, PPOTrainer
    from hfalign.ppo.rollout import left_pad

    scorer = ModelScorer.load(str(qwen_rm))
    prompts = ["Write a review of the red door.", [{"role": "user", "content": "Write a review of the lost city."}]]
    completions = [" the plot felt great.", " the music was dull. the cast seemed moving. the ending is quiet."]
    tok, rm = AutoTokenizer.from_pretrained(qwen_rm), AutoModelForSequenceClassification.from_pretrained(qwen_rm)
    chat = tok.apply_chat_template([*prompts[1], {"role": "assistant", "content": completions[1]}], tokenize=False)
    assert chat.startswith("<|im_start|>user") and "<|im_start|>assistant\n the music" in chat
    with torch.no_grad():
        alone = [rm(**tok(prompts[0] + completions[0] + tok.eos_token, return_tensors="pt")).logits[0, 0].item(),
                 rm(**tok(chat, add_special_tokens=False, return_tensors="pt")).logits[0, 0].item()]
    assert scorer(prompts, completions) == pytest.approx(alone, abs=1e-5)

    policy_tok = AutoTokenizer.from_pretrained(pipeline["sft"], padding_side="left")
    assert policy_tok.get_vocab() != tok.get_vocab()
    trainer = PPOTrainer(args=PPOConfig(output_dir=str(tmp_path / "api"), report_to="none", response_length=16, seed=0),
                         processing_class=policy_tok, model=AutoModelForCausalLM.from_pretrained(pipeline["sft"]),
                         reward_model=scorer,
                         value_model=AutoModelForSequenceClassification.from_pretrained(pipeline["rm"]),
                         train_dataset=datasets.Dataset.from_list(read_jsonl(ROOT / "data/ppo_prompts.jsonl")[:8]))
    q, m = left_pad(trainer.prompts[:8], policy_tok.pad_token_id)
    r = trainer.rollout(q, m)
    texts = policy_tok.batch_decode(r.responses, skip_special_tokens=True)
    assert r.has_eos.any() and not any("</s>" in t for t in texts)
    raw = [row["prompt"] for row in read_jsonl(ROOT / "data/ppo_prompts.jsonl")[:8]]
    assert r.scores.tolist() == pytest.approx(scorer(raw, texts), abs=1e-6)


def test_ppo_learns_against_a_reward_model_with_its_own_tokenizer(qwen_rm, pipeline, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "ppo"
    code, _, err = train_shipped("reward/ppo-qwen2-rm.yaml", f"output_dir={out}",
                                      f"model.name_or_path={pipeline['sft']}", f"reward.model={qwen_rm}",
                                      f"data.train={ROOT / 'data/ppo_prompts.jsonl'}",
                                      f"data.eval={ROOT / 'data/ppo_eval_prompts.jsonl'}",
                                      "train.total_episodes=640", "train.num_eval_prompts=48")
    assert code == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["before (reference)"], summary["after (policy)"]
    assert after["objective"] > before["objective"] + 0.2 and after["score"] > before["score"]
    assert after["well_formed"] >= 0.9
    critic = load_file(str(out / "value" / "model.safetensors"))  # from the policy: the RM's vocabulary is another
    assert critic["model.embed_tokens.weight"].shape == load_file(str(pipeline["sft"] / "model.safetensors"))[
        "model.embed_tokens.weight"].shape


def test_a_foreign_rm_on_the_lora_shared_base(qwen_rm, lora_pipeline, tmp_path):
    """LoRA shared base: the RM with its own tokenizer stays outside the base (no reward adapter or head is loaded,
    the critic is a fresh value adapter), and every logged score is its score of the decoded text."""
    out = tmp_path / "lora"
    code, _, err = train_shipped("reward/ppo-qwen2-rm.yaml", f"output_dir={out}",
                                 f"model.name_or_path={lora_pipeline['base']}", f"model.adapter={lora_pipeline['sft']}",
                                 f"reward.model={qwen_rm}", "lora.enabled=true", "lora.r=8", "train.total_episodes=64",
                                 "train.num_eval_prompts=8", f"data.train={ROOT / 'data/ppo_prompts.jsonl'}",
                                 f"data.eval={ROOT / 'data/ppo_eval_prompts.jsonl'}",
                                 "callbacks=[metrics, {name: sample_table, every: 1, rows: 8}]")
    assert code == 0, err[-3000:]
    assert (out / "adapter_model.safetensors").is_file() and (out / "value" / "value_head.safetensors").is_file()
    rows = read_jsonl(out / "samples.jsonl")
    scorer = ModelScorer.load(str(qwen_rm))
    assert rows and [r["score"] for r in rows] == pytest.approx(
        scorer([r["prompt"] for r in rows], [r["completion"] for r in rows]), abs=1e-4)


# -- the reward server ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([PYTHON, "-m", "hfalign", "serve-reward", str(model), "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                assert json.loads(r.read())["status"] == "ok"
            return proc
        except OSError:
            assert proc.poll() is None, "serve-reward exited"
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("serve-reward did not come up")


def api_trainer(pipeline, out, reward, callbacks=None, **kw):
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from hfalign.ppo import PPOConfig, PPOTrainer

    args = PPOConfig(**{**dict(output_dir=str(out), per_device_train_batch_size=8, num_mini_batches=2, num_ppo_epochs=1,
                               total_episodes=64, response_length=12, report_to="none", save_steps=1, seed=3,
                               learning_rate=1e-3), **kw})
    return PPOTrainer(args=args, processing_class=AutoTokenizer.from_pretrained(pipeline["sft"], padding_side="left"),
                      model=AutoModelForCausalLM.from_pretrained(pipeline["sft"]), reward_model=reward,
                      value_model=AutoModelForSequenceClassification.from_pretrained(pipeline["rm"]),
                      train_dataset=datasets.Dataset.from_list(read_jsonl(ROOT / "data/ppo_prompts.jsonl")[:64]),
                      callbacks=callbacks)


class KillServerAt(TrainerCallback):
    def __init__(self, step, proc):
        self.step, self.proc = step, proc

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.proc.kill()
            self.proc.wait()


def test_reward_server_scores_as_in_process_and_a_run_survives_it_going_down(pipeline, tmp_path):
    """The same run scored by a serve-reward process and by the same model in-process: the same metrics. Then the
    server is killed after update 2's checkpoint: update 3 cannot be scored, the run stops with an error naming the
    URL, checkpoint-2 stays complete, and once the server is back the run resumes from it to the end."""
    from hfalign import rundir

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(pipeline["rm"], port)
    try:
        remote = api_trainer(pipeline, tmp_path / "remote", RemoteScorer(url), total_episodes=32)
        remote.train()
        local = api_trainer(pipeline, tmp_path / "local", ModelScorer.load(str(pipeline["rm"])), total_episodes=32)
        local.train()
        logs = [[{k: v for k, v in h.items() if not k.startswith(("timing/", "eps"))} for h in t.state.log_history
                 if "objective/kl" in h] for t in (remote, local)]
        assert len(logs[0]) == 2 and logs[0] == logs[1]

        cut = tmp_path / "cut"
        flaky = RemoteScorer(url, timeout=5, retries=1, backoff=0.1)
        with pytest.raises(RewardUnavailable, match=f"reward server {url} did not answer after 2 tries"):
            api_trainer(pipeline, cut, flaky, callbacks=[KillServerAt(2, proc)]).train()
        assert str(rundir.last_checkpoint(cut)).endswith("checkpoint-2")
        proc = start_server(pipeline["rm"], port)
        again = api_trainer(pipeline, cut, RemoteScorer(url))
        again.train(resume_from_checkpoint=True)
        assert again.state.global_step == 4 and again.episode == 64
    finally:
        proc.kill()
        proc.wait()


def test_reward_server_refuses_what_it_cannot_score(pipeline):
    port = free_port()
    proc = start_server(pipeline["rm"], port)
    try:
        def post(body: bytes) -> tuple[int, dict]:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/score", data=body)
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        code, body = post(json.dumps({"prompts": ["a"], "completions": ["b", "c"]}).encode())
        assert code == 400 and "equal length" in body["error"]
        assert post(b"not json")[0] == 400
        code, body = post(json.dumps({"prompts": ["Write a review of it."], "completions": [" great."]}).encode())
        assert code == 200 and len(body["scores"]) == 1
        with pytest.raises(Exception, match="refused the request: HTTP 400"):
            RemoteScorer(f"http://127.0.0.1:{port}")(["a"], ["b", "c"])
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(RewardUnavailable, match=f"127.0.0.1:{port} did not answer after 1 tries"):
        RemoteScorer(f"http://127.0.0.1:{port}", retries=0)(["a"], ["b"])


# -- combined rewards ------------------------------------------------------------------------------------------------
def test_combined_reward_is_the_weighted_sum_and_each_source_is_logged(pipeline, tmp_path):
    from hfalign.demo.task import format_reward

    out = tmp_path / "combined"
    sources = (f'[{{name: rm, model: "{pipeline["rm"]}", weight: 1.0}}, '
               '{name: format, function: "hfalign.demo.task:format_reward", weight: 0.5}]')
    code, _, err = train_shipped("reward/ppo-combined.yaml", f"output_dir={out}", f"model.name_or_path={pipeline['sft']}",
                                 f"reward.sources={sources}", f"data.train={ROOT / 'data/ppo_prompts.jsonl'}",
                                 f"data.eval={ROOT / 'data/ppo_eval_prompts.jsonl'}", "train.total_episodes=64",
                                 "train.num_eval_prompts=8")
    assert code == 0, err[-3000:]
    updates = read_jsonl(out / "metrics.jsonl", having="objective/kl")
    assert all("reward/rm" in u and "reward/format" in u for u in updates)
    assert all(u["objective/scores"] == pytest.approx(u["reward/rm"] + 0.5 * u["reward/format"], abs=1e-4)
               for u in updates)
    rows = read_jsonl(out / "samples.jsonl")
    rm = ModelScorer.load(str(pipeline["rm"]))
    rm_scores = rm([r["prompt"] for r in rows], [r["completion"] for r in rows])
    fmt = format_reward([], [r["completion"] for r in rows])
    assert [r["score"] for r in rows] == pytest.approx([a + 0.5 * b for a, b in zip(rm_scores, fmt)], abs=1e-4)


def test_reward_section_mistakes_are_one_clear_line(pipeline):
    base = [*shipped("ppo.yaml"), f"model.name_or_path={pipeline['sft']}"]
    for overrides, message in (
            (["reward.url=http://127.0.0.1:1"], "needs exactly one of 'model', 'url', 'function' or 'sources', got model, url"),
            (["reward.model=null", "reward.url=localhost:80"], "expected http://host:port"),
            (["reward.model=null", "reward.sources=[]"], "'reward.sources' is empty"),
            (["reward.model=null", "reward.sources=[{model: nowhere}]"], "'reward.sources[0].model' directory 'nowhere'"),
            (["reward.model=null", "reward.sources=[{function: 'hfalign.demo.task:format_reward', weight: x}]"],
             "'reward.sources[0].weight' must be a number"),
            (["reward.model=null", "reward.sources=[{function: 'hfalign.demo.task:format_reward', wieght: 1}]"],
             "unknown key 'reward.sources[0].wieght'"),
            (["reward.model=null", "reward.sources=[{function: 'hfalign.demo.task:format_reward'}, "
              "{function: 'hfalign.demo.task:format_reward'}]"], "names 'format_reward' twice")):
        code, _, err = cli("validate", *base, *overrides)
        assert code == 2 and message in err and "Traceback" not in err, (overrides, err)
    code, out, err = cli("validate", *shipped("reward/ppo-server.yaml"), f"model.name_or_path={pipeline['sft']}")
    assert code == 0 and "ok:" in out, err
