"""The recipe: one YAML file per run, parsed into typed sections. Every field is documented once, here.

    recipe.yaml --(extends chain, deep merge)--> --(dotted overrides)--> typed Recipe

This module is the schema only: it imports no stage and nothing of PPO. The checks that need a stage (its config
class, its data formats, its own rules) run in preflight.py, which `hfalign validate` and `hfalign train` call.

Relative paths inside a recipe (data files, model directories, output_dir) are relative to the working directory,
as for every Hugging Face script; `extends:` alone is relative to the recipe that names it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hfalign.errors import UserError, located
from hfalign.schema import check_keys, check_value, doc, field_types, parse_into

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.path.exists(path)


# --- sections ---------------------------------------------------------------------------------------------------


@dataclass
class ModelSection:
    name_or_path: str = field(metadata=doc("Hub id (meta-llama/Llama-2-7b-hf) or local directory (./models/tiny-llama)."))
    revision: str | None = field(default=None, metadata=doc("Hub revision (branch, tag or commit)."))
    tokenizer: str | None = field(default=None, metadata=doc("Tokenizer path when it differs from name_or_path."))
    adapter: str | None = field(
        default=None, metadata=doc("A trained PEFT adapter directory to start from (e.g. outputs/sft of a LoRA run).")
    )
    trust_remote_code: bool = field(
        default=False, metadata=doc("Run the checkpoint's own Python code (ChatGLM2/3). Never implied.")
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata=doc("Weight dtype; 'auto' keeps the checkpoint's.")
    )
    attn_implementation: str | None = field(default=None, metadata=doc("eager, sdpa, flash_attention_2, ...; null = library default."))
    chat_template: str | None = field(
        default=None, metadata=doc("Chat template override: a Jinja string or a path to a .jinja file.")
    )
    pad_token: str | None = field(
        default=None,
        metadata=doc("Pad token. Default: the tokenizer's, unless missing or equal to EOS; then unk, else a new <|pad|>."),
    )

    def check(self, where: str) -> None:
        for key in ("name_or_path", "tokenizer", "adapter"):
            value = getattr(self, key)
            if value is None:
                continue
            if looks_local(value):
                if not os.path.isdir(os.path.expanduser(value)):
                    raise UserError(
                        f"'{where}.{key}' is {value!r}, which is not an existing directory.",
                        fix="point it at an existing directory: those under ./models are built once (`make tiny`, "
                        "`make tiny-base`, `hfalign convert chatglm SRC DIR`), those under ./outputs by the earlier "
                        "stage (`make sft`, or `make sft RECIPES=recipes/<dir>`)",
                    )
            elif key == "adapter" or not HUB_ID.match(value):
                raise UserError(
                    f"'{where}.{key}' is {value!r}: neither a local directory nor a hub id like 'org/name'.",
                    fix="give an existing directory (start relative paths with ./) or a hub id",
                )
        if self.chat_template and self.chat_template.endswith((".jinja", ".j2")) and not os.path.isfile(self.chat_template):
            raise UserError(f"'{where}.chat_template' file {self.chat_template!r} does not exist.", fix="fix the path")


@dataclass
class LoraSection:
    enabled: bool = field(default=False, metadata=doc("Train a LoRA adapter instead of all weights."))
    r: int = field(default=16, metadata=doc("LoRA rank."))
    alpha: int = field(default=32, metadata=doc("LoRA alpha (scale = alpha / r)."))
    dropout: float = field(default=0.05, metadata=doc("LoRA dropout (PPO forces 0: dropout breaks ratio == 1)."))
    target_modules: list[str] | str | None = field(
        default=None,
        metadata=doc("Modules to adapt. null = per architecture: 'all-linear' for native models, "
                     "query_key_value/dense/dense_h_to_4h/dense_4h_to_h for ChatGLM (never output_layer)."),
    )
    modules_to_save: list[str] | None = field(default=None, metadata=doc("Extra modules trained in full and saved."))
    train_untrained_tokens: bool = field(default=True, metadata=doc(
        "A new adapter (SFT, RM) also trains the embedding rows of tokens its data uses that the base never trained "
        "(all-zero rows, as LLaMA-3 base's chat header and end-of-turn tokens): started at the mean row, saved in "
        "the adapter; the run header lists them. Full fine-tuning (lora.enabled: false) starts them at the mean row "
        "too. false: leave them as they are."))

    def check(self, where: str) -> None:
        if self.r < 1:
            raise UserError(f"'{where}.r' must be >= 1, got {self.r}.", fix="use a rank such as 8 or 16")
        if self.alpha < 1:
            raise UserError(f"'{where}.alpha' must be >= 1, got {self.alpha}.", fix="use e.g. 2 * r")
        if not 0 <= self.dropout < 1:
            raise UserError(f"'{where}.dropout' must be in [0, 1), got {self.dropout}.", fix="use 0.05 or 0")


@dataclass
class QuantizationSection:
    load_in_4bit: bool = field(default=False, metadata=doc("QLoRA: load the base in 4 bit with bitsandbytes (needs lora.enabled)."))
    load_in_8bit: bool = field(default=False, metadata=doc("Load the base in 8 bit with bitsandbytes (needs lora.enabled)."))
    quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata=doc("4-bit data type."))
    compute_dtype: Literal["float32", "bfloat16", "float16"] = field(default="bfloat16", metadata=doc("Matmul dtype."))
    double_quant: bool = field(default=True, metadata=doc("Quantize the quantization constants too."))

    def check(self, where: str) -> None:
        if self.load_in_4bit and self.load_in_8bit:
            raise UserError(f"'{where}': load_in_4bit and load_in_8bit are both true.", fix="choose one")

    @property
    def enabled(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit


@dataclass
class DataSection:
    train: str = field(metadata=doc("Training data: a .jsonl/.json/.parquet/.csv file or a hub dataset id."))
    eval: str | None = field(default=None, metadata=doc("Eval data, same forms as train."))
    eval_fraction: float = field(default=0.0, metadata=doc("Carve this fraction off train for eval when eval is null."))
    split: str = field(default="train", metadata=doc("Split of a hub dataset for train."))
    eval_split: str = field(default="test", metadata=doc("Split of a hub dataset for eval."))
    subset: str | None = field(default=None, metadata=doc("Hub dataset configuration name."))
    format: Literal["auto", "messages", "prompt_completion", "text", "preference", "prompt"] = field(
        default="auto",
        metadata=doc("Row format. auto: sft picks messages | prompt_completion | text by columns; rm = preference; ppo = prompt."),
    )
    columns: dict[str, str] = field(
        default_factory=dict, metadata=doc("Renames, hfalign name -> your column, e.g. {prompt: question, completion: answer}.")
    )
    max_rows: int | None = field(default=None, metadata=doc("Use only the first N training rows."))
    seed: int = field(default=42, metadata=doc("Seed of the eval_fraction split."))

    def check(self, where: str) -> None:
        for key in ("train", "eval"):
            value = getattr(self, key)
            if value is None:
                continue
            if value.endswith(DATA_SUFFIXES) or looks_local(value):
                if not os.path.isfile(value):
                    raise UserError(f"'{where}.{key}' file {value!r} does not exist.", fix="fix the path (relative to the working directory)")
            elif not HUB_ID.match(value):
                raise UserError(f"'{where}.{key}' is {value!r}: not a data file ({', '.join(DATA_SUFFIXES)}) nor a hub id.",
                                fix="give a file path or a hub dataset id")
        if not 0 <= self.eval_fraction < 1:
            raise UserError(f"'{where}.eval_fraction' must be in [0, 1), got {self.eval_fraction}.", fix="use e.g. 0.05")
        if self.eval is not None and self.eval_fraction:
            raise UserError(f"'{where}': both eval and eval_fraction are set.", fix="keep one of them")
        if self.max_rows is not None and self.max_rows < 1:
            raise UserError(f"'{where}.max_rows' must be >= 1, got {self.max_rows}.", fix="remove it or use a positive number")


@dataclass
class RewardSection:
    """PPO only: where the score of a completion comes from -- one of model, url, function, or several as sources."""

    model: str | None = field(default=None, metadata=doc("Reward model directory: a full model or a LoRA adapter (outputs/rm). One with another tokenizer than the policy's scores the decoded text, re-rendered with its own chat template (docs/rewards.md)."))
    tokenizer: str | None = field(default=None, metadata=doc("The reward model's tokenizer, when not in its directory (a directory or hub id). Setting it scores text through it even when the vocabularies match."))
    url: str | None = field(default=None, metadata=doc("Instead of a model: a reward server (hfalign serve-reward), e.g. http://127.0.0.1:8000."))
    timeout: float = field(default=60.0, metadata=doc("url: seconds to wait for one answer."))
    retries: int = field(default=3, metadata=doc("url: tries after the first, waiting 1, 2, 4 ... s; then the run stops at a checkpoint."))
    function: str | None = field(
        default=None, metadata=doc("Instead of a model: 'package.module:function(prompts, completions) -> list[float]'.")
    )
    sources: list[dict] | None = field(default=None, metadata=doc("Instead of one: several sources, each {name, model | url | function, tokenizer, weight: 1.0, normalize: false}; PPO optimises the weighted sum, each logged as reward/<name>."))

    def check(self, where: str) -> None:
        given = [k for k in ("model", "url", "function", "sources") if getattr(self, k) is not None]
        if len(given) != 1:
            raise UserError(f"'{where}' needs exactly one of 'model', 'url', 'function' or 'sources', got "
                            f"{', '.join(given) or 'none'}.", fix="set reward.model: outputs/rm or reward.function: pkg.mod:fn")
        check_source(vars(self), where)
        if self.sources is not None:
            check_sources(self.sources, f"{where}.sources")


SOURCE_KEYS = ("name", "model", "url", "function", "tokenizer", "weight", "normalize")


def check_source(source: dict, where: str) -> None:
    """One reward source's model directory, URL or function."""
    model, url, function = source.get("model"), source.get("url"), source.get("function")
    if model is not None and not os.path.isdir(model):
        raise UserError(f"'{where}.model' directory {model!r} does not exist.", fix="train it first (`make rm`) or fix the path")
    if url is not None and not re.match(r"^https?://[^/\s]+", str(url)):
        raise UserError(f"'{where}.url' is {url!r}; expected http://host:port.", fix="e.g. url: http://127.0.0.1:8000")
    if function is not None:
        import_function(function, f"{where}.function")


def check_sources(sources: list[dict], where: str) -> None:
    if not sources:
        raise UserError(f"'{where}' is empty.", fix="list at least one source, or use reward.model / reward.function")
    names = []
    for i, source in enumerate(sources):
        at = f"{where}[{i}]"
        if not isinstance(source, dict):
            raise UserError(f"'{at}' must be a mapping, got {source!r}.", fix="write {model: DIR, weight: 1.0}")
        check_keys(source, SOURCE_KEYS, at)
        kinds = [k for k in ("model", "url", "function") if source.get(k) is not None]
        if len(kinds) != 1:
            raise UserError(f"'{at}' needs exactly one of 'model', 'url' or 'function'.", fix="e.g. {model: outputs/rm}")
        weight = source.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise UserError(f"'{at}.weight' must be a number, got {weight!r}.", fix="e.g. weight: 0.5")
        if not isinstance(source.get("normalize", False), bool):
            raise UserError(f"'{at}.normalize' must be true or false.", fix="normalize: true")
        check_source(source, at)
        names.append(source_name(source))
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"'{where}' names {twice[0]!r} twice (logged as reward/<name>).", fix="give each source a distinct 'name'")


def source_name(source: dict) -> str:
    """A source's metric name: its `name`, else the function's name, the model directory's last part, or 'remote'."""
    if source.get("name"):
        return str(source["name"])
    if source.get("function"):
        return source["function"].rpartition(":")[2]
    if source.get("model"):
        return os.path.basename(os.path.normpath(source["model"]))
    return "remote"


@dataclass
class ValueSection:
    """PPO only: the critic."""

    model: str | None = field(
        default=None, metadata=doc("Value model init: a directory. null = from the reward model (InstructGPT), else from the policy.")
    )
    shared_base: bool = field(
        default=True, metadata=doc("With lora.enabled: value = adapter + head on the policy's base (one copy of base weights).")
    )

    def check(self, where: str) -> None:
        if self.model is not None and not os.path.isdir(self.model):
            raise UserError(f"'{where}.model' directory {self.model!r} does not exist.", fix="fix the path or remove it")


@dataclass
class SummarySection:
    """PPO only: rule-based checks for the before/after summary on held-out prompts (data.eval)."""

    objective: str | None = field(default=None, metadata=doc("'package.module:function(completion[, prompt]) -> float': the true objective."))
    well_formed: str | None = field(default=None, metadata=doc("'package.module:function(completion[, prompt]) -> bool'."))

    def check(self, where: str) -> None:
        for key in ("objective", "well_formed"):
            if getattr(self, key):
                import_function(getattr(self, key), f"{where}.{key}")


def import_function(spec: str, where: str):
    """'package.module:function' -> the function, or a UserError naming the key."""
    import importlib

    if not re.match(r"^[\w.]+:\w+$", spec):
        raise UserError(f"'{where}' is {spec!r}; expected 'package.module:function'.", fix="e.g. hfalign.demo.task:positivity_reward")
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"'{where}': cannot import module {module_name!r} ({e}).", fix="check the module path and PYTHONPATH") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"'{where}': module {module_name!r} has no function {name!r}.", fix="check the function name")
    return fn


@dataclass
class Recipe:
    stage: str = field(metadata=doc("Which stage this recipe runs: sft | rm | ppo (the keys of hfalign.stages.STAGES)."))
    output_dir: str = field(metadata=doc("Run directory: model, checkpoints, metrics.jsonl, recipe.resolved.yaml."))
    model: ModelSection = field(metadata=doc("The base model and tokenizer."))
    data: DataSection = field(metadata=doc("Datasets."))
    lora: LoraSection = field(default_factory=LoraSection, metadata=doc("LoRA through PEFT."))
    quantization: QuantizationSection = field(default_factory=QuantizationSection, metadata=doc("bitsandbytes loading."))
    reward: RewardSection | None = field(default=None, metadata=doc("PPO: reward model or function.", section=RewardSection,
                                                                    stages=("ppo",)))
    value: ValueSection | None = field(default=None, metadata=doc("PPO: value model.", section=ValueSection, stages=("ppo",)))
    summary: SummarySection | None = field(default=None, metadata=doc("PPO: rule checks for the before/after summary.",
                                                                      section=SummarySection, stages=("ppo",)))
    train: dict[str, Any] = field(
        default_factory=dict, metadata=doc("Fields of the stage's config class: SFTConfig, RewardConfig, hfalign PPOConfig.")
    )
    callbacks: list[Any] = field(
        default_factory=lambda: ["metrics"], metadata=doc("Callbacks by name, or {name: ..., option: value}. See callbacks.py.")
    )
    resume: bool = field(default=True, metadata=doc("Resume from the run directory's last checkpoint when one exists."))
    overwrite: bool = field(default=False, metadata=doc("Allow replacing a finished run in output_dir."))
    extends: str | None = field(default=None, metadata=doc("A recipe to start from (path relative to this one); deep-merged."))
    source: str = field(default="", metadata=doc("", hidden=True))

    def check(self, where: str) -> None:
        if self.quantization.enabled and not self.lora.enabled:
            raise UserError("'quantization' loads a frozen quantized base, which only trains through an adapter.",
                            fix="set lora.enabled: true (QLoRA) or remove quantization")
        for i, cb in enumerate(self.callbacks):
            name = cb.get("name") if isinstance(cb, dict) else cb
            if not isinstance(name, str):
                raise UserError(f"'callbacks[{i}]' must be a name or a mapping with 'name', got {cb!r}.", fix="e.g. callbacks: [metrics]")


# --- loading ----------------------------------------------------------------------------------------------------


def read_mapping(path: Path, where: str) -> dict:
    """Read one YAML file that must hold a mapping; every failure names the file."""
    if not path.is_file():
        raise UserError(f"recipe file {str(path)!r} does not exist.", where=where, fix="check the path")
    raw = path.read_bytes()
    if b"\0" in raw:
        raise UserError("is a binary file, not a YAML recipe.", where=str(path), fix="pass a .yaml recipe")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"is not UTF-8 text (byte {e.start}).", where=str(path), fix="save the recipe as UTF-8") from None
    if not text.strip():
        raise UserError("is empty.", where=str(path), fix="write a recipe (see recipes/sft.yaml)")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"is not valid YAML{at}: {getattr(e, 'problem', e)}.", where=str(path), fix="fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"must be a YAML mapping (key: value), got {type(data).__name__}.", where=str(path),
                        fix="start the file with 'stage: sft' and other top-level keys")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The recipe's mapping with its `extends` chain merged in (parents first)."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise UserError(f"'extends' forms a cycle: {cycle}.", where=str(chain[-1]), fix="remove one of the extends")
    data = read_mapping(path, str(chain[-1]) if chain else "command line")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise UserError(f"'extends' must be a path, got {parent!r}.", where=str(path), fix="extends: base.yaml")
    target = path.parent / parent
    if not target.is_file():
        raise UserError(f"'extends' target {parent!r} does not exist (looked at {target}).", where=str(path),
                        fix="paths in extends are relative to the recipe that names them")
    return deep_merge(load_tree(target, (*chain, path)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override {text!r} has no '='.", where="command line", fix="write overrides as key.sub=value, e.g. train.learning_rate=1e-4")
    key, _, value = text.partition("=")
    parts = key.strip().split(".")
    if not all(re.match(r"^\w+$", p) for p in parts):
        raise UserError(f"override {text!r} has a malformed key {key!r}.", where="command line", fix="use dotted names like lora.r=8")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        raise UserError(f"override {text!r}: value {value!r} is not valid YAML.", where="command line",
                        fix="quote strings with special characters, e.g. key='a: b'") from None
    return parts, parsed


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise UserError(f"override {text!r}: '{'.'.join(parts[: i + 1])}' is a value, not a section.", where="command line",
                                fix="override the value itself")
            node[part] = dict(child)
            node = node[part]
        node[parts[-1]] = value
    return data


def load(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read, merge, override and type a recipe. Raises UserError; loads no model and no data.
    `train:` stays a plain mapping here: preflight.check() types it against the stage's config class."""
    source = Path(path)
    tree = apply_overrides(load_tree(source), overrides or [])
    with located(str(source)):
        for f in dataclasses.fields(Recipe):  # optional sections: present but empty -> typed with defaults
            if f.metadata.get("section") and f.name in tree and tree[f.name] is None:
                tree[f.name] = {}
        recipe = _parse_recipe(tree)
        recipe.source = str(source)
    return recipe


def _parse_recipe(tree: dict) -> Recipe:
    types_ = field_types(Recipe)
    check_keys(tree, [n for n in types_ if n != "source"], "")
    for f in dataclasses.fields(Recipe):  # sections that only some stages read
        only = f.metadata.get("stages")
        if only and f.name in tree and tree.get("stage") not in only:
            raise UserError(f"'{f.name}' is only for stage {' or '.join(only)}, and this recipe's stage is "
                            f"{tree.get('stage')!r}.", fix=f"remove '{f.name}'")
    kwargs = {}
    for f in dataclasses.fields(Recipe):
        if f.name == "source" or f.name not in tree:
            continue
        section = f.metadata.get("section") or (types_[f.name] if dataclasses.is_dataclass(types_[f.name]) else None)
        kwargs[f.name] = parse_into(section, tree[f.name], f.name) if section else check_value(tree[f.name], types_[f.name], f.name)
    for f in dataclasses.fields(Recipe):
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name != "source":
            raise UserError(f"'{f.name}' is required.", fix=f"add '{f.name}:' ({f.metadata.get('help')})")
    recipe = Recipe(**kwargs)
    recipe.check("")
    return recipe
