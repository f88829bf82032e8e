"""Recipe loading: extends chains with deep merge, dotted overrides, resolved output, every shipped recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import ROOT, cli, shipped

from hfalign import preflight, recipe


def test_extends_chain_deep_merges(write_recipe, sft_recipe):
    write_recipe(sft_recipe, "base.yaml")
    write_recipe({"extends": "base.yaml", "lora": {"enabled": True, "r": 4}, "train": {"learning_rate": 5e-4}}, "mid.yaml")
    leaf = write_recipe({"extends": "mid.yaml", "lora": {"r": 8}}, "leaf.yaml")
    r = recipe.load(leaf)
    assert r.lora.enabled is True and r.lora.r == 8  # merged from two parents, leaf wins
    assert r.train["learning_rate"] == 5e-4
    assert r.train["num_train_epochs"] == 1  # kept from the base: deep, not shallow, merge
    assert r.model.name_or_path == sft_recipe["model"]["name_or_path"]


def test_extends_relative_to_recipe_not_cwd(tmp_path, sft_recipe, monkeypatch):
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "base.yaml").write_text(yaml.safe_dump(sft_recipe))
    (sub / "leaf.yaml").write_text("extends: base.yaml\nlora: {enabled: true}\n")
    monkeypatch.chdir(ROOT)
    assert recipe.load(sub / "leaf.yaml").lora.enabled


def test_overrides_parse_yaml_values(write_recipe, sft_recipe):
    r = recipe.load(write_recipe(sft_recipe), ["lora.enabled=true", "lora.r=4", "lora.target_modules=[q_proj,v_proj]",
                                               "train.learning_rate=2e-4", "data.columns={prompt: question}"])
    assert r.lora.enabled is True and r.lora.r == 4 and r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.data.columns == {"prompt": "question"}
    assert r.train["learning_rate"] == "2e-4"  # the schema leaves train: to the stage's config class, which types it
    r = preflight.check(recipe.load(write_recipe(sft_recipe), ["train.learning_rate=2e-4"])).recipe
    assert r.train["learning_rate"] == pytest.approx(2e-4)


def test_show_prints_resolved_recipe(write_recipe, sft_recipe):
    code, out, err = cli("show", str(write_recipe(sft_recipe)), "lora.r=12")
    assert code == 0, err
    shown = yaml.safe_load(out)
    assert shown["lora"]["r"] == 12 and shown["stage"] == "sft"
    assert shown["quantization"]["load_in_4bit"] is False  # defaults are filled in
    assert "extends" not in shown


def test_schema_documents_every_section():
    code, out, _ = cli("schema")
    assert code == 0
    for key in ("model.name_or_path", "lora.target_modules", "quantization.load_in_4bit", "data.columns", "reward.function"):
        assert key in out


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path: Path, tiny_model, tmp_path):
    """Templates must not rot: each loads and validates (model dirs pointed at a freshly built tiny model)."""
    tree = recipe.load_tree(path)
    overrides = [f"model.name_or_path={tiny_model}", f"output_dir={tmp_path / 'out'}"]
    if tree.get("model", {}).get("adapter"):
        overrides.append("model.adapter=null")
    reward = tree.get("reward") or {}
    if reward.get("model"):
        overrides.append(f"reward.model={tiny_model}")
    if (tree.get("value") or {}).get("model"):
        overrides.append(f"value.model={tiny_model}")
    code, _out, err = cli("validate", *shipped(str(path.relative_to(ROOT / "recipes"))), *overrides)
    assert code == 0, err
