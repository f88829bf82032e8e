"""The demo tasks (the embedded default, lists, slots): deterministic data, and rules that score what they claim to."""

from __future__ import annotations

import pytest
from helpers import ROOT, read_jsonl

from hfalign.demo import task


def test_shipped_data_is_what_the_generator_writes(tmp_path):
    for path in task.write_data(tmp_path):
        assert path.read_text() == (ROOT / "data" / path.name).read_text(), f"data/{path.name} is stale: run make data"


def test_rule_scores():
    assert task.positivity(" the plot was great. the music felt dull.") == 0
    assert task.positivity(" the plot was great. the music felt superb.") == 1
    assert task.well_formed(" the plot was great. the music felt dull.")
    assert not task.well_formed(" the plot was great. the music felt")
    assert not task.well_formed(" great great great great")
    assert task.objective(" great great great great") == -1.0
    assert task.positivity_reward(["p"], [" the acting is wonderful."]) == [1.0]


def test_preferences_agree_with_the_rule():
    rows = read_jsonl(ROOT / "data/rm_train.jsonl")
    assert all(task.objective(r["chosen"]) > task.objective(r["rejected"]) for r in rows)
    eval_titles = set(task.titles("eval"))
    assert not any(r["prompt"][len("Write a review of "):-1] in eval_titles for r in rows)


def test_lists_rule_and_preferences():
    from hfalign.demo import lists

    p = "Name some fruits for the red door."
    assert lists.objective(" apple, pear, saw.", p) == pytest.approx(2 / 3)
    assert lists.objective(" apple, apple.", p) == -1.0  # a repeat is malformed
    assert lists.objective(" apple, pear, plum, grape, lemon, mango.", p) == -1.0  # more than 5 items
    assert not lists.well_formed(" apple, pear") and lists.well_formed(" apple, pear.")
    data = lists.generate(0)
    sft = [lists.objective(r["completion"], r["prompt"]) for r in data["sft_train"]]
    assert 0.4 < sum(sft) / len(sft) < 0.6  # the SFT policy starts half right
    for r in data["rm_train"]:
        a, b = (lists.objective(r[k], r["prompt"]) for k in ("chosen", "rejected"))
        assert a > b or (a == b and len(lists.items(r["chosen"])) > len(lists.items(r["rejected"])))  # length bias


def test_slots_rule_and_preferences():
    from hfalign.demo import slots

    assert slots.objective(" meeting on tue at 10:30.") == 1.0
    assert slots.objective(" meeting on sat at 10:30.") == pytest.approx(2 / 3)
    assert slots.objective(" meeting on sat at 7:05.") == 0.0  # well-formed, every slot wrong
    assert slots.objective(" meeting on tue 10:30.") == -1.0
    data = slots.generate(0)
    sft = [slots.objective(r["completion"]) for r in data["sft_train"]]
    assert 0.4 < sum(sft) / len(sft) < 0.6
    assert all(slots.objective(r["chosen"]) > slots.objective(r["rejected"]) for r in data["rm_train"])
    assert not {r["prompt"] for r in data["ppo_eval_prompts"]} & {r["prompt"] for r in data["ppo_prompts"]}
