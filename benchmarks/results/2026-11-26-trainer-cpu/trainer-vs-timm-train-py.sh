#!/bin/bash
# Interleaved throughput comparison on the same loaded machine: timm train.py vs transmix-train,
# same model (DeiT depth 6 width 128 patch 4 at 32 px), batch 128, 2 epochs each, twice.
. /work/main/.venv/bin/activate
MODEL="img_size=32 patch_size=4 embed_dim=128 depth=6 num_heads=4"
for round in q1; do
  rm -rf /tmp/cmp_timm$round /tmp/cmp_ours$round
  echo "== round $round timm $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  (cd /tmp/timmtrain && python train.py --data-dir /tmp/digits_folder --val-split val --model deit_tiny_patch16_224 \
     --model-kwargs $MODEL --input-size 3 32 32 --num-classes 10 -b 128 --epochs 2 --opt adamw --lr 1e-3 \
     --mixup 0.8 --cutmix 1.0 --smoothing 0.1 --hflip 0 --device cpu --output /tmp/cmp_timm$round --log-interval 5 2>&1 \
     | grep "Train:" | tail -3)
  echo "== round $round ours $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  (cd /tmp && transmix-train --model-kwargs $MODEL --batch-size 128 --lr 1e-3 --epochs 2 --warmup-epochs 1 --aa none \
     --crop-scale 0.08 1.0 --crop-ratio 0.75 1.3333 --output /tmp/cmp_ours$round 2>&1 | tail -2)
  cat /tmp/cmp_ours$round/metrics.csv
done
echo "== done $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
