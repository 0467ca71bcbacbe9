#!/usr/bin/env bash
# GPU checks of the DP-Mix methods (issue 6), one script for a lent H200 (figures in benchmarks/README.md):
#   the `gpu` tests (test_augment: groups and grouped clipping on CUDA; test_gpu: the earlier tier, as a regression),
#   then the vit_b16_cifar10 config end to end in bf16 with dpsgd, self_aug (K = 16) and dpmix_self (K = 16, M = 18,
#   the paper's sizes): seconds per DP step and group members per second.
# Needs the wheels of opacus, webdataset and braceexpand in .whl/ (the GPU image has torch, timm, accelerate).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 170 python3 -m pytest -q -m gpu tests/test_augment.py tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
run() {  # name, then overrides
  local name=$1; shift
  timeout 100 python3 benchmarks/real_config_run.py --config vit_b16_cifar10 --num-train 2000 --num-test 200 \
      privacy.epochs=1 privacy.expected_batch_size=250 performance.precision=bf16 "$@" 2>&1 | tail -12 | tee "$OUT/$name.log"
}
run dpsgd performance.micro_batch_size=128
run self_aug augment.method=self_aug augment.num_views=16 performance.micro_batch_size=16
run dpmix_self augment.method=dpmix_self augment.num_views=16 augment.num_mixes=18 performance.micro_batch_size=8
