"""`hfalign eval` (issue 10, item 2): finished runs measured again, side by side. With a run's own data the numbers
are the ones its stage summary computed; with --data every run is measured on the same file."""

from __future__ import annotations

import json

import pytest
from helpers import ROOT, cli, read_jsonl


def rows_of(tmp_path, *args) -> tuple[list[dict], str]:
    out = tmp_path / "eval.json"
    code, stdout, err = cli("eval", *map(str, args), "--json", str(out))
    assert code == 0, err[-3000:]
    return json.loads(out.read_text()), stdout


def test_eval_repeats_each_stage_summary(pipeline, ppo_run, lora_ppo_run, tmp_path):
    rows, stdout = rows_of(tmp_path, pipeline["rm"], ppo_run, lora_ppo_run)
    assert [(r["run"], r["model"]) for r in rows] == [
        (str(pipeline["rm"]), "reward model"), (str(ppo_run), "reference (SFT)"), (str(ppo_run), "PPO policy"),
        (str(lora_ppo_run), "reference (SFT)"), (str(lora_ppo_run), "PPO policy")]
    rm = json.loads((pipeline["rm"] / "hfalign_done.json").read_text())
    assert rows[0]["accuracy"] == rm["eval_accuracy"] and rows[0]["pairs"] == len(read_jsonl(ROOT / "data/rm_eval.jsonl"))
    assert rows[0]["margin"] == pytest.approx(rm["eval_margin"], abs=1e-4)
    assert rows[0]["loss"] == pytest.approx(rm["eval_loss"], abs=1e-4)
    for run, (ref, policy) in ((ppo_run, rows[1:3]), (lora_ppo_run, rows[3:5])):
        summary = json.loads((run / "summary.json").read_text())
        for row, want in ((ref, summary["before (reference)"]), (policy, summary["after (policy)"])):
            assert row["prompts"] == want["prompts"] == 8
            for key in ("objective", "well_formed", "eos_rate", "mean_chars"):
                assert row[key] == want[key], (run, row["model"], key)
            for key in ("score", "kl"):
                assert row[key] == pytest.approx(want[key], abs=1e-4), (run, row["model"], key)
            assert row["examples"] == want["examples"]
        assert policy["kl"] != 0 and ref["kl"] == 0  # the trained policy was loaded, not the SFT model again
    assert "PPO policy" in stdout and "accuracy" in stdout and "margin" in stdout


def test_eval_on_one_file_and_more_prompts(pipeline, ppo_run, tmp_path):
    pairs = read_jsonl(ROOT / "data/rm_eval.jsonl")[:20]
    flipped = tmp_path / "flipped.jsonl"  # chosen and rejected swapped: a good reward model now scores ~0 accuracy
    flipped.write_text("".join(json.dumps({**p, "chosen": p["rejected"], "rejected": p["chosen"]}) + "\n"
                               for p in pairs))
    rows, _ = rows_of(tmp_path, pipeline["rm"], "--data", flipped)
    assert rows[0]["pairs"] == 20 and rows[0]["accuracy"] <= 0.1 and rows[0]["margin"] < 0
    rows, _ = rows_of(tmp_path, ppo_run, "--prompts", "12")
    assert [r["prompts"] for r in rows] == [12, 12]


@pytest.mark.parametrize("case", ["sft run", "not a run", "missing data", "bad rows"])
def test_eval_refuses(case, pipeline, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"}\n')
    args = {"sft run": [pipeline["sft"]], "not a run": [tmp_path], "missing data": [pipeline["rm"], "--data", "nope.jsonl"],
            "bad rows": [pipeline["rm"], "--data", bad]}[case]
    code, _, err = cli("eval", *map(str, args))
    want = {"sft run": "is a sft run", "not a run": "not a finished hfalign run", "missing data": "does not exist",
            "bad rows": "rejected"}[case]
    assert code == 2 and want in err and "Traceback" not in err, err
