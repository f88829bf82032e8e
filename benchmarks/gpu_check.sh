#!/usr/bin/env bash
# The GPU checks, as two calls for the device machine (../shared/GPU.md), run from the repository root there:
#   bash benchmarks/gpu_check.sh main    carry .whl (../shared/gpu/fetch_wheels.sh) and .trl112
#                                        (pip install --no-deps --target .trl112 trl==1.12.0)
#   bash benchmarks/gpu_check.sh qlora   carry .whl and .bnb (bitsandbytes; 61 MiB together): QLoRA, the 152k-vocab
#                                        memory case, then hfalign alone on the 0.7B benchmark
#   bash benchmarks/gpu_check.sh lora    carry .whl and .bnb: recipes/lora and its -qlora variant (bf16 compute, CUDA
#                                        4-bit kernels) end to end on the pretrained tiny base; does LoRA learn there?
# One log per check under $OUT (at most 8 files come back).
set -u
OUT=${OUT:-/tmp/hfalign-gpu}; mkdir -p "$OUT"
part=${1:-main}
python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl
[ "$part" != main ] && python3 -m pip install -q --no-index --no-deps --no-compile --target .site .bnb/*.whl
export PYTHONPATH=$PWD/.site:$PWD/src DS_ACCELERATOR=cuda HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
[ -d models/tiny-llama ] || python3 -m hfalign build-tiny models/tiny-llama > "$OUT/0-build.log" 2>&1
if [ "$part" = main ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/0-gpu.log" 2>&1
  python3 -c "import torch, transformers, trl, peft, deepspeed; print(torch.__version__, transformers.__version__, trl.__version__, peft.__version__, deepspeed.__version__)" >> "$OUT/0-gpu.log" 2>&1
  for s in sft rm ppo; do
    t=$SECONDS; timeout 150 python3 -m hfalign "recipes/$s.yaml" >> "$OUT/1-default.log" 2>&1
    echo "== $s rc=$? $((SECONDS - t)) s" >> "$OUT/1-default.log"
  done
  timeout 200 python3 benchmarks/ppo_gpu.py --trl-path .trl112 > "$OUT/2-vs-trl.log" 2>&1
  timeout 90 python3 benchmarks/ppo_memory.py --device cuda --baseline none --prompt-tokens 512 --new-tokens 512 \
    > "$OUT/3-memory-152k.log" 2>&1
  timeout 90 python3 -m hfalign recipes/ppo.yaml output_dir=/tmp/lora-gc model.name_or_path=models/tiny-llama \
    model.adapter=null lora.enabled=true model.dtype=bfloat16 train.bf16=true train.activation_checkpointing=true \
    reward.model=null reward.function=hfalign.demo.task:positivity_reward train.total_episodes=128 \
    > "$OUT/4-lora-bf16-gc-rewardfn.log" 2>&1
  timeout 120 python3 -m accelerate.commands.launch --config_file accelerate_configs/zero3.yaml --num_processes 1 \
    --mixed_precision bf16 -m hfalign recipes/ppo.yaml output_dir=/tmp/z3 train.total_episodes=128 \
    > "$OUT/5-zero3-bf16.log" 2>&1
elif [ "$part" = lora ]; then
  python3 -m hfalign build-tiny models/tiny-llama-base --pretrain 300 > "$OUT/0-build.log" 2>&1
  for v in "" -qlora; do
    gpu=""; [ "$v" = -qlora ] && gpu="quantization.compute_dtype=bfloat16 train.bf16=true"
    for s in sft rm ppo; do
      t=$SECONDS; timeout 150 python3 -m hfalign "recipes/lora/$s$v.yaml" $gpu >> "$OUT/7-lora$v.log" 2>&1
      echo "== $s$v rc=$? $((SECONDS - t)) s" >> "$OUT/7-lora$v.log"
    done
  done
else
  timeout 60 python3 benchmarks/ppo_memory.py --device cuda --baseline none --prompt-tokens 512 --new-tokens 512 \
    > "$OUT/3-memory-152k.log" 2>&1
  timeout 120 python3 -m hfalign recipes/sft.yaml output_dir=/tmp/qsft model.name_or_path=models/tiny-llama \
    lora.enabled=true quantization.load_in_4bit=true model.dtype=bfloat16 train.bf16=true train.max_steps=20 \
    > "$OUT/6-qlora.log" 2>&1
  timeout 120 python3 -m hfalign recipes/ppo.yaml output_dir=/tmp/qlora model.name_or_path=models/tiny-llama \
    model.adapter=null lora.enabled=true quantization.load_in_4bit=true model.dtype=bfloat16 train.bf16=true \
    reward.model=null reward.function=hfalign.demo.task:positivity_reward train.total_episodes=128 \
    >> "$OUT/6-qlora.log" 2>&1
  timeout 150 python3 benchmarks/ppo_gpu.py --trl-path none --episodes 256 > "$OUT/2-hfalign-0.7b.log" 2>&1
fi
for f in "$OUT"/*.log; do echo "== $f"; tail -n 4 "$f"; done
