"""A quiet console: library noise off, hfalign's own lines and real warnings kept.

`quiet()` runs first thing in the CLI, before torch or any library is imported (the noise below is printed at import
time), and touches only the standard library and environment variables. Each entry is a message that every run
printed and that says nothing about the user's run; a warning not listed here is shown as usual.
"""

from __future__ import annotations

import logging
import os
import warnings

# (logger, text in the message): log records dropped
LOG_NOISE = (
    # bitsandbytes' optional CPU kernel package (`kernels`), asked for at every import on AVX512-BF16 CPUs
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    # DeepSpeed says at import that it found no GPU; on a CPU machine that is expected
    ("DeepSpeed", "Setting accelerator to CPU"),
    # Trainer's checkpoint rotation on filesystems with coarse mtimes (tmpfs, overlays): it then sorts by step number,
    # which is what hfalign's run directory does anyway
    ("transformers.trainer_utils", "mtime may not be reliable on this filesystem"),
)
# (category, message regex): Python warnings ignored
WARNING_NOISE = (
    # torch's DataLoader on a CPU-only machine: pin_memory is Trainer's default and simply unused there
    (UserWarning, r".*'pin_memory' argument is set as true but no accelerator is found"),
    # transformers 5 renamed gradient checkpointing; PEFT and TRL still call the old name internally
    (FutureWarning, r".*`is_gradient_checkpointing` is deprecated"),
    (FutureWarning, r".*`gradient_checkpointing` is deprecated"),  # TRL's configs set the old field themselves
    # DeepSpeed's ZeRO collectives call torch's old name, once per gather, on every rank
    (FutureWarning, r".*`torch.distributed.all_gather_into_tensor` is deprecated"),
    (FutureWarning, r".*`torch.distributed.reduce_scatter_tensor` is deprecated"),
)


class _Drop(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet() -> None:
    """Filter the noise above and turn off the libraries' progress bars ("Loading weights", "Writing model shards":
    transformers draws them only while huggingface_hub's are on; datasets' "Tokenizing train dataset" in TRL)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for name, text in LOG_NOISE:
        logging.getLogger(name).addFilter(_Drop(text))
    for category, message in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
