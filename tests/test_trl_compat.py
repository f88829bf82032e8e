"""A drop-in for TRL 1.12's PPO (issue 11): TRL's own PPO tests and example scripts with one changed import.

    from trl.experimental.ppo import PPOConfig, PPOTrainer   ->   from hfalign.ppo import PPOConfig, PPOTrainer

`TestPPOTrainer` is TRL's (huggingface/trl tests/experimental/test_ppo_trainer.py at f2cd577, version 1.10.0.dev0):
setup, training calls and assertions as TRL wrote them. What differs is only where things come from, offline: the hub
ids become local tiny models built here (a Qwen2 as TRL's test uses, and a LLaMA; each with a sequence-classification
twin), and trl-internal-testing/zen becomes local files of the same shape. The example scripts are TRL's files
(tests/trl_examples/, import line changed) run as processes with their own command lines.
"""

from __future__ import annotations

import json

import pytest
import torch
from datasets import load_dataset
from helpers import PYTHON, ROOT, run
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import is_peft_available

from hfalign.ppo import PPOConfig, PPOTrainer  # was: from trl.experimental.ppo import PPOConfig, PPOTrainer

if is_peft_available():
    from peft import LoraConfig

# trl-internal-testing/zen, standard_prompt_only: the Zen of Python, its lines cut into prompts
ZEN_TRAIN = ["Beautiful is better than", "Explicit is", "Simple is better", "Complex", "Flat is better than",
             "Sparse is better", "Readability", "Special cases aren't special", "Although practicality beats",
             "Errors should never", "Unless explicitly", "In the face of ambiguity, refuse", "There should be one--",
             "Although that way may not be", "Now is better than", "Although never is often better than",
             "If the implementation is hard to explain, it's"]
ZEN_TEST = ["If the implementation is easy to explain, it may be", "Namespaces are one"]

# The metrics TRL 1.12's PPOTrainer logged every update (its trainer's `metrics` dict): a dashboard keeps working
TRL_METRICS = ["eps", "objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
               "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
               "val/clipfrac_avg", "policy/entropy_avg", "val/ratio", "val/ratio_var", "val/num_eos_tokens", "lr",
               "episode"]


def _write_split(root, split: str, rows: list[dict]) -> None:
    """A local dataset directory load_dataset reads like a hub repo: data/<split>-00000-of-00001.jsonl."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    with open(root / "data" / f"{split}-00000-of-00001.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    """Local stand-ins for the hub: tiny Qwen2 and LLaMA causal LMs with sequence-classification twins (random
    heads, as TRL's tiny test models), the zen prompts, and the example scripts' datasets."""
    from hfalign.demo.tiny import build_tiny

    root = tmp_path_factory.mktemp("hub")
    out = {}
    for family in ("qwen2", "llama"):
        # spare embedding rows, as Qwen2's checkpoints have: TRL's scripts add a [PAD] token without resizing
        causal = build_tiny(root / f"tiny-{family}", family=family, vocab_multiple=64)
        classifier = AutoModelForSequenceClassification.from_pretrained(causal, num_labels=1)
        classifier.config.pad_token_id = AutoTokenizer.from_pretrained(causal).pad_token_id
        classifier.save_pretrained(root / f"tiny-{family}-seqcls")
        AutoTokenizer.from_pretrained(causal).save_pretrained(root / f"tiny-{family}-seqcls")
        out[family] = (str(causal), str(root / f"tiny-{family}-seqcls"))
    _write_split(root / "zen", "train", [{"prompt": p} for p in ZEN_TRAIN])
    _write_split(root / "zen", "test", [{"prompt": p} for p in ZEN_TEST])
    reviews = [f"Write a {tone} review of the {thing}:" for tone in ("short", "kind", "harsh", "fair", "calm", "warm")
               for thing in ("red door", "old film", "new song", "blue car", "tall tree", "small cafe", "late train",
                             "quiet park", "loud band", "green lamp", "cold soup", "long book", "wet road",
                             "bright room", "slow game", "warm coat", "fast boat", "dark sky", "soft chair", "big city")]
    _write_split(root / "descriptiveness", "descriptiveness", [{"prompt": p} for p in reviews])  # 120 > its 100 eval
    _write_split(root / "tldr", "train", [{"prompt": f"POST: {p}\nTL;DR:"} for p in reviews[:64]])
    _write_split(root / "tldr", "validation", [{"prompt": f"POST: {p}\nTL;DR:"} for p in reviews[64:80]])
    out.update(zen=str(root / "zen"), descriptiveness=str(root / "descriptiveness"), tldr=str(root / "tldr"))
    return out


class TestPPOTrainer:
    """TRL's TestPPOTrainer. Only setup_method's sources changed (local ids; TrlTestCase's tmp_dir from pytest)."""

    @pytest.fixture(autouse=True, params=["qwen2", "llama"])
    def _setup(self, request, hub, tmp_path):
        self.tmp_dir = str(tmp_path)
        self.hub_ids = hub[request.param]
        self.zen = hub["zen"]
        self.setup_method()

    def setup_method(self, method=None):
        if not hasattr(self, "hub_ids") or hasattr(self, "model"):
            return  # pytest calls it as xunit setup too: only the fixture's call (with the local ids) sets up
        # Set up the models and tokenizer using the test model
        self.model_id = self.hub_ids[0]  # TRL: "trl-internal-testing/tiny-Qwen2ForCausalLM-2.5"
        self.model = AutoModelForCausalLM.from_pretrained(self.model_id, dtype="float32")
        self.ref_model = AutoModelForCausalLM.from_pretrained(self.model_id)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_id, padding_side="left")
        self.tokenizer.add_special_tokens({"pad_token": "[PAD]"})

        # Add reward and value models as in ppo.py
        reward_model_id = self.hub_ids[1]  # TRL: "trl-internal-testing/tiny-Qwen2ForSequenceClassification-2.5"
        self.value_model = AutoModelForSequenceClassification.from_pretrained(reward_model_id, num_labels=1)
        self.reward_model = AutoModelForSequenceClassification.from_pretrained(reward_model_id, num_labels=1)

        # Load dataset
        raw_dataset = load_dataset(self.zen)  # TRL: load_dataset("trl-internal-testing/zen", "standard_prompt_only")

        def tokenize(example, tokenizer):
            tokenized = tokenizer(text=example["prompt"])
            if tokenizer.eos_token_id is not None and tokenized["input_ids"][-1] != tokenizer.eos_token_id:
                tokenized["input_ids"] = tokenized["input_ids"] + [tokenizer.eos_token_id]
                tokenized["attention_mask"] = tokenized["attention_mask"] + [1]
            return tokenized

        self.raw_dataset = raw_dataset.map(tokenize, fn_kwargs={"tokenizer": self.tokenizer}, remove_columns="prompt")

    def test_basic_training(self):
        """Test basic PPO training configuration and verify model updates."""
        # Capture initial weights
        initial_critic_weights = {}
        initial_policy_weights = {}
        for name, param in self.value_model.named_parameters():
            initial_critic_weights[name] = param.clone().detach()
        for name, param in self.model.named_parameters():
            initial_policy_weights[name] = param.clone().detach()

        # Configure training args similar to example script
        training_args = PPOConfig(
            output_dir=self.tmp_dir,
            per_device_train_batch_size=4,
            per_device_eval_batch_size=2,
            num_ppo_epochs=2,  # Decrease number of PPO epochs to speed up test
            report_to="none",
        )

        # Create trainer
        trainer = PPOTrainer(
            args=training_args,
            processing_class=self.tokenizer,
            model=self.model,
            ref_model=self.ref_model,
            reward_model=self.reward_model,
            value_model=self.value_model,
            train_dataset=self.raw_dataset["train"],
            eval_dataset=self.raw_dataset["test"],
        )

        # Train
        trainer.train()

        # Check if critic weights have been updated
        critic_weights_updated = False
        for name, param in trainer.model.value_model.named_parameters():
            if not torch.equal(initial_critic_weights[name], param.to("cpu")):
                critic_weights_updated = True
                break

        # Check if policy weights have been updated
        policy_weights_updated = False
        for name, param in trainer.model.policy.named_parameters():
            if not torch.equal(initial_policy_weights[name], param.to("cpu")):
                policy_weights_updated = True
                break

        assert critic_weights_updated, "Critic weights were not updated during training"
        assert policy_weights_updated, "Policy weights were not updated during training"

        # hfalign's additions: TRL's metric names are logged, TRL's derived batch fields are filled in
        assert set(TRL_METRICS) <= set(trainer.state.log_history[0]), set(TRL_METRICS) - set(trainer.state.log_history[0])
        assert (training_args.batch_size, training_args.num_total_batches) == (4, 13)  # 3 epochs x 17 prompts / 4

    @pytest.mark.skipif(not is_peft_available(), reason="peft")
    def test_peft_training(self):
        """Test PPO training with PEFT configuration and verify model updates."""
        # Capture initial weights
        initial_critic_weights = {}
        initial_policy_weights = {}
        for name, param in self.value_model.named_parameters():
            initial_critic_weights[name] = param.clone().detach()
        for name, param in self.model.named_parameters():
            initial_policy_weights[name] = param.clone().detach()

        # Configure training args
        training_args = PPOConfig(
            output_dir=self.tmp_dir,
            per_device_train_batch_size=4,
            per_device_eval_batch_size=2,
            num_ppo_epochs=2,  # Decrease number of PPO epochs to speed up test
            report_to="none",
        )

        # Configure PEFT
        peft_config = LoraConfig(
            r=32,
            lora_alpha=16,
            lora_dropout=0.05,
            bias="none",
            task_type="CAUSAL_LM",
        )

        # Create trainer with PEFT
        trainer = PPOTrainer(
            args=training_args,
            processing_class=self.tokenizer,
            model=self.model,
            ref_model=None,
            reward_model=self.reward_model,
            value_model=self.value_model,
            train_dataset=self.raw_dataset["train"],
            eval_dataset=self.raw_dataset["test"],
            peft_config=peft_config,
        )

        # Train
        trainer.train()

        # Check if critic weights have been updated
        critic_weights_updated = False
        for name, param in trainer.model.value_model.named_parameters():
            if name in initial_critic_weights and not torch.equal(initial_critic_weights[name], param.to("cpu")):
                critic_weights_updated = True
                break

        # Check if policy weights have been updated - for PEFT we check the LoRA weights
        policy_weights_updated = False
        for name, param in trainer.model.policy.named_parameters():
            if "lora" in name.lower() and param.requires_grad:  # Only check LoRA weights
                # New weights should be non-zero if they've been updated
                if not torch.allclose(param, torch.zeros_like(param)):
                    policy_weights_updated = True
                    break

        assert critic_weights_updated, "Critic weights were not updated during training"
        assert policy_weights_updated, "Policy LoRA weights were not updated during training"


def test_generate_completions_and_sample_generations(hub, tmp_path):
    """TRL 1.12's generate_completions(): the eval prompts' near-greedy completions with their scores, as a table;
    num_sample_generations calls it during training. Without an eval set it does nothing, as TRL's did."""
    causal, classifier = hub["qwen2"]
    tok = AutoTokenizer.from_pretrained(causal, padding_side="left")
    data = load_dataset(hub["zen"])
    trainer = PPOTrainer(args=PPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_ppo_epochs=1,
                                        total_episodes=16, num_sample_generations=2, per_device_eval_batch_size=1,
                                        response_length=8, report_to="none"),
                         processing_class=tok, model=AutoModelForCausalLM.from_pretrained(causal),
                         ref_model=AutoModelForCausalLM.from_pretrained(causal),
                         reward_model=AutoModelForSequenceClassification.from_pretrained(classifier),
                         value_model=AutoModelForSequenceClassification.from_pretrained(classifier),
                         train_dataset=data["train"], eval_dataset=data["test"])  # text prompts work too
    trainer.train()
    during = [json.loads(x) for x in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in during] == [1, 3]  # 4 updates, every 2nd from the first; one eval prompt each (sampling)
    rows = trainer.generate_completions()
    assert [r["query"] for r in rows] == ZEN_TEST and all(isinstance(r["score"], float) for r in rows)
    assert rows == trainer.generate_completions()  # temperature 0.01: as good as greedy, so repeatable
    trainer.eval_prompts = []
    assert trainer.generate_completions() == []
    # what a TRL 1.12 script reads off the trainer (issue 18 item 14)
    assert trainer.state.episode == 16 and trainer.policy_model is trainer.model.policy
    assert isinstance(trainer.ref_model, torch.nn.Module) and trainer.ref_model is not trainer.policy_model
    assert trainer.reward_model is trainer.model.reward and trainer.value_model is trainer.model.critic


def test_trl_mistakes_get_trl_errors(hub, tmp_path):
    causal, classifier = hub["qwen2"]
    tok = AutoTokenizer.from_pretrained(causal, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(causal)
    args = PPOConfig(output_dir=str(tmp_path), report_to="none")
    reward = AutoModelForSequenceClassification.from_pretrained(classifier)
    with pytest.raises(ValueError, match="cannot set both `stop_token` and `stop_token_id`"):
        PPOTrainer(PPOConfig(output_dir=str(tmp_path), report_to="none", stop_token="eos", stop_token_id=0), tok,
                   policy, None, reward, load_dataset(hub["zen"])["train"], peft_config=LoraConfig(r=4, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="cannot be the same object"):
        PPOTrainer(args, tok, policy, policy, reward, load_dataset(hub["zen"])["train"], reward)
    with pytest.raises(ValueError, match=r"'input_ids' column .* or a 'prompt' column"):
        PPOTrainer(args, tok, policy, None, reward, load_dataset(hub["zen"])["train"].rename_column("prompt", "q"),
                   peft_config=LoraConfig(r=4, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="push_to_hub=True needs the Hugging Face Hub, and HF_HUB_OFFLINE is set"):
        PPOTrainer(PPOConfig(output_dir=str(tmp_path), report_to="none", push_to_hub=True), tok, policy, None, reward,
                   load_dataset(hub["zen"])["train"], peft_config=LoraConfig(r=4, task_type="CAUSAL_LM"))
    tok.add_special_tokens({"additional_special_tokens": [f"<x{i}>" for i in range(80)]})  # past the spare rows
    with pytest.raises(ValueError, match=r"embedding .* rows.*resize_token_embeddings"):
        PPOTrainer(args, tok, AutoModelForCausalLM.from_pretrained(causal), None, reward,
                   load_dataset(hub["zen"])["train"], peft_config=LoraConfig(r=4, task_type="CAUSAL_LM"))


def _example(script: str, *args: str, env: dict | None = None):
    return run([PYTHON, str(ROOT / "tests/trl_examples" / script), *args], env={"HF_HUB_OFFLINE": "1", **(env or {})})


@pytest.mark.parametrize("peft", [False, True], ids=["full", "peft"])
def test_example_ppo_script(hub, tmp_path, peft):
    """examples/scripts/ppo/ppo.py as TRL documents it (its first command line, shrunk), on the tiny Qwen2."""
    causal, classifier = hub["qwen2"]
    out = tmp_path / "ppo"
    proc = _example("ppo.py", "--dataset_name", hub["descriptiveness"], "--dataset_train_split", "descriptiveness",
                    "--output_dir", str(out), "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
                    "--total_episodes", "16", "--model_name_or_path", causal, "--sft_model_path", causal,
                    "--reward_model_path", classifier, "--missing_eos_penalty", "1.0", "--response_length", "16",
                    "--local_rollout_forward_batch_size", "4", "--num_ppo_epochs", "1", "--report_to", "none",
                    *(["--use_peft", "--lora_r", "8"] if peft else []))
    assert (out / ("adapter_model.safetensors" if peft else "model.safetensors")).is_file()
    assert (out / "value" / "config.json").is_file()  # the critic is saved too (TRL 1.12 lost it: trl#3293)
    completions = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == 100  # the script's generate_completions() on its 100 eval prompts
    assert "hfalign completions" in proc.stdout and "sft_model_path" in proc.stdout  # the not-acted-on note


def test_example_ppo_script_under_zero3_two_processes(hub, tmp_path):
    """TRL's second documented command: `accelerate launch --config_file .../deepspeed_zero3.yaml ppo.py`, here with
    hfalign's zero3.yaml and 2 CPU processes (PPOConfig picks gloo on CPU, as the recipe path does)."""
    from transformers import AutoModelForCausalLM as Causal

    causal, classifier = hub["qwen2"]
    out = tmp_path / "z3"
    run([PYTHON, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs/zero3.yaml"),
         "--num_processes", "2", "--main_process_port", "29561", str(ROOT / "tests/trl_examples/ppo.py"),
         "--dataset_name", hub["descriptiveness"], "--dataset_train_split", "descriptiveness", "--output_dir", str(out),
         "--per_device_train_batch_size", "4", "--total_episodes", "16", "--model_name_or_path", causal,
         "--sft_model_path", causal, "--reward_model_path", classifier, "--missing_eos_penalty", "1.0",
         "--response_length", "16", "--local_rollout_forward_batch_size", "4", "--report_to", "none"],
        env={"HF_HUB_OFFLINE": "1"})
    saved, start = Causal.from_pretrained(out), Causal.from_pretrained(causal)
    assert any(not torch.equal(a, b) for a, b in zip(saved.parameters(), start.parameters()))  # full weights, trained
    assert len((out / "completions.jsonl").read_text().splitlines()) == 100  # written once, by the main process


def test_example_ppo_tldr_script(hub, tmp_path):
    """examples/scripts/ppo/ppo_tldr.py (stop_token eos, eval_strategy steps, an eval split), on the tiny LLaMA."""
    causal, classifier = hub["llama"]
    out = tmp_path / "tldr"
    _example("ppo_tldr.py", "--dataset_name", hub["tldr"], "--dataset_test_split", "validation", "--output_dir", str(out),
             "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--total_episodes", "16",
             "--model_name_or_path", causal, "--sft_model_path", causal, "--reward_model_path", classifier,
             "--missing_eos_penalty", "1.0", "--stop_token", "eos", "--response_length", "16", "--eval_strategy",
             "steps", "--eval_steps", "100", "--num_ppo_epochs", "1", "--report_to", "none")
    assert (out / "model.safetensors").is_file()
    completions = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == 16 and all(r["query"].startswith("POST: ") for r in completions)
