"""Train, then fine-tune from the checkpoint at another image size, on the embedded digits.

    python python/finetune_demo.py                       # about a minute on an idle 2-core CPU
    python python/finetune_demo.py --output out/ft-demo --pretrain-epochs 20 --finetune-epochs 5

Three ``transmix-train`` runs (TransMix on, the demo's recipe, a small DeiT with 4x4 px patches):

1. pre-train at 16 px (a 4x4 token grid) from random weights;
2. fine-tune at 32 px (8x8 tokens) with ``--pretrained-path <1>/best.pth``: timm's checkpoint
   filter resamples the position embedding 4x4 -> 8x8 and every other weight is the checkpoint's,
   with a quarter of the pre-training lr and no warm-up (the step DeiT takes from 224 to 384 px);
3. the same 32 px model, same epochs, from random weights: what the pre-training bought.

It prints each run's val top-1 per epoch and a summary; the runs' folders (metrics.csv, curves,
checkpoints) stay under ``--output``.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from transmix_train.main import main as train

# The demo.yaml recipe (digits, TransMix, no flips, mild RandAugment) on a smaller, 4-px-patch DeiT.
MODEL = ["--model-kwargs", "patch_size=4", "embed_dim=64", "depth=4", "num_heads=4", "--drop-path", "0.0"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="output/finetune-demo", help="folder of the three runs (must be new)")
    parser.add_argument("--pretrain-epochs", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    return parser.parse_args()


def _run(name: str, output: Path, size: int, epochs: int, extra: list[str], device: str | None) -> list[dict]:
    folder = output / name
    argv = ["--data", "digits", "--img-size", str(size), *MODEL, "--model-kwargs", f"img_size={size}",
            "--epochs", str(epochs), "--log-interval", "1000", "--output", str(folder), *extra]
    if device:
        argv += ["--device", device]
    print(f"\n== {name}: digits at {size} px, {epochs} epochs {' '.join(extra)}", flush=True)
    train(argv)
    with open(folder / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def main() -> None:
    args = parse_args()
    output = Path(args.output)
    started = time.time()
    pretrain = _run("pretrain-16px", output, 16, args.pretrain_epochs, ["--warmup-epochs", "2"], args.device)
    finetune_recipe = ["--warmup-epochs", "0", "--lr-base", "2.0e-3"]  # 1/4 of demo.yaml's 8e-3 per 512
    finetune = _run("finetune-32px", output, 32, args.finetune_epochs,
                    [*finetune_recipe, "--pretrained-path", str(output / "pretrain-16px" / "best.pth")], args.device)
    scratch = _run("scratch-32px", output, 32, args.finetune_epochs, ["--warmup-epochs", "0"], args.device)

    def curve(rows: list[dict]) -> str:
        return " ".join(f"{float(row['val_top1']):.1f}" for row in rows)

    print(f"\nval top-1 (%) per epoch, digits val ({args.finetune_epochs} epochs at 32 px each):")
    print(f"  pre-trained at 16 px ({args.pretrain_epochs} epochs): {curve(pretrain)}")
    print(f"  fine-tuned at 32 px from its best.pth:   {curve(finetune)}")
    print(f"  from scratch at 32 px:                   {curve(scratch)}")
    print(f"total wall time {time.time() - started:.0f} s; runs in {output}/")


if __name__ == "__main__":
    main()
