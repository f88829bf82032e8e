"""The run directory: refuse to clobber, resume from the last checkpoint, record the recipe, finish atomically.

    outputs/<run>/
      recipe.resolved.yaml   the fully resolved recipe (written before training)
      versions.json          python and package versions
      metrics.jsonl          one JSON object per logged dict (callback_types.MetricsCallback; callbacks.LOG_FILES lists
                             every file a callback appends to, trimmed back to the checkpoint on resume)
      checkpoint-N/          Trainer checkpoints (resume)
      hfalign_done.json      written last: the run finished and the model files are complete
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
import zipfile
from pathlib import Path

import yaml

from hfalign.errors import UserError
from hfalign.recipe import Recipe

DONE = "hfalign_done.json"
PACKAGES = ("hfalign", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed", "bitsandbytes")


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def resolved(recipe: Recipe) -> dict:
    data = dataclasses.asdict(recipe)
    data.pop("source")
    data.pop("extends")
    return {k: v for k, v in data.items() if v is not None}


def checkpoints(out: Path) -> list[Path]:
    """checkpoint-N directories, oldest first."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()] if out.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def complete_checkpoint(path: Path) -> bool:
    """Whole, not torn by a kill during the save: Trainer writes trainer_state.json after every other file (PPO's own
    state before it), and every weight / optimizer file must be intact to its last byte."""
    try:
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        if not all((path / name).is_file() for name in _rank_files(path)):
            return False
        for f in path.rglob("*"):
            if f.suffix == ".safetensors" and not _safetensors_intact(f):
                return False
            if f.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(f):  # torch.save writes a zip
                return False
            if f.suffix == ".json":
                json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def _rank_files(path: Path) -> list[str]:
    """The per-process files a multi-process PPO checkpoint must hold (its hfalign_ppo_state.json names the count)."""
    state = path / "hfalign_ppo_state.json"
    if not state.is_file():
        return []
    processes = json.loads(state.read_text(encoding="utf-8")).get("batch", {}).get("processes", 1)
    if processes < 2 or not any(path.glob("rng_state_*.pth")):  # save_only_model writes none at all
        return []
    return [f"rng_state_{i}.pth" for i in range(processes)]


def _safetensors_intact(path: Path) -> bool:
    """The header parses and the file is exactly as long as the tensors it declares."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return False
        n = int.from_bytes(head, "little")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return path.stat().st_size == 8 + n + end


def last_checkpoint(out: Path) -> str | None:
    """The newest complete checkpoint (a torn newer one is passed over)."""
    complete = [p for p in checkpoints(out) if complete_checkpoint(p)]
    return str(complete[-1]) if complete else None


def decide(recipe: Recipe) -> tuple[str, str | None]:
    """('fresh' | 'resume' | 'overwrite', checkpoint). Pure decision, no side effects; raises on clobber."""
    out = Path(recipe.output_dir)
    if not out.is_dir() or not any(out.iterdir()):
        return "fresh", None
    if recipe.overwrite:
        return "overwrite", None
    if (out / DONE).exists():
        raise UserError(f"{out} already holds a finished {recipe.stage} run.",
                        fix="pass overwrite=true to replace it (with make: ARGS=overwrite=true), or output_dir=<another dir>")
    ckpt = last_checkpoint(out)
    if ckpt and recipe.resume:
        return "resume", ckpt
    if ckpt:
        raise UserError(f"{out} holds checkpoints of an unfinished run and resume is false.",
                        fix="pass resume=true to continue it, or overwrite=true to start over")
    if (out / "recipe.resolved.yaml").exists():
        return "fresh", None  # our own run that died before its first checkpoint: nothing to keep
    raise UserError(f"{out} is not empty and is not an hfalign run directory.",
                    fix="choose another output_dir, or pass overwrite=true to delete its contents")


def prepare(recipe: Recipe, is_main: bool, logs: dict[str, str]) -> str | None:
    """Apply decide() on the main process (others only read); return the checkpoint to resume from.
    `logs`: the files callbacks append to, each with the key that holds its step (trimmed on resume)."""
    mode, ckpt = decide(recipe)
    out = Path(recipe.output_dir)
    if is_main:
        if mode == "overwrite":
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        for torn in (p for p in checkpoints(out) if not complete_checkpoint(p)):
            print(f"hfalign: {torn} is incomplete (the run died while saving it); removed", flush=True)
            shutil.rmtree(torn)
        for name, key in logs.items():
            if mode == "fresh":
                (out / name).unlink(missing_ok=True)
            else:
                _trim_metrics(out / name, _checkpoint_step(ckpt), key=key)
        atomic_write(out / "recipe.resolved.yaml", yaml.safe_dump(resolved(recipe), sort_keys=False))
        atomic_write(out / "versions.json", json.dumps(versions(), indent=2) + "\n")
        if ckpt:
            print(f"hfalign: resuming {recipe.stage} from {ckpt}", flush=True)
    from accelerate import PartialState

    PartialState().wait_for_everyone()  # no rank reads the run directory while the main one prepares it
    return ckpt


def _checkpoint_step(ckpt: str | None) -> int:
    return int(ckpt.rsplit("-", 1)[-1]) if ckpt else 0


def _trim_metrics(path: Path, step: int, key: str = "step") -> None:
    """On resume, drop log lines written after the checkpoint, so metrics.jsonl has no duplicated steps."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get(key, 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut off by the crash itself
            continue
    atomic_write(path, "".join(ln + "\n" for ln in keep))


def read_run(run: Path, finished: bool = False) -> dict:
    """The resolved recipe of a run directory (what plot, generate and export start from); a directory that is not a
    run (or, with `finished`, not a finished one) is a user mistake."""
    from hfalign.errors import UserError

    path = Path(run) / "recipe.resolved.yaml"
    if not path.is_file() or (finished and not (Path(run) / DONE).is_file()):
        raise UserError(f"{run} is not {'a finished' if finished else 'an'} hfalign run directory (no "
                        f"{'recipe.resolved.yaml or ' + DONE if finished else 'recipe.resolved.yaml'}).",
                        fix="give the output_dir of a run")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def finish(recipe: Recipe, is_main: bool, summary: dict) -> None:
    """Mark the run complete; called after the model files are saved, so the marker never lies."""
    if is_main:
        info = {"stage": recipe.stage, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **summary}
        atomic_write(Path(recipe.output_dir) / DONE, json.dumps(info, indent=2) + "\n")
