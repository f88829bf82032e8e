"""A quiet console (issue 10, item 6): a real `python -m hfalign` run prints hfalign's lines, not the libraries'
import-time notices, progress bars and known deprecation chatter; a warning hfalign does not know stays."""

from __future__ import annotations

from helpers import PYTHON, ROOT, run

NOISE = ("Writing model shards", "Loading weights", "gemm_4bit_forward", "pin_memory", "Setting accelerator to CPU",
         "gradient_checkpointing` is deprecated", "Tokenizing train dataset", "mtime may not be reliable")


def test_a_run_prints_no_library_noise(tiny_model, tmp_path):
    proc = run([PYTHON, "-m", "hfalign", "train", str(ROOT / "recipes/sft.yaml"), f"output_dir={tmp_path / 'sft'}",
                f"model.name_or_path={tiny_model}", f"data.train={ROOT / 'data/sft_train.jsonl'}",
                f"data.eval={ROOT / 'data/sft_eval.jsonl'}", "data.max_rows=64", "train.max_steps=4",
                "train.logging_steps=2", "train.eval_strategy=steps", "train.eval_steps=4", "train.save_steps=4"])
    console = proc.stdout + proc.stderr
    assert f"hfalign sft | recipe {ROOT / 'recipes/sft.yaml'} | model {tiny_model} (full, " in console  # the header
    assert "| data 64 train + 200 eval rows | batch " in console and f"-> {tmp_path / 'sft'}" in console
    assert "[step 4/4 100% eta 0s]" in console and "[step 2/4 50% eta " in console  # hfalign's own line per log
    assert [n for n in NOISE if n in console] == []
    # the reward model starts from that causal LM: a new head is expected, so no load report about it
    proc = run([PYTHON, "-m", "hfalign", "train", str(ROOT / "recipes/rm.yaml"), f"output_dir={tmp_path / 'rm'}",
                f"model.name_or_path={tmp_path / 'sft'}", f"data.train={ROOT / 'data/rm_train.jsonl'}",
                f"data.eval={ROOT / 'data/rm_eval.jsonl'}", "data.max_rows=64", "train.max_steps=2",
                "train.eval_strategy=no", "train.save_steps=2"])
    console = proc.stdout + proc.stderr
    assert "[step 2/2 100% eta 0s]" in console and "LOAD REPORT" not in console
    assert [n for n in NOISE if n in console] == []


def test_a_ppo_run_prints_no_library_noise(pipeline, tmp_path):
    """The PPO stage too (DeepSpeed import, bitsandbytes, the Trainer's saves): header, plan, one line per update."""
    proc = run([PYTHON, "-m", "hfalign", "train", str(ROOT / "recipes/ppo.yaml"), f"output_dir={tmp_path / 'ppo'}",
                f"model.name_or_path={pipeline['sft']}", f"reward.model={pipeline['rm']}",
                f"data.train={ROOT / 'data/ppo_prompts.jsonl'}", f"data.eval={ROOT / 'data/ppo_eval_prompts.jsonl'}",
                "train.total_episodes=96", "train.num_eval_prompts=8", "train.save_steps=1", "train.save_total_limit=1"])
    console = proc.stdout + proc.stderr  # (saving every update with a limit of 1: checkpoint rotation runs too)
    assert "hfalign ppo | recipe " in console and "hfalign ppo plan: " in console and "[step 3/3 100% eta 0s]" in console
    assert "hfalign ppo summary" in console and "hfalign: report " in console
    assert [n for n in NOISE if n in console] == []


def test_unknown_warnings_still_show():
    code = ("import warnings; from hfalign.console import quiet; quiet(); "
            "warnings.warn('a real problem'); warnings.warn(\"'pin_memory' argument is set as true but no accelerator is found\")")
    proc = run([PYTHON, "-c", code])
    assert "a real problem" in proc.stderr and "pin_memory" not in proc.stderr


def test_a_terminal_gets_one_progress_bar_with_an_eta(tmp_path):
    import io

    from transformers import TrainerControl, TrainerState

    from hfalign.callback_types import MetricsCallback

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    cb, state = MetricsCallback(str(tmp_path), stream=out, keys=["loss"]), TrainerState(max_steps=8)
    state.is_world_process_zero = True
    cb.on_train_begin(None, state, TrainerControl())
    for step in (2, 4):
        state.global_step = step
        cb.on_log(None, state, TrainerControl(), logs={"loss": 1.0 / step, "lr": 0.1})
    cb.on_train_end(None, state, TrainerControl())
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1  # rewritten in place, then closed
    assert "[############............] step 4/8 50% eta " in text and "loss 0.25" in text and "lr" not in text
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # every log still in metrics.jsonl
