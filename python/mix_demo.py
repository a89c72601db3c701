"""Mix one real batch with TransMix and show what happened.

    python python/mix_demo.py                      # DeiT-Tiny (random init), 32 images of shapes-10
    python python/mix_demo.py --mode elem --model swin_tiny_patch4_window7_224 --save mixed.png

A batch of the embedded shapes-10 data is mixed in place, the model runs on the mixed images
with a ClassAttentionProbe attached (fused attention stays on), and the script prints the
boxes, the area lambda, the attention lambda and the soft targets TransMix gives each sample.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
from timm.loss import SoftTargetCrossEntropy

import transmix_kernels as tk
from transmix_train.shapes import CLASSES, make_shapes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_tiny_patch16_224", help="a timm model name (random init)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--mode", default="batch", choices=["batch", "pair", "elem"])
    parser.add_argument("--mixup-alpha", type=float, default=0.0, help="0: every batch is CutMix (TransMix)")
    parser.add_argument("--cutmix-alpha", type=float, default=1.0)
    parser.add_argument("--source", default="last", help='"last", "rollout" or a block index')
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=6, help="samples to print")
    parser.add_argument("--save", default=None, help="write the mixed batch to this PNG")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    images, labels = make_shapes(args.batch_size, args.img_size, seed=args.seed)
    images, labels = images.to(device), labels.to(device)
    model = timm.create_model(args.model, pretrained=False, num_classes=len(CLASSES), img_size=args.img_size)
    model = model.to(device).train()
    source = int(args.source) if args.source.lstrip("-").isdigit() else args.source

    transmix = tk.TransMix(
        len(CLASSES), mixup_alpha=args.mixup_alpha, cutmix_alpha=args.cutmix_alpha, mode=args.mode,
        model=model, seed=args.seed,
    )
    start = time.perf_counter()
    images, mix = transmix(images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    mix_ms = (time.perf_counter() - start) * 1e3

    with tk.ClassAttentionProbe(model, source=source) as probe:
        logits = model(images)
        attention = probe.attention()
        token_grid = probe.token_grid
        targets = mix.targets(probe)
    area_targets = mix.targets()
    loss = SoftTargetCrossEntropy()(logits, targets)
    loss.backward()
    loss = loss.detach()

    print(f"{tk.__name__} {tk.__version__} | model {args.model} | device {device} | impl auto")
    print(f"batch {tuple(images.shape)} mode={args.mode} drew: {mix.kind}; mixing took {mix_ms:.2f} ms")
    print(f"attention: {tuple(attention.shape)} over token grid {token_grid}, source={source!r}")
    print(f"{'i':>3} {'mix':>6} {'label':>8} {'partner':>8} {'box [y0,y1,x0,x1]':>22} {'lam_area':>9} {'lam':>7}")
    lam_used = mix.lambdas(attention)
    for i in range(min(args.show, len(labels))):
        box = mix.boxes[i].tolist()
        own = CLASSES[int(labels[i])]
        other = CLASSES[int(labels[mix.partner[i]])]
        drawn = "cutmix" if bool(mix.cutmix[i]) else ("mixup" if float(mix.lam[i]) < 1 else "none")
        print(f"{i:>3} {drawn:>6} {own:>8} {other:>8} {str(box):>22} {float(mix.lam_area[i]):>9.4f} "
              f"{float(lam_used[i]):>7.4f}")
    moved = (targets - area_targets).abs().sum(1).max()
    print(f"largest change of a target row by attention re-weighting: {float(moved):.4f}")
    print(f"soft-target cross-entropy: {loss.item():.4f} (backward ran)")
    if args.save:
        import torchvision.utils

        torchvision.utils.save_image((images.detach().float().cpu() * 0.3 + 0.35).clamp(0, 1), args.save, nrow=8)
        print(f"saved the mixed batch to {args.save}")


if __name__ == "__main__":
    main()
