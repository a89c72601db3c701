"""Loaders: timm's transforms per sample, uint8 batches, normalisation and random erasing on the device.

The train and val sets get timm's ``create_transform`` (random resized crop, flips, colour
jitter, RandAugment; eval: resize and centre crop) in its prefetcher form (PIL in, uint8 out),
``fast_collate`` and timm's ``PrefetchLoader``, which moves each batch to the device and
normalises (and random-erases) it there: a worker never converts pixels to float.

Shuffling is a ``DistributedSampler`` seeded with ``--seed`` on every run, one process or many:
the order of an epoch depends only on the seed and the epoch, which is what lets ``--resume``
continue at the next epoch exactly. Val is split across ranks without padding (each image is
counted once when the metrics are summed).
"""

from __future__ import annotations

import argparse
import random
from typing import Iterable

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from timm.data.loader import fast_collate, PrefetchLoader
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .data import DataSettings, InMemoryImages, SyntheticImages

__all__ = ["build_train_transform", "create_loaders", "posterize_zero_bits"]


def posterize_zero_bits(image: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize op, with 0 bits giving a black image as Pillow < 13 did.

    RandAugment's ``inc1`` posterize keeps ``4 - int(level * 0.4)`` bits: 0 at level 10, which
    magnitude noise (``mstd0.5`` around 9) reaches. Pillow 13 rejects 0 bits with a ValueError
    that would stop training at random; the old result (every bit dropped) is kept instead.
    """
    if bits_to_keep >= 8:
        return image
    if bits_to_keep < 1:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def _patch_randaugment(transform) -> None:
    for step in getattr(transform, "transforms", []):
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = posterize_zero_bits


def build_train_transform(args: argparse.Namespace, settings: DataSettings):
    """timm's training transform (prefetcher form: uint8 out) for the augmentation flags.

    ``--no-base-aug`` keeps the whole image (crop scale and aspect 1, no flips, no colour
    jitter) so RandAugment and random erasing can still be switched on alone.
    """
    base = args.base_aug
    transform = create_transform(
        settings.input_size,
        is_training=True,
        scale=tuple(args.crop_scale) if base else (1.0, 1.0),
        ratio=tuple(args.crop_ratio) if base else (1.0, 1.0),
        hflip=args.hflip if base else 0.0,
        vflip=args.vflip if base else 0.0,
        color_jitter=args.color_jitter if base else 0.0,
        auto_augment=None if str(args.aa).lower() in ("none", "") else args.aa,
        interpolation=settings.interpolation,
        mean=settings.mean,
        std=settings.std,
        use_prefetcher=True,
    )
    _patch_randaugment(transform)
    return transform


def _seed_worker(worker_id: int) -> None:
    # Each worker's torch seed comes from the main process's RNG; derive Python's and NumPy's from
    # it so PIL-side augmentation is reproducible too.
    seed = torch.utils.data.get_worker_info().seed
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _loader(dataset: Dataset, batch_size: int, sampler: Iterable, workers: int, train: bool,
            device: torch.device) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=fast_collate,
        drop_last=train, pin_memory=device.type == "cuda", worker_init_fn=_seed_worker,
        # Not persistent: worker seeds then follow the (restored) main RNG each epoch.
        persistent_workers=False,
    )


def create_loaders(
    args: argparse.Namespace,
    train_set: Dataset,
    val_set: Dataset,
    settings: DataSettings,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
) -> tuple[PrefetchLoader, PrefetchLoader, DistributedSampler]:
    """(train loader, val loader, train sampler): call ``sampler.set_epoch(epoch)`` each epoch."""
    if settings.augment:
        train_set.transform = build_train_transform(args, settings)
        val_set.transform = create_transform(
            settings.input_size, is_training=False, crop_pct=settings.crop_pct,
            interpolation=settings.interpolation, mean=settings.mean, std=settings.std, use_prefetcher=True,
        )
    # In-memory sets cost ~0.3 ms per 32 px image in PIL: worker processes would only compete with
    # the model for the cores. Folders decode files: 4 workers, as timm's default.
    in_memory = isinstance(train_set, (InMemoryImages, SyntheticImages))
    workers = args.workers if args.workers is not None else (0 if in_memory else 4)
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    train = _loader(train_set, args.batch_size, sampler, workers, True, device)
    val_batch = args.validation_batch_size or args.batch_size
    val = _loader(val_set, val_batch, range(rank, len(val_set), world_size), workers, False, device)

    def prefetch(loader: DataLoader, re_prob: float) -> PrefetchLoader:
        return PrefetchLoader(loader, mean=settings.mean, std=settings.std, channels=settings.input_size[0],
                              device=device, re_prob=re_prob, re_mode=args.remode, re_count=args.recount)

    return prefetch(train, args.reprob), prefetch(val, 0.0), sampler
