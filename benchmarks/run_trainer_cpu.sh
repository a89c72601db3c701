#!/usr/bin/env bash
# The trainer's CPU measurements, one after the other on a quiet machine, each with its raw log:
#   1. transmix-train vs timm's train.py (benchmarks/trainer_vs_timm.py: folder and Hugging Face data,
#      ROUNDS rounds alternating, EPOCHS epochs a run);
#   2. the demo (transmix-train with no arguments) with SEEDS seeds: final and best val top-1;
#   3. the fine-tuning demo (python/finetune_demo.py).
#
#   TIMM_TRAIN=/path/to/pytorch-image-models/train.py bash benchmarks/run_trainer_cpu.sh
#
# Expected on the 2-core development VM when idle: about 12 min for 1 (3 rounds, 20 epochs), 11 min
# for 2 (3 seeds), 2 min for 3. DEST (default benchmarks/results/<date>-trainer-cpu-<commit>/) gets
# machine.txt, load.txt (uptime before and after each part) and every log; STEPS=1,2,3 picks parts.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TIMM_TRAIN:?set TIMM_TRAIN to the train.py of a pytorch-image-models checkout}"
ROUNDS=${ROUNDS:-3} EPOCHS=${EPOCHS:-20} SEEDS=${SEEDS:-"0 1 2"} STEPS=${STEPS:-1,2,3}
COMMIT=$(git rev-parse --short HEAD)
DEST=${DEST:-benchmarks/results/$(date -u +%F)-trainer-cpu-$COMMIT}
mkdir -p "$DEST"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

load() { echo "== $1 ($(date -u +%FT%TZ)): $(uptime)" >>"$DEST/load.txt"; }
{
  echo "commit: $(git rev-parse HEAD)"
  git status --porcelain --untracked-files=no | sed 's/^/  changed: /'
  lscpu | grep -E 'Model name|^CPU\(s\)'
  python -c 'import torch, timm; print("torch", torch.__version__, "threads", torch.get_num_threads(), "timm", timm.__version__)'
  echo "timm train.py: $TIMM_TRAIN"
} >"$DEST/machine.txt" 2>&1

if [[ ",$STEPS," == *",1,"* ]]; then
  load "before trainer vs timm"
  python benchmarks/trainer_vs_timm.py --timm-train "$TIMM_TRAIN" --rounds "$ROUNDS" --epochs "$EPOCHS" \
    --out "$DEST/trainer-vs-timm" >"$DEST/trainer-vs-timm.log" 2>&1
  load "after trainer vs timm"
fi
if [[ ",$STEPS," == *",2,"* ]]; then
  for seed in $SEEDS; do
    load "before demo seed $seed"
    /usr/bin/time -f "wall %e s" transmix-train --seed "$seed" --output "$WORK/demo-seed$seed" >"$DEST/demo-seed$seed.log" 2>&1
    cp "$WORK/demo-seed$seed/metrics.csv" "$DEST/demo-seed$seed-metrics.csv"
    load "after demo seed $seed"
  done
fi
if [[ ",$STEPS," == *",3,"* ]]; then
  load "before finetune demo"
  /usr/bin/time -f "wall %e s" python python/finetune_demo.py --output "$WORK/finetune" >"$DEST/finetune-demo.log" 2>&1
  load "after finetune demo"
fi
echo "done: $DEST"
