"""The structure the issues build on: the stage registry and its contract, the family table, layering rules."""

from __future__ import annotations

import pytest
import torch
from helpers import cli

from hfalign import models
from hfalign.stages import STAGES


def test_every_stage_declares_its_contract():
    from hfalign.data import FORMATS

    assert set(STAGES) == {"sft", "rm", "ppo"}
    for name, stage in STAGES.items():
        assert stage.FORMATS and set(stage.FORMATS) <= set(FORMATS), name
        assert callable(stage.check) and callable(stage.trainer), name
        assert stage.config_class().__name__ in ("SFTConfig", "RewardConfig", "PPOConfig"), name


def test_a_stage_outside_the_registry_is_a_clear_error(write_recipe, sft_recipe):
    sft_recipe["stage"] = "dpo"
    code, _, err = cli("validate", str(write_recipe(sft_recipe)))
    assert code == 2 and "'stage' must be one of sft, rm, ppo, got 'dpo'" in err


def test_recipe_module_imports_no_stage_and_nothing_of_ppo():
    """The schema sits at the bottom of the layers: no import in recipe.py (at module level or inside a function)
    reaches a stage, PPO or the trainer-config builder."""
    import ast

    from helpers import ROOT

    tree = ast.parse((ROOT / "src/hfalign/recipe.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m.startswith(("hfalign.stages", "hfalign.ppo", "hfalign.trainargs"))}, imported
    assert {m for m in imported if m.startswith("hfalign")} <= {"hfalign.errors", "hfalign.schema"}


def test_families_table_holds_the_four_families():
    assert {"llama", "glm", "glm4", "chatglm"} <= set(models.FAMILIES)
    chatglm = models.family("chatglm")
    assert chatglm.head == "classifier_head" and chatglm.hidden_layout == "seq_first" and chatglm.padding_side == "left"
    assert "query_key_value" in chatglm.lora_targets
    assert models.family("llama").head == "score" and models.family("some-new-arch") == models.OTHER


class _Config:
    def __init__(self, model_type):
        self.model_type = model_type


class _Backbone(torch.nn.Module):
    """Returns hidden states in ChatGLM's [seq, batch, hidden] layout."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        from types import SimpleNamespace

        hidden = torch.arange(input_ids.numel() * 2, dtype=torch.float32).reshape(*input_ids.shape, 2)
        return SimpleNamespace(last_hidden_state=hidden.transpose(0, 1).contiguous())


class _ChatGLMLikeClassifier(torch.nn.Module):
    base_model_prefix = "transformer"

    def __init__(self):
        super().__init__()
        self.config = _Config("chatglm")
        self.transformer = _Backbone()
        self.classifier_head = torch.nn.Linear(2, 1, bias=False, dtype=torch.bfloat16)


def test_family_table_drives_head_name_and_hidden_layout():
    """A ChatGLM-style critic: head found by the family's name, made fp32, hidden states read batch-first."""
    from hfalign.ppo.policy_value import PolicyAndValue, fp32_score_head, head_from

    critic = _ChatGLMLikeClassifier()
    fp32_score_head(critic)
    assert head_from(critic) is critic.classifier_head and critic.classifier_head.weight.dtype == torch.float32
    wrapper = PolicyAndValue(torch.nn.Linear(1, 1), critic=critic)
    ids = torch.zeros(3, 5, dtype=torch.long)
    hidden = wrapper._hidden(critic, ids, torch.ones_like(ids), None)
    assert hidden.shape == (3, 5, 2)
    assert torch.equal(hidden, torch.arange(30, dtype=torch.float32).reshape(3, 5, 2))
    with pytest.raises(ValueError, match="no scalar head 'classifier_head'"):
        del critic.classifier_head
        head_from(critic)
