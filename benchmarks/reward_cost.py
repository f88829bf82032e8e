"""What scoring costs per update outside the PPO model: re-tokenization for a reward model with its own tokenizer,
and the loopback round trip of a reward server, beside the reward model's forward itself.

    .venv/bin/python benchmarks/reward_cost.py              # tiny Qwen2 RM, 32 completions per update (ppo.yaml's)
    .venv/bin/python benchmarks/reward_cost.py --size 100m  # a ~100M-parameter RM

Builds a tiny (or 100M) Qwen2-family reward model with its own tokenizer, then times, over `--repeats` batches of the
embedded default's prompts with SFT-like completions: rendering + tokenizing (ModelScorer.encode), the whole
in-process ModelScorer call (encode + forward), and the same batch through `hfalign serve-reward` on 127.0.0.1
(RemoteScorer: JSON, HTTP, the server's encode + forward). Prints ms per batch and ratios to the forward.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="tiny", choices=["tiny", "100m"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    import torch

    from hfalign.demo.task import review
    from hfalign.demo.tiny import build_tiny
    from hfalign.rewards import ModelScorer, RemoteScorer

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [json.loads(ln) for ln in (ROOT / "data/ppo_prompts.jsonl").read_text().splitlines()][:a.batch]
    import random

    rng = random.Random(0)
    prompts = [r["prompt"] for r in rows]
    chats = [[{"role": "user", "content": x}] for x in prompts]
    completions = [" " + review(rng) for _ in prompts]
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny(Path(tmp) / "rm", size=a.size, family="qwen2")
        scorer = ModelScorer.load(str(model), batch_size=a.batch)
        scorer(chats, completions)  # warm-up

        def timed(fn) -> float:
            t0 = time.perf_counter()
            for _ in range(a.repeats):
                fn()
            return (time.perf_counter() - t0) / a.repeats * 1000

        encode = timed(lambda: scorer.encode(chats, completions))
        whole = timed(lambda: scorer(chats, completions))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "hfalign", "serve-reward", str(model), "--port", str(port),
                                   "--batch-size", str(a.batch)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(300):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.2)
            remote = RemoteScorer(f"http://127.0.0.1:{port}")
            remote(chats, completions)
            served = timed(lambda: remote(chats, completions))
        finally:
            server.kill()
    forward = whole - encode
    print(f"reward scoring of {a.batch} completions ({a.size} Qwen2-family RM, chat prompts, CPU, "
          f"{torch.get_num_threads()} threads), ms per batch over {a.repeats}:")
    print(f"  RM forward                  {forward:8.2f}")
    print(f"  re-render + tokenize        {encode:8.2f}   ({encode / forward:.2f}x the forward)")
    print(f"  in-process ModelScorer      {whole:8.2f}   ({whole / forward:.2f}x)")
    print(f"  serve-reward on 127.0.0.1   {served:8.2f}   ({served / forward:.2f}x; round trip {served - whole:+.2f} ms)")


if __name__ == "__main__":
    main()
