"""`hfalign export RUN_DIR OUT [--dtype bf16]`: a run as one full Hugging Face model, adapters merged.

What a LoRA run's directory means depends on its stage, and hfalign knows it from the run's resolved recipe:

    sft  base + the SFT adapter                                       -> AutoModelForCausalLM
    rm   base + the SFT adapter it was trained on (merged first, as the RM stage did) + the reward adapter and its
         scalar head                                                  -> AutoModelForSequenceClassification
    ppo  base + the policy adapter (the SFT adapter, trained on)      -> AutoModelForCausalLM

A full-weight run is re-saved (in --dtype). Merging happens in float32; the result is cast to --dtype and written
with the run's tokenizer (chat template included) and generation config.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from hfalign.errors import UserError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def export(run_dir: str, out_dir: str, dtype: str = "fp32") -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from hfalign import models
    from hfalign.ppo.policy_value import adapter_base, is_adapter_dir
    from hfalign.recipe import ModelSection, QuantizationSection

    run, out = Path(run_dir), Path(out_dir)
    resolved_path = run / "recipe.resolved.yaml"
    if not resolved_path.is_file() or not (run / "hfalign_done.json").is_file():
        raise UserError(f"{run} is not a finished hfalign run (no recipe.resolved.yaml or hfalign_done.json).",
                        fix="give the output_dir of a finished run")
    if (out / "config.json").exists():
        raise UserError(f"{out} already holds a model.", fix="choose another output directory or remove it")
    resolved = yaml.safe_load(resolved_path.read_text(encoding="utf-8"))
    stage, m = resolved["stage"], resolved["model"]
    tok = AutoTokenizer.from_pretrained(run)
    if is_adapter_dir(str(run)):
        base = ModelSection(name_or_path=m["name_or_path"], revision=m.get("revision"), dtype="float32",
                            trust_remote_code=m.get("trust_remote_code", False))
        plain = QuantizationSection()  # merged into full-precision weights, whatever the run trained on
        if stage == "rm":
            model = models.load_sequence_classifier(base, plain, tok)
            if adapter_base(str(run)):
                model = models.apply_adapter(model, adapter_base(str(run)), trainable=False)
        else:
            model = models.load_causal_lm(base, plain, tok)
        model = models.apply_adapter(model, str(run), trainable=False)
    else:
        cls = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
        model = cls.from_pretrained(run, dtype=torch.float32)
    model = model.to(getattr(torch, DTYPES[dtype]))
    model.config.dtype = DTYPES[dtype]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
