"""The trainer's digits split written as data both trainers read: an ImageFolder and a Hugging Face dataset.

    python benchmarks/export_digits.py folder OUT   # OUT/train/<class>/*.png, OUT/val/<class>/*.png
    python benchmarks/export_digits.py hf OUT       # OUT/data/{train,validation}-00000-of-00001.parquet

Both hold exactly the images and split of ``transmix-train --data digits`` (1,438 train / 359 val,
32x32 RGB PNG), so timm's ``train.py`` and ``transmix-train`` can be given the same files. The
Hugging Face form is parquet with an ``image`` column and a ``label`` ClassLabel: what
``datasets.load_dataset(OUT)`` reads, held in memory by Arrow (timm's and our ``--dataset hfds/OUT``).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image

from transmix_train.config import parse_args
from transmix_train.data import create_datasets

CLASS_NAMES = [str(digit) for digit in range(10)]


def _splits():
    train, val, _ = create_datasets(parse_args(["--data", "digits"]))
    return {"train": train, "validation": val}


def export_folder(out: Path) -> Path:
    """ImageFolder layout: ``out/train/<digit>/<n>.png`` and ``out/val/<digit>/<n>.png``."""
    for split, images in _splits().items():
        folder = out / ("val" if split == "validation" else split)
        for n, (pixels, label) in enumerate(zip(images.pixels, images.labels)):
            path = folder / CLASS_NAMES[label] / f"{n:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    return out


def export_hf(out: Path) -> Path:
    """A Hugging Face dataset as parquet files (``image``: PNG bytes, ``label``: ClassLabel)."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})
    for split, images in _splits().items():
        rows = {"image": [], "label": []}
        for pixels, label in zip(images.pixels, images.labels):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            rows["image"].append({"bytes": buffer.getvalue(), "path": None})
            rows["label"].append(int(label))
        path = out / "data" / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("form", choices=("folder", "hf"))
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    (export_folder if args.form == "folder" else export_hf)(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
