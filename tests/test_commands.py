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
