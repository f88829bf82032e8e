"""What a finished run leaves to read: PNG curves under RUN_DIR/plots/ and RUN_DIR/report.md.

    hfalign plot RUN_DIR                      the plots (and report) of one run, again
    hfalign plot RUN_DIR RUN_DIR ... --out D  several runs overlaid, one line each

Curves come from metrics.jsonl (every logged dict). Each panel draws the raw values thin and an exponential moving
average over them; a metric a run never logged is left out. matplotlib draws with its non-GUI backend (Agg).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

# stage: [(file name, title, [metric keys drawn on the panel])]; eval_* keys are drawn as points
PANELS = {
    "sft": [("loss", "loss", ["loss", "eval_loss"]),
            ("token_accuracy", "token accuracy", ["mean_token_accuracy", "eval_mean_token_accuracy"]),
            ("learning_rate", "learning rate", ["learning_rate"])],
    "rm": [("loss", "loss", ["loss", "eval_loss"]),
           ("accuracy", "accuracy (chosen scored above rejected)", ["accuracy", "eval_accuracy"]),
           ("margin", "margin (chosen - rejected score)", ["margin", "eval_margin"]),
           ("learning_rate", "learning rate", ["learning_rate"])],
    "ppo": [("score", "reward score", ["objective/scores"]),
            ("kl", "KL to the reference (nats per response)", ["objective/kl"]),
            ("kl_coef", "KL coefficient (beta)", ["objective/kl_coef"]),
            ("rlhf_reward", "RLHF reward (score - beta * KL)", ["objective/rlhf_reward"]),
            ("losses", "policy, value and KL loss", ["loss/policy_avg", "loss/value_avg", "loss/kl_avg"]),
            ("clipfrac", "clip fraction", ["policy/clipfrac_avg", "val/clipfrac_avg"]),
            ("approxkl", "approx-KL per update", ["policy/approxkl_avg"]),
            ("entropy", "policy entropy (per token)", ["policy/entropy_avg"]),
            ("response_length", "response length (tokens)", ["val/response_length"]),
            ("explained_variance", "value explained variance", ["val/explained_variance"])],
}
SMOOTHING = 0.8  # EMA weight of the past
SMOOTH_FROM = 30  # points a curve needs before it is smoothed


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut off by a crash
            continue
    return rows


def stage_of(run: Path) -> str:
    from hfalign.rundir import read_run

    return read_run(run)["stage"]


def ema(values: list[float], weight: float = SMOOTHING) -> list[float]:
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], float(r[key])) for r in rows if key in r and "step" in r and r[key] is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot(runs: list[Path], out: Path) -> list[Path]:
    """One PNG per panel of the runs' stage; several runs overlay (they must be of one stage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = {stage_of(r) for r in runs}
    if len(stages) > 1:
        from hfalign.errors import UserError

        raise UserError(f"runs of different stages ({', '.join(sorted(stages))}) cannot share plots.",
                        fix="plot runs of one stage together")
    stage, data = stages.pop(), {r: read_jsonl(r / "metrics.jsonl") for r in runs}
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, title, keys in PANELS[stage]:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        drawn = False
        for run, rows in data.items():
            for key in keys:
                x, y = series(rows, key)
                if not x:
                    continue
                label = key if len(runs) == 1 else f"{run}: {key}"  # the path as given: runs are often all .../ppo
                if key.startswith("eval_") or len(x) < SMOOTH_FROM:  # few points: smoothing would only lag
                    ax.plot(x, y, "o-" if key.startswith("eval_") else "-", ms=3, lw=1.4, label=label)
                else:
                    line, = ax.plot(x, y, lw=0.6, alpha=0.35)
                    ax.plot(x, ema(y), lw=1.6, color=line.get_color(), label=label)
                drawn = True
        if drawn:
            ax.set(title=title, xlabel="update" if stage == "ppo" else "step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / f"{name}.png"
            fig.savefig(path, dpi=100)
            written.append(path)
        plt.close(fig)
    return written


def _hardware() -> str:
    import torch

    gpu = f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}{gpu}"


def _final_metrics(rows: list[dict]) -> dict:
    final = {}
    for r in rows:
        final.update({k: v for k, v in r.items() if isinstance(v, (int, float))})
    return final


def write_report(run: Path) -> Path:
    """RUN_DIR/report.md: recipe, versions, hardware, timings, final metrics, the PPO before/after table and sample
    completions, the plots embedded (drawn now)."""
    stage, rows = stage_of(run), read_jsonl(run / "metrics.jsonl")
    plots = plot([run], run / "plots")
    done = json.loads((run / "hfalign_done.json").read_text()) if (run / "hfalign_done.json").is_file() else {}
    versions = json.loads((run / "versions.json").read_text()) if (run / "versions.json").is_file() else {}
    final = _final_metrics(rows)
    lines = [f"# hfalign {stage} run: {run.name}", "",
             f"Finished {done.get('finished', '(not finished)')}. Hardware: {_hardware()}.", ""]
    timing = {k: final[k] for k in ("train_runtime", "timing/generate", "timing/score", "timing/update", "eps")
              if k in final}
    if timing:
        lines += ["Timings (last logged): " + ", ".join(f"{k} {v:.4g}" for k, v in timing.items()), ""]
    lines += ["## Final metrics", "", "| metric | value |", "|---|---|"]
    shown = [k for k in final if k not in ("step", "epoch") and not k.startswith("timing/")]
    lines += [f"| {k} | {final[k]:.4g} |" for k in shown]
    if "before (reference)" in done:
        before, after = done["before (reference)"], done["after (policy)"]
        keys = [k for k in before if isinstance(before[k], (int, float)) and k in after]
        lines += ["", f"## Before / after on {before.get('prompts', '?')} held-out completions", "",
                  "| | SFT (reference) | PPO |", "|---|---|---|"]
        lines += [f"| {k} | {before[k]:.4g} | {after[k]:.4g} |" for k in keys if k != "prompts"]
        samples = read_jsonl(run / "samples.jsonl")
        if samples:
            last = max(s["update"] for s in samples)
            lines += ["", f"## Sample completions (update {last})", "", "| prompt | completion | score | ended with |",
                      "|---|---|---|---|"]
            lines += [f"| {_cell(s['prompt'])} | {_cell(s['completion'])} | {s['score']:.3g} | "
                      f"{_cell(s.get('ended_with') or 'cut at length')} |" for s in samples if s["update"] == last]
    if plots:
        lines += ["", "## Curves", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    lines += ["", "## Recipe (resolved)", "", "```yaml", (run / "recipe.resolved.yaml").read_text().rstrip(), "```",
              "", "## Versions", "", "```json", json.dumps(versions, indent=2), "```", ""]
    path = run / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
