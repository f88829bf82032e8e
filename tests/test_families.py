"""Tiny models of each family (`hfalign build-tiny --family F`): the family's own config class, special tokens and
chat template, as the real checkpoints ship them; and what hfalign makes of them (FAMILIES, pad rule, PPO stop
tokens). The start of issue 9: the family templates will run on these."""

from __future__ import annotations

import json

import pytest
from helpers import cli, read_jsonl, train_shipped

from hfalign import models
from hfalign.recipe import ModelSection

# family: (model_type, class, what a rendered user turn starts with, tokenizer adds BOS, generation stops at)
EXPECTED = {
    "llama2": ("llama", "LlamaForCausalLM", "<s>[INST] ", True, ["</s>"]),
    "llama3": ("llama", "LlamaForCausalLM", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n", True,
               ["<|end_of_text|>", "<|eot_id|>"]),
    "glm": ("glm", "GlmForCausalLM", "[gMASK]<sop><|user|>\n", False, ["<|endoftext|>", "<|user|>", "<|observation|>"]),
    "glm4": ("glm4", "Glm4ForCausalLM", "[gMASK]<sop><|user|>\n", False,
             ["<|endoftext|>", "<|user|>", "<|observation|>"]),
}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("families")
    for family in EXPECTED:
        code, _, err = cli("build-tiny", str(root / family), "--family", family)
        assert code == 0, err
    return {family: root / family for family in EXPECTED}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_tiny_family_model_looks_like_the_real_one(family_models, family):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from hfalign.ppo.config import PPOConfig
    from hfalign.ppo.generation import stop_token_ids

    model_type, cls, turn, adds_bos, stops = EXPECTED[family]
    path = family_models[family]
    model, raw = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == model_type and type(model).__name__ == cls
    assert models.family_of(model) is models.FAMILIES[model_type]
    AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)  # a reward model / critic of the family
    stop_ids = [raw.convert_tokens_to_ids(t) for t in stops]
    assert model.generation_config.eos_token_id == (stop_ids if len(stop_ids) > 1 else stop_ids[0])
    rendered = raw.apply_chat_template([{"role": "user", "content": "Write a review of the red door."}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered.startswith(turn + "Write a review of the red door.")
    assert (raw("x").input_ids[0] == raw.bos_token_id) is adds_bos
    # as shipped, LLaMA-2/3 have no pad token and GLM pads with its EOS; hfalign's rule gives each a distinct pad
    assert raw.pad_token is None or raw.pad_token_id == raw.eos_token_id
    tok = models.load_tokenizer(ModelSection(name_or_path=str(path)))
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    # where the family's vocab has an unused token for it (LLaMA-3's reserved one), no token is added
    assert (len(tok) == len(raw)) is (family in ("llama2", "llama3"))
    if family == "llama3":
        assert tok.pad_token == "<|reserved_special_token_0|>"
    # PPO stops at EOS and at the family's end-of-turn tokens (models.FAMILIES) that this tokenizer has
    ids = stop_token_ids(PPOConfig(output_dir="x", report_to="none"), tok, model)
    family_stops = [t for t in models.FAMILIES[model_type].stop_tokens if t in tok.get_vocab()]
    assert ids == list(dict.fromkeys([tok.eos_token_id, *tok.convert_tokens_to_ids(family_stops)]))
    if family in ("llama3", "glm", "glm4"):
        assert len(family_stops) >= 1  # <|eot_id|>; <|user|> and <|observation|>


@pytest.mark.parametrize("family", ["llama3", "glm4"])
def test_ppo_recipe_runs_on_a_family_model(family_models, tmp_path, family):
    """The shipped PPO recipe on the family's own architecture (from its random init, with a reward function): the
    run ends, its summary is written, and the policy saved is the family's class."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ppo"
    code, _, err = train_shipped("ppo.yaml", f"output_dir={out}", f"model.name_or_path={family_models[family]}",
                                 "reward.model=null", "reward.function=hfalign.demo.task:positivity_reward",
                                 "train.total_episodes=64", "train.num_eval_prompts=8", "train.response_length=12")
    assert code == 0, err[-3000:]
    assert [u["episode"] for u in read_jsonl(out / "metrics.jsonl", having="objective/kl")] == [32, 64]
    assert json.loads((out / "summary.json").read_text())["after (policy)"]["prompts"] == 8
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == EXPECTED[family][1]


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_conversational_prompts_carry_one_bos(family_models, tmp_path, family):
    """Their chat templates write the BOS themselves and their tokenizers add one too: a prompt must not get two."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from hfalign.demo.task import positivity_reward
    from hfalign.ppo import PPOConfig, PPOTrainer

    path = family_models[family]
    tok = models.load_tokenizer(ModelSection(name_or_path=str(path)))
    turn = [{"role": "user", "content": "Write a review of the red door."}]
    trainer = PPOTrainer(args=PPOConfig(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=2,
                                        total_episodes=2), processing_class=tok,
                         model=AutoModelForCausalLM.from_pretrained(path), reward_model=positivity_reward,
                         value_model=AutoModelForSequenceClassification.from_pretrained(path, num_labels=1),
                         train_dataset=datasets.Dataset.from_list([{"prompt": turn}] * 2))
    ids = trainer.prompts[0]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=False).startswith(EXPECTED[family][2])


@pytest.mark.parametrize("family", list(EXPECTED))
def test_a_final_assistant_turn_ends_with_eos(family_models, family):
    """GLM's template writes nothing after an answer (the model goes on with <|user|>), and TRL adds no EOS to
    conversations: SFT on single-turn data would never learn to stop. hfalign closes such a turn with EOS; templates
    that close it themselves (LLaMA-2 </s>, LLaMA-3 <|eot_id|>) and generation prompts render as shipped."""
    from transformers import AutoTokenizer

    path = family_models[family]
    raw, tok = AutoTokenizer.from_pretrained(path), models.load_tokenizer(ModelSection(name_or_path=str(path)))
    conv = [{"role": "user", "content": "Write a review of the red door."}, {"role": "assistant", "content": "great."}]
    ids = tok.apply_chat_template(conv, tokenize=True, return_dict=False)
    assert ids[-1] == tok.eos_token_id != ids[-2]  # one EOS, not two
    shipped = raw.apply_chat_template(conv, tokenize=False)
    assert tok.apply_chat_template(conv, tokenize=False) == (shipped if family.startswith("llama") else shipped + raw.eos_token)
    prompt = dict(tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(conv[:1], **prompt) == raw.apply_chat_template(conv[:1], **prompt)


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_sft_and_rm_rows_carry_one_bos(family_models, tmp_path, family):
    """The first two stages tokenize conversations through TRL: with the tokenizer hfalign loads, every SFT and RM
    row starts with one BOS (the template writes it; the tokenizer must not add another)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    path = family_models[family]
    tok = models.load_tokenizer(ModelSection(name_or_path=str(path)))
    user = [{"role": "user", "content": "Write a review of the red door."}]

    def said(text):
        return [*user, {"role": "assistant", "content": text}]

    common = dict(report_to="none", use_cpu=True, max_length=64)
    sft = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(path), processing_class=tok,
                     args=SFTConfig(output_dir=str(tmp_path / "sft"), **common),
                     train_dataset=datasets.Dataset.from_list([{"messages": said("the plot was great.")}]))
    rm = RewardTrainer(model=AutoModelForSequenceClassification.from_pretrained(path, num_labels=1), processing_class=tok,
                       args=RewardConfig(output_dir=str(tmp_path / "rm"), **common),
                       train_dataset=datasets.Dataset.from_list([{"chosen": said("great."), "rejected": said("dull.")}]))
    rows = [sft.train_dataset[0]["input_ids"], rm.train_dataset[0]["chosen_ids"],
            rm.train_dataset[0]["rejected_ids"]]
    for ids in rows:
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1, tok.convert_ids_to_tokens(ids[:3])
