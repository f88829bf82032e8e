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


def _import_graph() -> dict[str, set[str]]:
    """hfalign module -> the hfalign modules it imports, at module level or inside a function (a circle through a
    function-level import is still a circle in the design). Importing a submodule runs its packages first, so an edge
    goes to each of them too. A package's PEP 562 `__getattr__` re-exports lazily and is not counted."""
    import ast

    from helpers import ROOT

    src = ROOT / "src"
    modules = {".".join(f.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): f
               for f in (src / "hfalign").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        lazy = {id(n) for fn in tree.body if isinstance(fn, ast.FunctionDef) and fn.name == "__getattr__"
                for n in ast.walk(fn)}
        named = set()
        for node in ast.walk(tree):
            if id(node) in lazy:
                continue
            if isinstance(node, ast.Import):
                named |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                named |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                          for a in node.names}
        graph[name] = {".".join(m.split(".")[:i]) for m in named if m.startswith("hfalign.")
                       for i in range(2, m.count(".") + 2) if ".".join(m.split(".")[:i]) in modules} - {name}
    return graph


def test_no_import_circles_between_modules():
    """Layers, not circles: no hfalign module reaches itself through imports (issue 18 found stages/__init__ ->
    trainargs -> trainfields -> stages/__init__; trainfields and trainargs are now handed the stage's config class)."""
    graph = _import_graph()
    assert "hfalign.stages" not in graph["hfalign.trainfields"] | graph["hfalign.trainargs"]

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    circles = sorted(name for name in graph if name in reaches(name))
    assert not circles, circles


def test_the_ppo_modules_stay_small_and_split_by_role():
    """A stage reads top to bottom: no PPO module past 400 lines; the loop (trainer.py), checkpoints and resume,
    the TRL 1.12 surface, guards (watching and acting) and the model parts (build.py) each in their own module."""
    from helpers import ROOT

    sizes = {f.name: len(f.read_text().splitlines()) for f in (ROOT / "src/hfalign/ppo").glob("*.py")}
    assert max(sizes.values()) <= 400, sizes
    from hfalign.ppo import build, guards, policy_value

    assert all(hasattr(build, n) for n in ("freeze", "linear_head", "fp32_score_head", "read_adapter_head", "adapter_base"))
    assert not any(hasattr(policy_value, n) for n in ("freeze", "linear_head", "read_adapter_head", "adapter_base"))
    assert all(hasattr(guards, n) for n in ("Guard", "KLGuardCallback", "CollapseGuardCallback", "check", "act"))
    # advantages come from one place (ppo/estimate.py), whatever the estimator; checkpoint hooks from persistence.py
    loop = (ROOT / "src/hfalign/ppo/trainer.py").read_text()
    assert "core.gae(" not in loop and "estimate(" in loop and "def _save_checkpoint" not in loop


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
    from hfalign.ppo.build import fp32_score_head
    from hfalign.ppo.policy_value import PolicyAndValue, head_from

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
