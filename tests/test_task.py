"""The embedded default task: deterministic data, and a rule that scores what it claims to."""

from __future__ import annotations

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
