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

from hfalign.errors import UserError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load_run_model(run: Path, resolved: dict, tok):
    """A run's model in float32: full weights, or its base with the run's adapter stack merged (see above)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from hfalign import models
    from hfalign.ppo.build import adapter_base, is_adapter_dir
    from hfalign.recipe import ModelSection, QuantizationSection

    stage, m = resolved["stage"], resolved["model"]
    if not is_adapter_dir(str(run)):
        cls = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
        return cls.from_pretrained(run, dtype=torch.float32)
    base = ModelSection(name_or_path=m["name_or_path"], revision=m.get("revision"), dtype="float32",
                        trust_remote_code=m.get("trust_remote_code", False))
    plain = QuantizationSection()  # merged into full-precision weights, whatever the run trained on
    if stage == "rm":
        model = models.load_sequence_classifier(base, plain, tok)
        if adapter_base(str(run)):
            model = models.apply_adapter(model, adapter_base(str(run)), trainable=False)
    else:
        model = models.load_causal_lm(base, plain, tok)
    return models.apply_adapter(model, str(run), trainable=False)


def export(run_dir: str, out_dir: str, dtype: str = "fp32") -> Path:
    import torch
    from transformers import AutoTokenizer

    from hfalign.rundir import read_run

    run, out = Path(run_dir), Path(out_dir)
    resolved = read_run(run, finished=True)
    if (out / "config.json").exists():
        raise UserError(f"{out} already holds a model.", fix="choose another output directory or remove it")
    tok = AutoTokenizer.from_pretrained(run)
    model = load_run_model(run, resolved, tok).to(getattr(torch, DTYPES[dtype]))
    model.config.dtype = DTYPES[dtype]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
