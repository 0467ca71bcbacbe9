#!/usr/bin/env bash
# The GPU checks, as one script for the lent H200 (see benchmarks/README.md for the figures it produced).
# Needs the wheels of opacus, webdataset and braceexpand in .whl/ (the GPU image has torch, timm, accelerate).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, accelerate, opacus; print('torch', torch.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__, 'opacus', opacus.__version__)" | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
timeout 240 python3 benchmarks/real_config_run.py --config vit_b16_cifar10 --num-train 4000 \
    privacy.epochs=2 privacy.expected_batch_size=500 performance.micro_batch_size=128 2>&1 | tail -40 | tee "$OUT/vit_b16.log"
