"""Every user mistake of the foundation issue: one clear line (what, where, fix), exit code 2, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import PYTHON, ROOT, cli, run


def assert_user_error(code, out, err, *needles):
    assert code == 2, (code, out, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("hfalign: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_valid_recipe_passes(write_recipe, sft_recipe):
    code, out, err = cli("validate", str(write_recipe(sft_recipe)))
    assert code == 0, err
    assert "valid sft recipe" in out


@pytest.mark.parametrize(
    "mutate, needles",
    [
        (lambda r: r.update(stag="sft"), ["unknown key 'stag'", "did you mean 'stage'"]),
        (lambda r: r["model"].update(nmae_or_path="x"), ["unknown key 'model.nmae_or_path'", "'name_or_path'"]),
        (lambda r: r["train"].update(learnig_rate=1e-3), ["unknown key 'train.learnig_rate'", "'learning_rate'"]),
        (lambda r: r["lora"] if False else r.update(lora={"r": "abc"}), ["'lora.r' must be int", "'abc'"]),
        (lambda r: r["train"].update(learning_rate=0), ["'train.learning_rate' must be > 0"]),
        (lambda r: r["train"].update(learning_rate=-1e-4), ["'train.learning_rate' must be > 0"]),
        (lambda r: r["train"].update(per_device_train_batch_size=0), ["'train.per_device_train_batch_size' must be > 0"]),
        (lambda r: r["train"].update(num_train_epochs="many"), ["'train.num_train_epochs' must be float"]),
        (lambda r: r["data"].update(train="/nope/missing.jsonl"), ["'data.train' file", "does not exist"]),
        (lambda r: r["model"].update(name_or_path="./no/such/model"), ["'model.name_or_path'", "not an existing directory"]),
        (lambda r: r.update(stage="dpo"), ["'stage' must be one of sft, rm, ppo", "'dpo'"]),
        (lambda r: r.pop("output_dir"), ["'output_dir' is required"]),
        (lambda r: r["train"].update(output_dir="x"), ["'train.output_dir' is set by hfalign", "top-level 'output_dir'"]),
        (lambda r: r.update(quantization={"load_in_4bit": True}), ["lora.enabled: true"]),
        (lambda r: r.update(reward={"model": "x"}), ["'reward' is only for stage ppo"]),
        (lambda r: r.update(callbacks=["nope"]), ["unknown callback 'nope'", "metrics"]),
        (lambda r: r.update(callbacks=[{"name": "metrics", "colour": 1}]), ["has no option 'colour'"]),
        (lambda r: r["data"].update(eval_fraction=1.5), ["'data.eval_fraction' must be in [0, 1)"]),
        (lambda r: r["train"].update(lr_scheduler_type="zigzag"), ["'train.lr_scheduler_type' must be one of", "'cosine'", "zigzag"]),
        (lambda r: r["train"].update(evaluation_strategy="epoch"), ["'train.evaluation_strategy'", "'eval_strategy'"]),
        (lambda r: r["train"].update(eval_strategy=["steps"]), ["'train.eval_strategy' must be one of", "'epoch'"]),
    ],
    ids=["unknown-top", "unknown-nested", "unknown-train", "wrong-type", "lr-zero", "lr-negative", "batch-zero",
         "epochs-type", "missing-data", "missing-model", "bad-stage", "missing-required", "owned-key", "qlora-no-lora",
         "reward-in-sft", "unknown-callback", "callback-option", "eval-fraction", "enum-value", "renamed-key", "enum-list"],
)
def test_bad_recipe(write_recipe, sft_recipe, mutate, needles):
    mutate(sft_recipe)
    path = write_recipe(sft_recipe)
    line = assert_user_error(*cli("validate", str(path)), *needles)
    assert str(path) in line  # where: the file
    assert "Fix:" in line  # how to fix


def test_yaml_bare_no_means_the_word(write_recipe, sft_recipe):
    """YAML 1.1 reads `save_strategy: no` as False; where the choices are words, the word is meant."""
    sft_recipe["train"].update(save_strategy=False, eval_strategy=False)
    code, out, err = cli("show", str(write_recipe(sft_recipe)))
    assert code == 0, err
    assert "save_strategy: 'no'" in out and "eval_strategy: 'no'" in out
    sft_recipe["train"] = {"optim": True}
    assert_user_error(*cli("validate", str(write_recipe(sft_recipe))), "'train.optim'", "quote the word")


def test_yaml_exponent_string_is_a_float(write_recipe, sft_recipe):
    """PyYAML reads `1e-5` as a string (YAML 1.1); a float field accepts it anyway."""
    text = json.dumps(sft_recipe).replace('"learning_rate": 0.001', '"learning_rate": "1e-5"')
    code, out, err = cli("show", str(write_recipe(text)))
    assert code == 0, err
    assert "learning_rate: 1.0e-05" in out


@pytest.mark.parametrize(
    "content, needles",
    [
        ("", ["is empty"]),
        ("   \n\n", ["is empty"]),
        ("- a\n- b\n", ["must be a YAML mapping", "list"]),
        ("just a string", ["must be a YAML mapping"]),
        ("stage: sft\n  bad: [indent\n", ["is not valid YAML", "line"]),
        (b"\x00\x01\x02binary", ["binary file"]),
        (b"stage: \xff\xfe sft", ["not UTF-8"]),
    ],
    ids=["empty", "blank", "list", "scalar", "syntax", "binary", "not-utf8"],
)
def test_bad_file(tmp_path, content, needles):
    path = tmp_path / "r.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert_user_error(*cli("validate", str(path)), str(path), *needles)


def test_missing_recipe_file(tmp_path):
    assert_user_error(*cli("validate", str(tmp_path / "nope.yaml")), "does not exist")


def test_extends_cycle_and_missing_target(write_recipe, sft_recipe):
    write_recipe({"extends": "b.yaml", "stage": "sft"}, "a.yaml")
    b = write_recipe({"extends": "a.yaml"}, "b.yaml")
    assert_user_error(*cli("validate", str(b)), "'extends' forms a cycle", "a.yaml", "b.yaml")
    c = write_recipe({"extends": "missing.yaml", **sft_recipe}, "c.yaml")
    assert_user_error(*cli("validate", str(c)), "'extends' target 'missing.yaml' does not exist")
    d = write_recipe({"extends": "d.yaml", **sft_recipe}, "d.yaml")
    assert_user_error(*cli("validate", str(d)), "cycle")


@pytest.mark.parametrize(
    "override, needles",
    [
        ("lora.r", ["has no '='", "key.sub=value"]),
        ("model.nmae=x", ["unknown key 'model.nmae'"]),
        ("lora.r=[1,", ["is not valid YAML"]),
        ("lora.r=abc", ["'lora.r' must be int"]),
        ("=3", ["malformed key"]),
        ("model.name_or_path.x=1", ["is a value, not a section"]),
    ],
    ids=["no-equals", "unknown-key", "bad-yaml", "bad-type", "empty-key", "value-not-section"],
)
def test_bad_override(write_recipe, sft_recipe, override, needles):
    assert_user_error(*cli("validate", str(write_recipe(sft_recipe)), override), *needles)


def test_bad_data_rows_found_by_validate(write_recipe, sft_recipe, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": ""}\n')
    sft_recipe["data"] = {"train": str(bad)}
    assert_user_error(*cli("validate", str(write_recipe(sft_recipe))), str(bad), "line 2", "'completion' is empty")


def test_chatglm_checkpoint_names_the_convert_path(write_recipe, sft_recipe, tmp_path):
    fake = tmp_path / "chatglm3"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"model_type": "chatglm", "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"}}))
    sft_recipe["model"]["name_or_path"] = str(fake)
    assert_user_error(*cli("validate", str(write_recipe(sft_recipe))), "ChatGLM2/3 checkpoint", "transformers 5",
                      f"hfalign convert chatglm {fake}", "trust_remote_code: true")
    sft_recipe["model"]["name_or_path"] = "THUDM/chatglm3-6b"  # a hub id says so before anything downloads
    assert_user_error(*cli("validate", str(write_recipe(sft_recipe))), "hfalign convert chatglm THUDM/chatglm3-6b")


def test_the_config_class_judges_at_the_start_of_a_run_and_with_validate_full(write_recipe, sft_recipe):
    """A rule only the config class knows (TrainingArguments.__post_init__: best-model tracking needs evaluation):
    plain `validate` skips it (no torch import); `validate --full` and `train` (before any model loads) refuse."""
    sft_recipe["train"].update(load_best_model_at_end=True, eval_strategy="no")
    path = str(write_recipe(sft_recipe))
    code, out, err = cli("validate", path)
    assert code == 0 and "ok:" in out, err
    for args in (["validate", path, "--full"], ["train", path]):
        assert_user_error(*cli(*args), "SFTConfig rejects these settings", "load_best_model_at_end")
    assert not (Path(sft_recipe["output_dir"]) / "recipe.resolved.yaml").exists()  # nothing written


def test_validate_imports_no_trainer_library(write_recipe, sft_recipe, tmp_path):
    """`hfalign validate` answers without torch/transformers/trl/peft: the config fields come from a cache the first
    run writes (keyed by library versions); the second run imports none of them."""
    code = ("import sys; from hfalign.cli import _run; _run(['validate', sys.argv[1]]); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'trl', 'peft', 'datasets'}))")
    env = {"HFALIGN_CACHE_DIR": str(tmp_path / "cache")}
    ppo = {**sft_recipe, "stage": "ppo", "data": {"train": str(ROOT / "data/ppo_prompts.jsonl")},
           "reward": {"function": "hfalign.demo.task:positivity_reward"}, "train": {"per_device_train_batch_size": 8},
           "callbacks": ["metrics", {"name": "kl_guard", "max_kl": 10}]}
    rm = {**sft_recipe, "stage": "rm", "data": {"train": str(ROOT / "data/rm_train.jsonl")}, "lora": {"enabled": True}}
    for recipe in (write_recipe(sft_recipe), write_recipe(ppo, "ppo.yaml"), write_recipe(rm, "rm.yaml")):
        run([PYTHON, "-c", code, str(recipe)], env=env)  # the first run of a version set reads the classes
        assert run([PYTHON, "-c", code, str(recipe)], env=env).stdout.splitlines()[-1] == "[]", recipe
    assert len(list((tmp_path / "cache").glob("train-fields-*.json"))) == 3  # one per stage


def test_cached_fields_equal_the_classes(tmp_path, monkeypatch):
    """The cache's fields are the classes' init fields; their types give the live types' verdict on every probe value
    (an `Enum | str` field: stricter, only the enum's values, which the class itself would insist on); defaults kept."""
    import dataclasses

    from hfalign import stages, trainfields
    from hfalign.schema import _Mismatch, coerce, field_types

    def accepts(tp, value) -> bool:
        try:
            coerce(value, tp)
            return True
        except _Mismatch:
            return False

    monkeypatch.setenv("HFALIGN_CACHE_DIR", str(tmp_path))
    probes = [1, 1.5, "1e-5", "x", "steps", "cosine", "adamw_torch", True, None, [1], ["tensorboard"], {"a": 1}]
    for name, module in stages.STAGES.items():
        cls, fields = module.config_class(), trainfields.spec(name, module.config_class)
        assert set(fields) == {f.name for f in dataclasses.fields(cls) if f.init}
        live = field_types(cls)
        for key, (tp, _) in fields.items():
            for value in probes:
                cached, real = accepts(tp, value), accepts(live[key], value)
                assert cached == real or (not cached and real and value in ("x", "steps", "cosine", "adamw_torch", "1e-5")), \
                    (name, key, value)
        assert fields["per_device_train_batch_size"][1] == cls.per_device_train_batch_size
        assert not accepts(fields["lr_scheduler_type"][0], "zigzag") and accepts(fields["lr_scheduler_type"][0], "cosine")
    ppo = trainfields.spec("ppo", stages.STAGES["ppo"].config_class)
    assert ppo["num_mini_batches"][1] == 1 and ppo["kl_coef"][1] == 0.2


def test_real_process_exits_2_without_traceback(write_recipe, sft_recipe):
    """The same through a real `python -m hfalign` process (what users and accelerate launch run)."""
    sft_recipe["train"]["learning_rate"] = 0
    proc = run([PYTHON, "-m", "hfalign", "validate", str(write_recipe(sft_recipe))], check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "'train.learning_rate' must be > 0" in proc.stderr


@pytest.fixture
def ppo_recipe(pipeline_free_dirs) -> dict:
    sft, rm = pipeline_free_dirs
    return {"stage": "ppo", "output_dir": str(sft.parent / "ppo"), "model": {"name_or_path": str(sft)},
            "reward": {"model": str(rm)}, "data": {"train": str(ROOT / "data/ppo_prompts.jsonl")},
            "train": {"per_device_train_batch_size": 8, "num_mini_batches": 2}}


@pytest.fixture
def pipeline_free_dirs(tiny_model):
    return tiny_model, tiny_model  # validation loads no model: any model directory stands in for SFT and RM


@pytest.mark.parametrize(
    "mutate, needles",
    [
        (lambda r: r.pop("reward"), ["'reward' section is required for stage ppo"]),
        (lambda r: r["reward"].update(function="hfalign.demo.task:objective"), ["exactly one of 'model', 'url', 'function' or 'sources', got model, function"]),
        (lambda r: r.update(reward={"function": "no_such_pkg.mod:fn"}), ["'reward.function'", "cannot import module"]),
        (lambda r: r.update(reward={"function": "hfalign.demo.task:nope"}), ["has no function 'nope'"]),
        (lambda r: r.update(reward={"function": "not a spec"}), ["expected 'package.module:function'"]),
        (lambda r: r.update(summary={"objective": "hfalign.demo.task:missing"}), ["'summary.objective'", "has no function"]),
        (lambda r: r["reward"].update(model="/no/rm"), ["'reward.model' directory '/no/rm' does not exist"]),
        (lambda r: r["train"].update(kl_estimator="k2"), ["'train.kl_estimator' must be one of 'k1', 'k3'"]),
        (lambda r: r["train"].update(cliprange=-0.1), ["'train.cliprange' must be >= 0"]),
        (lambda r: r["train"].update(response_length=0), ["'train.response_length' must be > 0"]),
        (lambda r: r["train"].update(per_device_train_batch_size=64, num_mini_batches=4),
         ["PPO batch does not fit the data", "120 prompts", "rollout batch of 256"]),
        (lambda r: r.update(callbacks=[{"name": "kl_guard", "max_kl": -1}]), ["kl_guard needs max_kl > 0"]),
        (lambda r: r.update(callbacks=[{"name": "sample_table", "every": 0}]), ["sample_table needs every >= 1"]),
        (lambda r: r["data"].update(train=str(ROOT / "data/rm_train.jsonl"), format="preference"),
         ["data.format 'preference' does not fit stage 'ppo'"]),
        (lambda r: r["data"].update(columns={"prompt": "question"}), ["line 1", "missing column 'question'",
                                                                       "data.columns.prompt"]),
        (lambda r: r.update(lora={"enabled": True}, quantization={"load_in_4bit": True}, value={"shared_base": False}),
         ["critic of its own under quantization", "value.shared_base: true"]),
    ],
    ids=["no-reward", "reward-both", "fn-module", "fn-name", "fn-spec", "summary-fn", "rm-missing", "kl-estimator",
         "cliprange", "response-length", "batch-too-big", "kl-guard", "sample-table", "wrong-format", "bad-rename",
         "qlora-own-critic"],
)
def test_bad_ppo_recipe(write_recipe, ppo_recipe, mutate, needles):
    code, _, err = cli("validate", str(write_recipe(ppo_recipe)))
    assert code == 0, err  # the base recipe is valid
    mutate(ppo_recipe)
    assert_user_error(*cli("validate", str(write_recipe(ppo_recipe))), *needles)


def test_mistyped_command_is_not_taken_for_a_recipe():
    code, _, err = cli("trian", "recipes/sft.yaml")
    assert code == 2 and "invalid choice: 'trian'" in err


def test_python_m_hfalign_recipe_means_train(write_recipe, sft_recipe):
    sft_recipe["train"]["learning_rate"] = 0
    code, _, err = cli(str(write_recipe(sft_recipe)))  # no command: a .yaml path means train (accelerate -m hfalign)
    assert code == 2 and "'train.learning_rate' must be > 0" in err


def test_adapter_on_another_base_is_refused(write_recipe, sft_recipe, tmp_path, tiny_model):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}))
    sft_recipe["model"]["adapter"] = str(adapter)
    assert_user_error(*cli("validate", str(write_recipe(sft_recipe))), "'model.adapter'", "trained on 'meta-llama/Llama-2-7b-hf'")


def test_model_dir_without_config_is_a_clear_error(write_recipe, sft_recipe, tmp_path):
    empty = tmp_path / "empty_model"
    empty.mkdir()  # a directory without config or weights: what a failed download leaves behind
    sft_recipe["model"]["name_or_path"] = str(empty)
    assert_user_error(*cli("validate", str(write_recipe(sft_recipe))), "has no config.json", str(empty))


def test_hub_model_that_cannot_be_had_is_a_clear_error(write_recipe, sft_recipe):
    sft_recipe["model"]["name_or_path"] = "nobody-here/no-such-model"  # offline in tests: cannot be fetched
    assert_user_error(*cli("train", str(write_recipe(sft_recipe))), "could not load the tokenizer",
                      "'nobody-here/no-such-model'")
