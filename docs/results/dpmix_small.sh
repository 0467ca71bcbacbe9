#!/usr/bin/env bash
# The DP-Mix comparison on the 2,000-example private subset (docs/results.md), stage by stage. Every stage is a
# restartable launch/sweep.py call: run the script again and finished runs are skipped.
#   bash docs/results/dpmix_small.sh tune      # settings chosen on the PUBLIC validation split (never the test set)
#   SEEDS=1,2 TAG=-reps12 bash docs/results/dpmix_small.sh tune-lr   # two more replicates of each lr choice
#   SEEDS=1,2 TAG=-reps12 bash docs/results/dpmix_small.sh tune-crop # and of each crop choice
#   bash docs/results/dpmix_small.sh table     # the reported runs: 3 replicates, test split evaluated once per run
#   bash docs/results/dpmix_small.sh crop-check  # ε = 1 at the crop 3 replicates pick, beside the table
#   bash docs/results/dpmix_small.sh spot      # the paper's K = M = 16 (S = 8) at ε = 1, one replicate
#   SEEDS=1,2 bash docs/results/dpmix_small.sh spot   # two more replicates of it
# METHODS=a,b limits a stage to those methods; TAG=-x suffixes the tuning folders (the 2026-11-29 runs: `tune` with
# METHODS=dpsgd,self_aug,dpmix_self, then METHODS=dpmix_diff TAG=-dpmix_diff once `make synthetic` had finished;
# pick_settings.py reads both).
# bash reads this file as it runs: editing it during a stage breaks that stage (run a copy for long stages).
# Needs `make data` and `make synthetic` (dpmix_diff). Output: runs/dpmix-small/, CSVs copied to docs/results/.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=runs/dpmix-small
export HF_HUB_OFFLINE=1
# The group of each method at the table's sizes (K views, S synthetic images, M mixes): the largest that two CPU
# cores afford for 3 replicates × 3 ε (a run costs one frozen forward per member, ~1,500 members/s at 32 px).
SIZES=(self_aug:augment.num_views=4
        dpmix_self:augment.num_views=4 dpmix_self:augment.num_mixes=4
        dpmix_diff:augment.num_views=4 dpmix_diff:augment.num_synthetic=4 dpmix_diff:augment.num_mixes=4
        dpmix_diff:augment.synthetic_root=data/fmnist_synthetic)
METHODS=${METHODS:-dpsgd,self_aug,dpmix_self,dpmix_diff}
sweep() { $PY launch/sweep.py --config fmnist_dpmix_small "$@"; }
sizes() {  # the SIZES entries of the methods in $1 (the sweep refuses overrides for methods it does not run), and
  # $crop for those that augment (dpsgd makes no views: the config refuses a crop for it)
  local e; for e in "${SIZES[@]}"; do [[ ",$1," == *",${e%%:*},"* ]] && echo "$e"; done
  for e in self_aug dpmix_self dpmix_diff; do [[ ",$1," == *",$e,"* ]] && echo "$e:augment.crop_padding_fraction=$crop"; done
  true
}

tune_crop() {  # crop padding (a fraction of the input side), chosen for every augmenting method with self_aug;
  # $1: replicate labels, $2: folder suffix
  for crop in 0 0.03 0.125; do
    sweep --epsilons 1 --methods self_aug --seeds "$1" --output-dir "$OUT/tune-crop-$crop$2" \
      data.eval_split=validation $(sizes self_aug)
  done
}
tune_lr() {  # the learning rate: the same three choices for every method, at the chosen crop (pick_settings.py
  # averages tune-lr-LR and tune-lr-LR-*); $1: replicate labels, $2: folder suffix
  crop=$($PY docs/results/pick_settings.py crop "$OUT")
  for lr in 1 3 9; do
    sweep --epsilons 1 --methods "$METHODS" --seeds "$1" --output-dir "$OUT/tune-lr-$lr$2" \
      data.eval_split=validation optim.lr=$lr $(sizes "$METHODS")
  done
}

case "${1:-}" in
tune)  # one replicate per choice; TAG suffixes the lr folders only (the crop sweeps run once)
  tune_crop 0 ""
  tune_lr 0 "${TAG:-}"
  $PY docs/results/pick_settings.py show "$OUT" ;;
tune-crop)  # more replicates of the crop choice (the 2026-11-30 runs: SEEDS=1,2 TAG=-reps12)
  tune_crop "${SEEDS:-0}" "${TAG:-}"
  $PY docs/results/pick_settings.py show "$OUT" ;;
tune-lr)  # more replicates of the lr choice (2026-11-30: SEEDS=1,2 TAG=-reps12, every method: 3 replicates each)
  tune_lr "${SEEDS:-0}" "${TAG:-}"
  $PY docs/results/pick_settings.py show "$OUT" ;;
table)
  crop=$($PY docs/results/pick_settings.py crop "$OUT")
  for eps in 1 8 2; do  # ε = 1 first: the verdict's point
    for method in ${METHODS//,/ }; do
      lr=$($PY docs/results/pick_settings.py lr "$OUT" "$method")
      extra=()
      [ "$method" = dpsgd ] && [ "$eps" = 1 ] && extra=(--non-private dpsgd)
      sweep --epsilons $eps --methods "$method" --seeds 0,1,2 "${extra[@]}" --output-dir "$OUT/table-$method-eps$eps" \
        optim.lr=$lr $(sizes "$method")
    done
  done ;;
crop-check)
  # ε = 1 at the crop that pick_settings.py now picks (3 replicates per crop: 1 px), each method at its chosen
  # rate (tuned at crop 0): a sensitivity row beside the table, in folders summarize.py reports apart
  crop=$($PY docs/results/pick_settings.py crop "$OUT")
  for method in self_aug dpmix_self dpmix_diff; do
    lr=$($PY docs/results/pick_settings.py lr "$OUT" "$method")
    sweep --epsilons 1 --methods "$method" --seeds 0,1,2 --output-dir "$OUT/sensitivity-crop$crop-$method" \
      optim.lr=$lr $(sizes "$method")
  done ;;
spot)
  # SEEDS=1,2 adds replicates in their own folders (spot-METHOD-reps12: a sweep's folder keeps its combinations)
  crop=$($PY docs/results/pick_settings.py crop "$OUT")
  seeds=${SEEDS:-0}; suffix=""; [ "$seeds" != 0 ] && suffix="-reps${seeds//,/}"
  for method in dpmix_diff self_aug dpmix_self; do
    lr=$($PY docs/results/pick_settings.py lr "$OUT" "$method")
    extra=(augment.num_views=16)  # one method per sweep: plain overrides (scoped ones for absent methods are refused)
    case $method in
      dpmix_self) extra+=(augment.num_mixes=16) ;;
      dpmix_diff) extra+=(augment.num_mixes=16 augment.num_synthetic=8 augment.synthetic_root=data/fmnist_synthetic) ;;
    esac
    sweep --epsilons 1 --methods "$method" --seeds "$seeds" --output-dir "$OUT/spot-$method$suffix" optim.lr=$lr \
      augment.crop_padding_fraction=$crop "${extra[@]}"
  done ;;
*) echo "usage: $0 tune|tune-crop|tune-lr|table|crop-check|spot" >&2; exit 2 ;;
esac
