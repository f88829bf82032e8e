"""The documentation site builds strict (a broken link, a missing page or an API reference that does not resolve
fails) and its recipe reference covers every key of every stage, generated from the code."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

from helpers import PYTHON, ROOT


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_build_strict_with_every_page_in_the_nav(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([PYTHON, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-3000:]
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    nav = (ROOT / "mkdocs.yml").read_text()
    assert all(page in nav for page in pages), sorted(p for p in pages if p not in nav)  # none orphaned
    built = (tmp_path / "site" / "reference" / "recipe" / "index.html").read_text()
    assert "<code>train.vocab_kl_coef</code>" in built and "<code>model.name_or_path</code>" in built
    assert "PPOTrainer" in (tmp_path / "site" / "api" / "index.html").read_text()  # mkdocstrings resolved it


def test_recipe_reference_covers_every_key_of_every_stage():
    from hfalign.recipe import Recipe
    from hfalign.schema import describe_schema
    from hfalign.stages import STAGES

    page = _hooks().reference()
    keys = set(re.findall(r"^\s*\| (?:\*\*)?`([^`]+)`", page, flags=re.M))
    recipe_keys = {line.split()[0].rstrip(":") for line in describe_schema(Recipe)} - {"train.*"}
    assert recipe_keys <= keys, sorted(recipe_keys - keys)
    for stage in STAGES.values():
        fields = {f"train.{f.name}" for f in dataclasses.fields(stage.config_class()) if f.init}
        assert fields <= keys, sorted(fields - keys)[:10]
    assert len(keys) > 200  # the TrainingArguments fields are in, not only hfalign's own


def test_getting_started_commands_are_real_make_targets():
    """Every `make ...` line of the shell blocks of the README and the docs pages names a target make can plan (a dry
    run: the job itself, sft -> rm -> ppo on the embedded default, is what test_ppo.py's default pipeline runs)."""
    def makes(page: Path) -> list[list[str]]:
        blocks = re.findall(r"```bash\n(.*?)```", page.read_text().replace("\\\n", " "), flags=re.S)
        commands = [ln.split("#")[0].split() for block in blocks for ln in block.splitlines()]
        # RECIPES=my: made by the block before it, which test_first_lora_run_block_runs_as_written runs for real
        return [c for c in commands if c and c[0] == "make" and "RECIPES=my" not in c]

    assert [c[1] for c in makes(ROOT / "docs" / "getting-started.md")][:2] == ["ppo", "test"]
    everywhere = [c for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] for c in makes(page)]
    assert ["make", "rloo"] in everywhere and ["make", "grpo"] in everywhere  # docs/estimators.md
    for command in everywhere:
        proc = subprocess.run(["make", "-n", *command[1:]], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, (command, proc.stderr)


def test_every_metric_a_run_logs_is_in_the_glossary(ppo_run):
    """docs/ppo.md's metrics table names every key a PPO run writes to metrics.jsonl (Trainer's own step/epoch aside)."""
    from helpers import read_jsonl

    logged = set().union(*(row.keys() for row in read_jsonl(ppo_run / "metrics.jsonl", having="objective/kl")))
    page = (ROOT / "docs" / "ppo.md").read_text()
    missing = sorted(k for k in logged - {"step", "epoch"} if f"`{k}`" not in page)
    assert not missing, missing


def test_first_lora_run_block_runs_as_written(tmp_path):
    """getting-started's "Your first LoRA run on a family template", run as a newcomer types it, in a scratch copy of
    the project (its Makefile, pyproject and recipes; the installed .venv): a tiny LLaMA-3-style base, the task as
    conversations, `hfalign new` from recipes/llama3, validate, then sft -> rm -> ppo through make. The runs land
    where make expects them, on the model and data given, and responses end at LLaMA-3's end of turn."""
    import json
    import sys

    import yaml

    page = (ROOT / "docs" / "getting-started.md").read_text()
    block = re.search(r"## Your first LoRA run on a family template.*?```bash\n(.*?)```", page, flags=re.S).group(1)
    work = tmp_path / "hfalign"
    shutil.copytree(ROOT / "recipes", work / "recipes")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(ROOT / name, work / name)
    (work / ".venv").symlink_to(Path(sys.prefix))
    (work / ".installed").touch()  # make's install stamp: newer than pyproject.toml, so make installs nothing here
    env = {**os.environ, "MAKEFLAGS": f"STAMP={work / '.installed'}"}
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=work, capture_output=True, text=True,
                          env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "next: hfalign validate my/sft.yaml   then   make ppo RECIPES=my" in proc.stdout
    assert "ok: my/sft.yaml is a valid sft recipe (output_dir outputs/my/sft)" in proc.stdout
    runs = work / "outputs" / "my"
    assert all((runs / stage / "hfalign_done.json").is_file() for stage in ("sft", "rm", "ppo"))
    ppo = yaml.safe_load((runs / "ppo" / "recipe.resolved.yaml").read_text())
    assert ppo["model"]["name_or_path"] == "models/tiny-llama3" and ppo["model"]["adapter"] == "./outputs/my/sft"
    assert ppo["reward"]["model"] == "./outputs/my/rm" and ppo["lora"]["enabled"]
    assert ppo["train"]["bf16"] and ppo["train"]["activation_checkpointing"]  # the template's, as shipped
    assert ppo["data"]["train"] == "my-data/ppo_prompts.jsonl" and ppo["train"]["response_length"] == 24
    rows = [json.loads(ln) for ln in (runs / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert any(r["ended_with"] == "<|eot_id|>" for r in rows), [r["ended_with"] for r in rows][:10]
    assert (runs / "ppo" / "report.md").is_file()
