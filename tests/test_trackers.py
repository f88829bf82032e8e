"""Trackers (issue 10, item 7): `report_to: [tensorboard, trackio]` on a real PPO run. The metrics reach both, and
the sample table reaches both as a table (TensorBoard: markdown under `samples`; Trackio: a trackio.Table)."""

from __future__ import annotations

import pytest
from helpers import ppo_args, read_jsonl, train_shipped


def test_ppo_reports_metrics_and_the_sample_table_to_tensorboard_and_trackio(pipeline, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    trackio = pytest.importorskip("trackio")  # optional extra (pip install 'hfalign[trackio]'); the dev extra has it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    out = tmp_path / "ppo"
    code, _, err = train_shipped("ppo.yaml", *ppo_args(pipeline, out, "train.total_episodes=48",
                                                        "train.report_to=[tensorboard, trackio]",
                                                        "train.project=hfalign-test", "train.run_name=r1"))
    assert code == 0, err[-3000:]
    first = read_jsonl(out / "samples.jsonl")[0]

    events = EventAccumulator(str(next((out / "runs").iterdir())), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    logged = read_jsonl(out / "metrics.jsonl", having="objective/scores")
    assert [e.value for e in events.Scalars("train/objective/scores")] == pytest.approx(
        [r["objective/scores"] for r in logged], rel=1e-5) and len(logged) >= 2  # every update's metrics
    text = events.Tensors("samples/text_summary")[0]
    table = text.tensor_proto.string_val[0].decode()
    assert text.step == 1 and "| prompt | completion | score | ended_with |" in table
    assert first["completion"].strip()[:20] in table

    logs = trackio.SQLiteStorage.get_logs("hfalign-test", "r1")
    assert [row["train/objective/scores"] for row in logs if "train/objective/scores" in row]  # metrics arrived
    tables = [row["samples"] for row in logs if "samples" in row]
    assert tables and tables[0]["_type"] == "trackio.table"
    assert first["completion"].strip()[:20] in str(tables[0])
