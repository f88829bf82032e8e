"""What every benchmark shares: run one measured case in a process of its own, read back its `RESULT {json}` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_worker(script: str, args: list[str], env: dict | None = None, label: str = "worker") -> dict | None:
    """`python SCRIPT --worker ARGS...` from the repository root; its last `RESULT {...}` line, or None (said why)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    if env and "PYTHONPATH" in env and os.environ.get("PYTHONPATH"):  # put the worker's path first, keep the caller's
        full_env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], os.environ["PYTHONPATH"]])
    proc = subprocess.run([sys.executable, script, "--worker", *args], cwd=ROOT, capture_output=True, text=True,
                          env=full_env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"  {label} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-3:]}")
        return None
    return json.loads(lines[-1][len("RESULT "):])


def result(payload: dict) -> None:
    print("RESULT " + json.dumps(payload), flush=True)


def cuda_counts(events) -> dict[str, int]:
    """From a torch.profiler's key_averages(): host syncs, device-to-host copies, kernel launches, CUDA-graph launches."""
    count = {e.key: e.count for e in events}
    return {"syncs": sum(n for k, n in count.items() if k in ("cudaStreamSynchronize", "cudaDeviceSynchronize")),
            "dtoh": sum(n for k, n in count.items() if "Memcpy DtoH" in k),
            "launches": sum(n for k, n in count.items() if k in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")),
            "graphs": count.get("cudaGraphLaunch", 0)}
