"""Plots and report per run (issue 10, item 1): every stage ends with PNG curves under RUN_DIR/plots/ and a
report.md that embeds them and repeats the run's own numbers; `hfalign plot` draws them again, or overlays runs."""

from __future__ import annotations

import json

from helpers import cli, read_jsonl

PNG = b"\x89PNG\r\n\x1a\n"


def pngs(run) -> dict:
    files = {p.stem: p for p in (run / "plots").glob("*.png")}
    assert files and all(p.read_bytes()[:8] == PNG and p.stat().st_size > 5000 for p in files.values())
    return files


def test_sft_and_rm_runs_end_with_plots_and_report(pipeline):
    assert {"loss", "token_accuracy", "learning_rate"} <= set(pngs(pipeline["sft"]))
    assert {"loss", "accuracy", "margin"} <= set(pngs(pipeline["rm"]))
    for stage in ("sft", "rm"):
        report = (pipeline[stage] / "report.md").read_text()
        assert all(f"](plots/{p.name})" in report for p in pngs(pipeline[stage]).values())
        assert f"# hfalign {stage} run" in report and "## Recipe (resolved)" in report and '"torch"' in report
    last_eval = read_jsonl(pipeline["rm"] / "metrics.jsonl", having="eval_accuracy")[-1]["eval_accuracy"]
    assert f"| eval_accuracy | {last_eval:.4g} |" in (pipeline["rm"] / "report.md").read_text()


def test_ppo_run_ends_with_curves_before_after_and_samples(ppo_run):
    out = ppo_run
    assert f"hfalign: report {out / 'report.md'}" in (out.parent / "ppo.stdout").read_text()
    assert {"score", "kl", "kl_coef", "rlhf_reward", "losses", "clipfrac", "approxkl", "entropy", "response_length",
            "explained_variance"} <= set(pngs(out))
    report = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["before (reference)"], summary["after (policy)"]
    assert f"| objective | {before['objective']:.4g} | {after['objective']:.4g} |" in report
    sample = read_jsonl(out / "samples.jsonl")[0]
    assert sample["completion"].strip()[:20] in report and "| ended with |" in report


def test_plot_command_redraws_and_overlays(pipeline, tmp_path):
    for p in (pipeline["sft"] / "plots").glob("*.png"):
        p.unlink()
    code, _, err = cli("plot", str(pipeline["sft"]))
    assert code == 0, err
    assert "loss" in pngs(pipeline["sft"])
    code, _, err = cli("plot", str(pipeline["sft"]), str(pipeline["sft"]), "--out", str(tmp_path / "both"))
    assert code == 0 and (tmp_path / "both" / "loss.png").read_bytes()[:8] == PNG
    code, _, err = cli("plot", str(pipeline["sft"]), str(pipeline["rm"]), "--out", str(tmp_path / "mixed"))
    assert code == 2 and "different stages" in err
    code, _, err = cli("plot", str(tmp_path))
    assert code == 2 and "not an hfalign run directory" in err
