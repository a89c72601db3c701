"""A transmix-train run small enough for a test on a shared 2-core CPU.

The demo config (digits, TransMix, RandAugment) with a 2-block, width-32 DeiT at 16 px, batch
16, two steps and two val batches per epoch.
"""

from __future__ import annotations

import csv
from pathlib import Path

TINY = [
    "--device", "cpu", "--workers", "0", "--img-size", "16",
    "--model-kwargs", "img_size=16", "patch_size=4", "embed_dim=32", "depth=2", "num_heads=2",
    "--batch-size", "16", "--limit-train-batches", "2", "--limit-val-batches", "2", "--log-interval", "1",
]
# The metrics an exact resume must reproduce (throughput and wall time naturally differ).
EXACT_FIELDS = ("epoch", "train_loss", "lr", "val_loss", "val_top1", "val_top5", "ema_top1")


def read_metrics(output: Path) -> list[dict[str, str]]:
    with open(Path(output) / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))
