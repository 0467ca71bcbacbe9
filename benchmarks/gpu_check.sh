#!/usr/bin/env bash
# The GPU checks, as one script for a lent H200 (figures in benchmarks/README.md):
#   the `gpu` test tier, bench_step.py on ViT-B/16 224 px in bf16, the vit_b16_cifar10 config end to end (bf16), and
#   the same config under ZeRO-2 against the replicated path with Adam (issue 14: step time, peak memory, state size).
# Needs the wheels of opacus, webdataset and braceexpand in .whl/ (the GPU image has torch, timm, accelerate).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, accelerate, opacus; print('torch', torch.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__, 'opacus', opacus.__version__)" | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
timeout 200 python3 benchmarks/bench_step.py --device cuda --precision bf16 --cases vit_b16_224px --steps 5 \
    --timeout 60 2>&1 | tee "$OUT/bench_vit_b16_bf16.log"
timeout 120 python3 benchmarks/real_config_run.py --config vit_b16_cifar10 --num-train 4000 \
    privacy.epochs=2 privacy.expected_batch_size=500 performance.micro_batch_size=128 performance.precision=bf16 \
    2>&1 | tail -30 | tee "$OUT/vit_b16_config.log"
# ZeRO-2 (performance.zero_stage=2, i.e. what configs/accelerate/deepspeed_zero2.yaml selects) vs replicated, one GPU,
# ViT-B/16 random init, bf16, Adam: seconds_per_step, peak_device_memory_bytes, optimizer_state_bytes_per_rank.
for stage in 0 2; do
  timeout 150 python3 benchmarks/real_config_run.py --config vit_b16_cifar10 --num-train 4000 \
      privacy.epochs=2 privacy.expected_batch_size=500 performance.micro_batch_size=128 performance.precision=bf16 \
      optim.name=adam optim.lr=0.0005 optim.momentum=null performance.zero_stage=$stage \
      2>&1 | tail -3 | tee "$OUT/vit_b16_zero$stage.log"
done
