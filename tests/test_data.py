"""Data formats, file types, renames, eval splits, and row errors that name the file and the line or row."""

from __future__ import annotations

import json

import pytest

from hfalign import data
from hfalign.errors import UserError
from hfalign.recipe import DataSection
from hfalign.stages import STAGES


def load(section, stage):
    return data.load(section, stage, STAGES[stage].FORMATS)


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


MSGS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize(
    "rows, stage, fmt, columns",
    [
        ([{"messages": MSGS, "extra": 1}], "sft", "messages", ["messages"]),
        ([{"prompt": "p", "completion": "c"}], "sft", "prompt_completion", ["prompt", "completion"]),
        ([{"prompt": MSGS[:1], "completion": MSGS[1:]}], "sft", "prompt_completion", ["prompt", "completion"]),
        ([{"text": "some text"}], "sft", "text", ["text"]),
        ([{"prompt": "p", "chosen": "a", "rejected": "b"}], "rm", "preference", ["prompt", "chosen", "rejected"]),
        ([{"chosen": "a", "rejected": "b"}], "rm", "preference", ["chosen", "rejected"]),
        ([{"chosen": MSGS, "rejected": MSGS}], "rm", "preference", ["chosen", "rejected"]),
        ([{"prompt": "p"}], "ppo", "prompt", ["prompt"]),
        ([{"prompt": MSGS[:1]}], "ppo", "prompt", ["prompt"]),
    ],
    ids=["messages", "prompt-completion", "prompt-completion-conv", "text", "pref-prompt", "pref-plain", "pref-conv",
         "prompt", "prompt-conv"],
)
def test_formats_detected_and_columns_kept(tmp_path, rows, stage, fmt, columns):
    section = DataSection(train=jsonl(tmp_path / "d.jsonl", rows * 3))
    train, evalset = load(section, stage)
    assert sorted(train.column_names) == sorted(columns)
    assert len(train) == 3 and evalset is None
    assert data.check_rows(data.read_rows(section.train, "train", None), section, stage, STAGES[stage].FORMATS,
                           section.train)[1] == fmt


def test_file_types_agree(tmp_path):
    import datasets

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    src = datasets.Dataset.from_list(rows)
    paths = [jsonl(tmp_path / "d.jsonl", rows), str(tmp_path / "d.json"), str(tmp_path / "d.csv"), str(tmp_path / "d.parquet")]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    src.to_csv(paths[2], index=False)
    src.to_parquet(paths[3])
    loaded = [load(DataSection(train=p), "sft")[0].to_list() for p in paths]
    assert all(x == rows for x in loaded)


def test_renames_and_eval_fraction(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(20)]
    section = DataSection(train=jsonl(tmp_path / "d.jsonl", rows), columns={"prompt": "question", "completion": "answer"},
                          eval_fraction=0.25)
    train, evalset = load(section, "sft")
    assert len(train) == 15 and len(evalset) == 5
    assert set(train.column_names) == {"prompt", "completion"}
    assert {r["prompt"] for r in train} | {r["prompt"] for r in evalset} == {f"q{i}" for i in range(20)}


@pytest.mark.parametrize(
    "lines, stage, needles",
    [
        (['{"prompt": "a", "completion": "b"}', "{not json"], "sft", ["line 2", "not valid JSON"]),
        (['{"prompt": "a", "completion": "b"}', '{"prompt": "a"}'], "sft", ["line 2", "missing column 'completion'"]),
        (['{"prompt": "a", "completion": 3}'], "sft", ["line 1", "'completion' must be text", "int"]),
        (['{"text": "ok"}', '{"text": "  "}'], "sft", ["line 2", "'text' is empty"]),
        (['{"foo": 1}'], "sft", ["line 1", "columns [foo]", "data.columns"]),
        (['[1, 2]'], "sft", ["line 1", "must be a JSON object"]),
        (['{"messages": [{"role": "robot", "content": "x"}]}'], "sft", ["line 1", "messages[0]"]),
        (['{"chosen": "a"}'], "rm", ["line 1", "chosen+rejected"]),
        (['{"prompt": "p", "chosen": "a", "rejected": "b"}', '{"chosen": "a", "rejected": "b"}'], "rm", ["some rows have 'prompt'"]),
    ],
    ids=["bad-json", "missing-col", "wrong-type", "empty", "unknown-cols", "not-object", "bad-role", "pref-missing", "mixed-prompt"],
)
def test_row_errors_name_file_and_line(tmp_path, lines, stage, needles):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as e:
        load(DataSection(train=str(path)), stage)
    msg = e.value.format()
    assert str(path) in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_csv_and_json_rows_are_located(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,completion\na,b\nc,\n")
    with pytest.raises(UserError, match="line 3"):  # header is line 1
        load(DataSection(train=str(tmp_path / "d.csv")), "sft")
    (tmp_path / "d.json").write_text(json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": "a"}]))
    with pytest.raises(UserError, match="row 1"):
        load(DataSection(train=str(tmp_path / "d.json")), "sft")


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(UserError, match="could not load hub dataset 'nobody/nothing'"):
        load(DataSection(train="nobody/nothing"), "sft")
