#!/usr/bin/env bash
# The GPU checks of issue 7, as one script for the device machine (../shared/GPU.md): run from the repository root
# there, with .whl/ (../shared/gpu/fetch_wheels.sh) and TRL 1.12 in .trl112/ (pip install --no-deps --target
# .trl112 trl==1.12.0) carried along. One log per check under $OUT (at most 8 files come back).
set -u
OUT=${OUT:-/tmp/hfalign-gpu}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src DS_ACCELERATOR=cuda HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/0-gpu.log" 2>&1
python3 -m hfalign build-tiny models/tiny-llama > "$OUT/1-default.log" 2>&1
for s in sft rm ppo; do timeout 150 python3 -m hfalign "recipes/$s.yaml" >> "$OUT/1-default.log" 2>&1; done
timeout 240 python3 benchmarks/ppo_gpu.py --trl-path .trl112 > "$OUT/2-vs-trl.log" 2>&1
timeout 120 python3 benchmarks/ppo_memory.py --device cuda --baseline none --prompt-tokens 512 --new-tokens 512 \
  > "$OUT/3-memory-152k.log" 2>&1
timeout 120 python3 -m hfalign recipes/ppo.yaml output_dir=/tmp/lora-gc model.name_or_path=models/tiny-llama \
  model.adapter=null lora.enabled=true model.dtype=bfloat16 train.bf16=true train.activation_checkpointing=true \
  reward.model=null reward.function=hfalign.demo.task:positivity_reward train.total_episodes=128 \
  > "$OUT/4-lora-bf16-gc-rewardfn.log" 2>&1
timeout 150 python3 -m accelerate.commands.launch --config_file accelerate_configs/zero3.yaml --num_processes 1 \
  --mixed_precision bf16 -m hfalign recipes/ppo.yaml output_dir=/tmp/z3 train.total_episodes=128 > "$OUT/5-zero3-bf16.log" 2>&1
tail -n 3 "$OUT"/*.log
