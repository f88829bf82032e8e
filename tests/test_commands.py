"""`hfalign generate` and `hfalign launch` (issue 10, items 4 and 5)."""

from __future__ import annotations

from helpers import PYTHON, ROOT, cli, run

from hfalign.demo.task import well_formed


def test_generate_samples_from_full_and_lora_runs(pipeline, lora_pipeline):
    prompts = ["Write a review of the red door.", "Write a review of the blue river."]
    code, out, err = cli("generate", str(pipeline["sft"]), *prompts, "--seed", "1")
    assert code == 0, err
    answers = [line.split("-> ", 1)[1] for line in out.splitlines() if "-> " in line]
    assert len(answers) == 2 and all(well_formed(a) for a in answers), answers  # trained on plain prompts: no template
    code, again, _ = cli("generate", str(pipeline["sft"]), *prompts, "--seed", "1")
    assert again == out  # seeded
    code, out, err = cli("generate", str(lora_pipeline["sft"]), prompts[0], "--max-new-tokens", "8")
    assert code == 0 and "-> " in out, err  # base + the run's adapter
    code, _, err = cli("generate", str(pipeline["rm"]), prompts[0])
    assert code == 2 and "only SFT and PPO runs generate" in err


def test_launch_checks_before_any_process_starts(pipeline, tmp_path):
    """Mistakes are one line and exit 2 from a real process, not accelerate's ChildFailedError traceback."""
    done = run([PYTHON, "-m", "hfalign", "launch", "--num_processes", "2", str(ROOT / "recipes/sft.yaml"),
                f"output_dir={pipeline['sft']}", f"model.name_or_path={pipeline['base']}",
                f"data.train={ROOT / 'data/sft_train.jsonl'}", f"data.eval={ROOT / 'data/sft_eval.jsonl'}"], check=False)
    bad = run([PYTHON, "-m", "hfalign", "launch", str(ROOT / "recipes/sft.yaml"), f"model.name_or_path={pipeline['base']}",
               "train.learning_rat=1"], check=False)
    for proc, says in ((done, "already holds a finished sft run"), (bad, "train.learning_rat")):
        assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


def test_launch_runs_accelerate_with_the_recipe(tiny_model, tmp_path):
    out = tmp_path / "sft"
    proc = run([PYTHON, "-m", "hfalign", "launch", "--num_processes", "1", str(ROOT / "recipes/sft.yaml"),
                f"output_dir={out}", f"model.name_or_path={tiny_model}", f"data.train={ROOT / 'data/sft_train.jsonl'}",
                f"data.eval={ROOT / 'data/sft_eval.jsonl'}", "data.max_rows=64", "train.max_steps=2",
                "train.save_steps=2", "train.eval_strategy=no"])
    assert "accelerate.commands.launch --num_processes 1 -m hfalign" in proc.stdout
    assert (out / "hfalign_done.json").is_file()


def test_new_rewrites_a_template_and_refuses_what_it_cannot_do(tmp_path, monkeypatch):
    """`hfalign new`: every run path of recipes/lora (incl. its -qlora variant) moves to outputs/<name>, `extends:`
    still reaches the embedded default's files, comments stay; the mistakes are one line, exit 2, nothing written."""
    import yaml

    from hfalign.demo import write_data

    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    write_data("reviews", "mine", chat=True)
    code, out, err = cli("new", "mine-recipes", "--from", "recipes/lora", "--model", "some/base", "--data", "mine")
    assert code == 0, err
    assert "next: hfalign validate mine-recipes/sft.yaml" in out
    texts = {p.name: p.read_text() for p in (tmp_path / "mine-recipes").glob("*.yaml")}
    assert set(texts) == {p.name for p in (ROOT / "recipes/lora").glob("*.yaml")}
    assert "outputs/lora" not in "".join(texts.values())
    ppo, qlora = yaml.safe_load(texts["ppo.yaml"]), yaml.safe_load(texts["ppo-qlora.yaml"])
    assert ppo["output_dir"] == "outputs/mine-recipes/ppo" and ppo["model"]["adapter"] == "./outputs/mine-recipes/sft"
    assert ppo["reward"]["model"] == "./outputs/mine-recipes/rm" and qlora["output_dir"] == "outputs/mine-recipes-qlora/ppo"
    assert ppo["extends"] == "../recipes/ppo.yaml" and (tmp_path / "mine-recipes" / ppo["extends"]).is_file()
    assert ppo["data"] == {"train": "mine/ppo_prompts.jsonl", "eval": "mine/ppo_eval_prompts.jsonl"}
    assert yaml.safe_load(texts["sft.yaml"])["model"]["name_or_path"] == "some/base"
    assert texts["sft.yaml"].startswith("# LoRA SFT of the embedded default")  # comments kept
    for args, message in ((["mine-recipes", "--from", "recipes/lora"], "exists and is not empty"),
                          (["other", "--from", "nowhere"], "holds no recipes"),
                          (["other", "--from", "recipes/lora", "--data", "recipes"], "holds none of sft_train.jsonl")):
        code, _, err = cli("new", *args)
        assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "other").exists()
    rows = (tmp_path / "mine" / "sft_train.jsonl").read_text().splitlines()
    assert yaml.safe_load(rows[0])["messages"][1]["role"] == "assistant"  # make-data --chat
