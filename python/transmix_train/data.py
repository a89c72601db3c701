"""The trainer's data sets: ``--data digits | shapes | synthetic | PATH``.

- ``digits``: scikit-learn's handwritten digits (1,797 real 8x8 scans shipped inside that
  package: no download), upscaled to 32x32 RGB; a fixed split (``--val-fraction`` held out) that
  does not depend on ``--seed``.
- ``shapes``: transmix_kernels' procedural shapes-10 (objects at random positions, so a CutMix
  box can cover or miss the object); fixed seeds per split.
- ``synthetic``: random images of any ``--img-size`` and ``--num-classes`` made per index on
  the fly (throughput runs); no augmentation.
- ``PATH``: an ImageFolder layout as ImageNet (``PATH/train/<class>/*``, ``PATH/val/<class>/*``)
  read with timm's ``ImageDataset``.

Every set has a ``transform`` attribute that the loader fills with timm's ``create_transform``
(PIL in, uint8 array out; normalisation happens on the device). In-memory sets keep uint8
pixels and make a PIL image per sample without decoding anything.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "BUILTIN_DATA",
    "DataSettings",
    "InMemoryImages",
    "SyntheticImages",
    "create_datasets",
    "data_settings",
    "load_digits_images",
]

BUILTIN_DATA = ("digits", "shapes", "synthetic")
# Fixed seeds: the data, and the split, stay the same whatever --seed the run uses.
_SPLIT_SEED = 0
_SHAPES_SEEDS = {"train": 0, "val": 1}


class InMemoryImages(Dataset):
    """Images held as uint8 (N, H, W, 3) pixels with int labels; ``transform`` takes a PIL image."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, transform: Optional[Callable] = None) -> None:
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"pixels must be uint8 (N, H, W, 3), got {pixels.dtype} {pixels.shape}")
        self.pixels = np.ascontiguousarray(pixels)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.pixels[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the pixels in [0, 1] (the normalisation of this set)."""
        pixels = self.pixels.reshape(-1, 3).astype(np.float64) / 255.0
        return tuple(pixels.mean(0).tolist()), tuple(pixels.std(0).tolist())


class SyntheticImages(Dataset):
    """Random uint8 (3, size, size) images and labels, made from the index (no storage).

    Samples are already in the layout timm's ``fast_collate`` expects, so no transform runs:
    a throughput run measures the model, the mixing and the device path.
    """

    def __init__(self, count: int, size: int, num_classes: int, seed: int) -> None:
        self.count, self.size, self.num_classes, self.seed = count, size, num_classes, seed
        self.transform = None  # kept for the loader's interface; synthetic images are not augmented

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        rng = np.random.default_rng((self.seed, index))
        image = rng.integers(0, 256, (3, self.size, self.size), dtype=np.uint8)
        return image, int(rng.integers(self.num_classes))


@functools.lru_cache(maxsize=2)
def load_digits_images(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as uint8 (N, size, size, 3) RGB (bilinear upscale) and labels.

    Cached (read-only arrays; the datasets index copies of them).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Values are ink counts 0..16 per 8x8 cell; upscale smoothly, then map to 0..255.
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1).numpy()
    pixels, labels = np.repeat(pixels[..., None], 3, axis=-1), digits.target.astype(np.int64)
    pixels.flags.writeable = labels.flags.writeable = False
    return pixels, labels


def _digits(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    if not 0.0 < args.val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    pixels, labels = load_digits_images(32)
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
    num_val = int(len(labels) * args.val_fraction)  # 359 of 1,797 at 0.2
    val, train = order[:num_val], order[num_val:]
    return InMemoryImages(pixels[train], labels[train]), InMemoryImages(pixels[val], labels[val]), 10


def _shapes(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    from transmix_kernels.data import CLASSES, make_shapes

    size = args.img_size or 32

    def split(count: int, seed: int) -> InMemoryImages:
        images, labels = make_shapes(count, size, seed=seed)
        # make_shapes returns (x - 0.35) / 0.3: back to pixels, the loader normalises again.
        pixels = ((images * 0.3 + 0.35).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        return InMemoryImages(pixels.numpy(), labels.numpy())

    return split(args.train_size, _SHAPES_SEEDS["train"]), split(args.val_size, _SHAPES_SEEDS["val"]), len(CLASSES)


def _synthetic(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    size = args.img_size or 224
    classes = args.num_classes or 1000
    return (SyntheticImages(args.train_size, size, classes, seed=1),
            SyntheticImages(args.val_size, size, classes, seed=2), classes)


def _folder(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    from timm.data import ImageDataset

    root = Path(args.data)
    if not root.is_dir():
        raise ValueError(
            f"--data {args.data!r}: not one of {', '.join(BUILTIN_DATA)} and not a folder "
            "(expected an ImageFolder layout with train/ and val/)"
        )
    splits = {}
    for name in ("train", "val"):
        if not (root / name).is_dir():
            raise ValueError(f"--data {args.data!r}: missing the {name}/ folder (expected {root / name}/<class>/<image>)")
        splits[name] = ImageDataset(str(root / name))
        if len(splits[name]) == 0:
            raise ValueError(f"--data {args.data!r}: no images found in {root / name}")
    classes = splits["train"].reader.class_to_idx
    if splits["val"].reader.class_to_idx != classes:
        raise ValueError(f"--data {args.data!r}: train/ and val/ have different class folders")
    return splits["train"], splits["val"], len(classes)


def create_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    """(train_set, val_set, num_classes) for ``args.data``; a clear ``ValueError`` naming ``--data``."""
    makers = {"digits": _digits, "shapes": _shapes, "synthetic": _synthetic}
    return makers.get(args.data, _folder)(args)


@dataclass(frozen=True)
class DataSettings:
    """What the transforms and the device-side normalisation need."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    interpolation: str
    augment: bool  # False: the set yields ready uint8 arrays (synthetic)


def data_settings(args: argparse.Namespace, train_set: Dataset, model: torch.nn.Module) -> DataSettings:
    """Input size, normalisation and eval crop: flags first, then the data's, then the model's."""
    from timm.data import resolve_data_config

    model_cfg = resolve_data_config({}, model=model)
    if isinstance(train_set, InMemoryImages):
        size = train_set.pixels.shape[1]
        mean, std = train_set.channel_stats()
    elif isinstance(train_set, SyntheticImages):
        size, mean, std = train_set.size, (0.5,) * 3, (0.25,) * 3
    else:
        size, mean, std = model_cfg["input_size"][-1], model_cfg["mean"], model_cfg["std"]
    size = args.img_size or size
    crop_pct = args.crop_pct if args.crop_pct is not None else (1.0 if size <= 64 else model_cfg["crop_pct"])
    return DataSettings(
        input_size=(3, size, size),
        mean=tuple(args.mean) if args.mean else tuple(mean),
        std=tuple(args.std) if args.std else tuple(std),
        crop_pct=crop_pct,
        interpolation=args.interpolation,
        augment=not isinstance(train_set, SyntheticImages),
    )
