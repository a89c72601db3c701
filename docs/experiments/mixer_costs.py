"""What each mixer costs per batch, beside a training step of the same model (CPU, one thread).

    OMP_NUM_THREADS=1 python docs/experiments/mixer_costs.py > docs/experiments/mixer_costs.md

The model and batch are the CPU-scale grids' (python/transmix_train/configs/grids/cpu_scale.yaml): a 6-block,
width-64 DeiT on 32 px shapes, batch 64. Attentive-CutMix's extractor is an untrained resnet18
(its cost does not depend on its weights). Medians of ``--repeats`` calls after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
from timm.loss import SoftTargetCrossEntropy

import transmix_kernels as tk
from transmix_train.mixers.attentive import AttentiveCutMix, CellScorer
from transmix_train.mixers.puzzle import PuzzleMix
from transmix_train.mixers.saliency import SaliencyMix
from transmix_train.shapes import make_shapes

__all__ = ["main"]


def _median_seconds(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    images, labels = make_shapes(args.batch, 32, seed=0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=2,
                              num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters())
    criterion = SoftTargetCrossEntropy()
    extractor = timm.create_model("resnet18", num_classes=10)
    mixers = {
        "CutMix (tk.TransMix, area labels)": tk.TransMix(10, mixup_alpha=0.0, cutmix_alpha=1.0, seed=0),
        "SaliencyMix": SaliencyMix(10, mixup_alpha=0.0, seed=0),
        "Attentive-CutMix (resnet18 extractor)": AttentiveCutMix(10, CellScorer(extractor), mixup_alpha=0.0, seed=0),
        "Puzzle-Mix (saliency pass + mask solver)": PuzzleMix(10, model, mixup_alpha=0.0, seed=0),
    }

    def step() -> None:
        loss = criterion(model(images), tk.mix_targets(labels, torch.ones(args.batch), 10))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step_s = _median_seconds(step, args.repeats)
    print(f"Batch {args.batch} of 32 px images, {torch.get_num_threads()} thread(s), median of {args.repeats}.\n")
    print("| mixer | ms per batch | share of a training step |")
    print("| --- | --- | --- |")
    print(f"| (training step: forward, backward, AdamW) | {step_s * 1e3:.1f} | 1.00 |")
    for name, mixer in mixers.items():
        seconds = _median_seconds(lambda: mixer(images.clone(), labels), args.repeats)
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / step_s:.2f} |")
    extra = sum(p.numel() for p in extractor.parameters())
    print(f"\nAttentive-CutMix's extractor adds {extra / 1e6:.2f}M parameters "
          f"(the DeiT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M).")


if __name__ == "__main__":
    main()
