#!/usr/bin/env bash
# The GPU checks, as calls for the device machine (../shared/GPU.md), run from the repository root there. Carry .whl
# from benchmarks/gpu_wheels.sh (../shared/gpu/fetch_wheels.sh plus what transformers 5.25 and pytest need).
#   bash benchmarks/gpu_check.sh main    carry .whl (../shared/gpu/fetch_wheels.sh) and .trl112
#                                        (pip install --no-deps --target .trl112 trl==1.12.0); includes the host-sync
#                                        check of one update (benchmarks/sync_check.py, 1-sync.log)
#   bash benchmarks/gpu_check.sh qlora   carry .whl and .bnb (bitsandbytes; 61 MiB together): QLoRA, the 152k-vocab
#                                        memory case, then hfalign alone on the 0.7B benchmark
#   bash benchmarks/gpu_check.sh lora    carry .whl and .bnb: recipes/lora and its -qlora variant (bf16 compute, CUDA
#                                        4-bit kernels) end to end on the pretrained tiny base; does LoRA learn there?
#   bash benchmarks/gpu_check.sh estimators   carry .whl: GAE vs RLOO vs GRPO on the 0.7B case (episodes/s, peak
#                                        memory: what dropping the critic saves), then recipes/rloo.yaml and grpo.yaml
#   bash benchmarks/gpu_check.sh trl     carry .whl and .trl112: TRL 1.12 vs hfalign with TRL's settings on the default
#                                        pipeline (benchmarks/trl_parity.py), then TRL's ppo.py example (one import
#                                        changed) on the tiny model, on the GPU
#   bash benchmarks/gpu_check.sh speed   carry .whl (+ pytest wheels) and .trl112: the CUDA-graph tests (decode step,
#                                        update micro-step), the 0.7B case with the update graphed / op by op / TRL
#                                        1.12, the verl-shaped 0.5B Qwen2 case (256 x 256 tokens) graphed / op by op
#   bash benchmarks/gpu_check.sh graphs  carry .whl: the update's micro-step as a CUDA graph -- its GPU tests, the 0.7B
#                                        case with the update op by op vs graphed, a profile of both
#   bash benchmarks/gpu_check.sh speed2  carry .whl: a profile of two PPO updates hf vs static, the default pipeline
#                                        on the GPU (generation: auto = static), ZeRO-3 bf16 and LoRA bf16 with it
# One log per check under $OUT (at most 8 files come back).
set -u
OUT=${OUT:-/tmp/hfalign-gpu}; mkdir -p "$OUT"
part=${1:-main}
rm -rf .site  # kept from an earlier call on a warm machine: a --target install would not replace what is there
python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl
[ "$part" = qlora ] || [ "$part" = lora ] && python3 -m pip install -q --no-index --no-deps --no-compile --target .site .bnb/*.whl
# USE_HUB_KERNELS=0: transformers 5.25 asks for the `kernels` package on CUDA, which the machine lacks
export PYTHONPATH=$PWD/.site:$PWD/src DS_ACCELERATOR=cuda HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 USE_HUB_KERNELS=0
[ -d models/tiny-llama ] || python3 -m hfalign build-tiny models/tiny-llama > "$OUT/0-build.log" 2>&1
if [ "$part" = main ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/0-gpu.log" 2>&1
  python3 -c "import torch, transformers, trl, peft, deepspeed; print(torch.__version__, transformers.__version__, trl.__version__, peft.__version__, deepspeed.__version__)" >> "$OUT/0-gpu.log" 2>&1
  for s in sft rm ppo; do
    t=$SECONDS; timeout 150 python3 -m hfalign "recipes/$s.yaml" >> "$OUT/1-default.log" 2>&1
    echo "== $s rc=$? $((SECONDS - t)) s" >> "$OUT/1-default.log"
  done
  timeout 120 python3 benchmarks/sync_check.py --sft outputs/sft --rm outputs/rm > "$OUT/1-sync.log" 2>&1
  echo "== rc=$?" >> "$OUT/1-sync.log"
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
elif [ "$part" = speed ]; then
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
    # the xfail bf16-LoRA recording test last (a failed capture can spoil CUDA's RNG for the rest of the process)
    timeout 100 python3 -m pytest -q -p no:cacheprovider --tb=short --show-capture=no -rxX tests/test_generation.py \
      tests/test_update_graphs.py -k cuda; echo "== pytest rc=$?"; } > "$OUT/0-env.log" 2>&1
  # op by op first: the first process of a device call pays a cold start (docs/benchmarks.md)
  timeout 230 python3 benchmarks/ppo_gpu.py --episodes 256 --generation static --update-graphs off on --trl-path .trl112 \
    > "$OUT/2-ppo-0.7b.log" 2>&1; echo "== rc=$?" >> "$OUT/2-ppo-0.7b.log"
  timeout 130 python3 benchmarks/ppo_gpu.py --size 0.5b --preset verl --new-tokens 256 --episodes 256 \
    --generation static --update-graphs off on --trl-path none > "$OUT/3-ppo-0.5b-verl.log" 2>&1
  echo "== rc=$?" >> "$OUT/3-ppo-0.5b-verl.log"
elif [ "$part" = graphs ]; then
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
    timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short --show-capture=no -rxX tests/test_generation.py \
      tests/test_update_graphs.py -k cuda 2>&1 | tail -n 60
    echo "== pytest rc=$?"; } > "$OUT/0-tests.log" 2>&1
  timeout 200 python3 benchmarks/ppo_gpu.py --episodes 256 --generation static --update-graphs off on --trl-path none \
    > "$OUT/1-update-graphs-0.7b.log" 2>&1; echo "== rc=$?" >> "$OUT/1-update-graphs-0.7b.log"
  timeout 100 python3 benchmarks/ppo_gpu.py --episodes 128 --generation static --update-graphs off on --trl-path none \
    --profile "$OUT/2-profile.log" > "$OUT/2-profile-run.log" 2>&1; echo "== rc=$?" >> "$OUT/2-profile-run.log"
elif [ "$part" = speed2 ]; then
  timeout 100 python3 benchmarks/gen_speed.py --calls 1 --profile generate-owned static-graphs > "$OUT/1-gen-speed.log" 2>&1
  echo "== rc=$?" >> "$OUT/1-gen-speed.log"
  for s in sft rm ppo; do
    t=$SECONDS; timeout 100 python3 -m hfalign "recipes/$s.yaml" >> "$OUT/5-default.log" 2>&1
    echo "== $s rc=$? $((SECONDS - t)) s" >> "$OUT/5-default.log"
  done
  t=$SECONDS; timeout 80 python3 -m accelerate.commands.launch --config_file accelerate_configs/zero3.yaml --num_processes 1 \
    --mixed_precision bf16 -m hfalign recipes/ppo.yaml output_dir=/tmp/z3 train.total_episodes=256 > "$OUT/6-zero3-lora.log" 2>&1
  echo "== zero3 rc=$? $((SECONDS - t)) s" >> "$OUT/6-zero3-lora.log"
  t=$SECONDS; timeout 80 python3 -m hfalign recipes/ppo.yaml output_dir=/tmp/lora-gc model.name_or_path=models/tiny-llama \
    model.adapter=null lora.enabled=true model.dtype=bfloat16 train.bf16=true reward.model=null \
    reward.function=hfalign.demo.task:positivity_reward train.total_episodes=256 >> "$OUT/6-zero3-lora.log" 2>&1
  echo "== lora rc=$? $((SECONDS - t)) s" >> "$OUT/6-zero3-lora.log"
elif [ "$part" = trl ]; then
  for s in sft rm; do timeout 120 python3 -m hfalign "recipes/$s.yaml" >> "$OUT/8-pipeline.log" 2>&1; done
  timeout 200 python3 benchmarks/trl_parity.py --trl-path .trl112 --episodes 1280 > "$OUT/8-trl-parity.log" 2>&1
  python3 -m hfalign build-tiny /tmp/qwen --family qwen2 > /dev/null 2>&1  # spare embedding rows: ppo.py adds [PAD]
  python3 -c "from transformers import AutoModelForSequenceClassification as A, AutoTokenizer as T; m = A.from_pretrained('/tmp/qwen', num_labels=1); m.config.pad_token_id = T.from_pretrained('/tmp/qwen').pad_token_id; m.save_pretrained('/tmp/qwen-rm')" > /dev/null 2>&1
  mkdir -p /tmp/desc/data && python3 -c "import json; rows = [json.loads(l) for l in open('data/ppo_prompts.jsonl')]; open('/tmp/desc/data/descriptiveness-00000-of-00001.jsonl', 'w').writelines(json.dumps(r) + '\\n' for r in rows)"
  timeout 150 python3 tests/trl_examples/ppo.py --dataset_name /tmp/desc --dataset_train_split descriptiveness \
    --output_dir /tmp/trl-example --per_device_train_batch_size 4 --total_episodes 16 --model_name_or_path /tmp/qwen \
    --sft_model_path /tmp/qwen --reward_model_path /tmp/qwen-rm --missing_eos_penalty 1.0 --response_length 16 \
    --bf16 true --report_to none > "$OUT/9-trl-example.log" 2>&1
elif [ "$part" = estimators ]; then
  timeout 300 python3 benchmarks/ppo_gpu.py --trl-path none --episodes 256 --estimators gae rloo grpo \
    > "$OUT/10-estimators-0.7b.log" 2>&1
  for s in sft rm rloo grpo; do
    t=$SECONDS; timeout 120 python3 -m hfalign "recipes/$s.yaml" >> "$OUT/11-estimator-recipes.log" 2>&1
    echo "== $s rc=$? $((SECONDS - t)) s" >> "$OUT/11-estimator-recipes.log"
  done
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
