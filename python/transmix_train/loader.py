"""Loaders: timm's transforms per sample, uint8 batches, normalisation on the device.

The train and val sets get timm's ``create_transform`` (random resized crop, flips, colour
jitter, RandAugment; eval: resize and centre crop) in its prefetcher form (PIL in, uint8 out),
``fast_collate`` and timm's ``PrefetchLoader``, which moves each batch to the device and
normalises it there: a worker never converts pixels to float. Random erasing runs in the
training step (``engine.py``), on the device, after the batch is taken: its randomness then
belongs to that step, which is what lets a mid-epoch recovery checkpoint resume exactly.

Workers are persistent (started once per run, as timm's loader does), and an epoch's train
workers start while the previous epoch is evaluated, the val workers while it trains
(:class:`StartAhead`): the first batches are ready when a loop asks for them. Each sample's
augmentation randomness is seeded from (``--seed``, epoch, rank, position in the epoch) by
:class:`SeededSampler` / :class:`SeededSamples`, so it does not depend on which worker made the
sample, on how many workers there are (0 included), or on the process's random state: a resume,
at an epoch boundary or from a recovery checkpoint in the middle of an epoch, sees the same
images. The order of an epoch is a ``DistributedSampler`` seeded with ``--seed`` (or timm's
``RepeatAugSampler`` with ``--aug-repeats``), one process or many. Val is split across ranks
without padding (each image is counted once when the metrics are summed).
"""

from __future__ import annotations

import argparse
import random
from typing import Iterator, Optional, Sized


import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.loader import fast_collate, PrefetchLoader
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler

from .data import DataSettings, InMemoryImages, SyntheticImages

__all__ = ["Loaders", "SeededSampler", "SeededSamples", "build_train_transform", "create_loaders", "posterize_zero_bits"]


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


class SeededSampler(Sampler):
    """Yields ``(index, sample_seed)`` in the order of ``sampler``; the seed is fixed by position.

    ``sample_seed`` depends only on (``seed``, epoch, ``rank``, the position in the epoch), never
    on the process's random state, so an epoch replays identically after a resume. :meth:`skip`
    starts the next epoch part-way (a resume from a mid-epoch recovery checkpoint).
    """

    def __init__(self, sampler: Sampler, seed: int, rank: int) -> None:
        self.sampler, self.seed, self.rank = sampler, seed, rank
        self.epoch, self._start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def skip(self, count: int) -> None:
        """The next epoch starts at position ``count`` (once; later epochs start at 0)."""
        self._start = count

    def _seeds(self, count: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch, self.rank]).integers(0, 2**62, count)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(self.sampler)
        seeds = self._seeds(len(indices)).tolist()
        start, self._start = self._start, 0
        return iter(zip(indices[start:], seeds[start:]))

    def __len__(self) -> int:
        return len(self.sampler) - self._start


class SeededSamples(Dataset):
    """``dataset[index]`` with Python's, NumPy's and torch's generators seeded by the sample's seed.

    timm's and torchvision's transforms draw from these global generators. In a worker they are
    simply reseeded; in the main process (``--workers 0``) they are put back after the batch, so
    the model's and the mixer's randomness is left as it was. The loader fetches a batch at a
    time (``__getitems__``), so the states are saved and restored once per batch.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[tuple[int, int]]) -> list:
        if torch.utils.data.get_worker_info() is not None:
            return [self._seeded(index, seed) for index, seed in items]
        python_state, numpy_state = random.getstate(), np.random.get_state()
        torch_state = torch.default_generator.get_state()
        try:
            return [self._seeded(index, seed) for index, seed in items]
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            torch.default_generator.set_state(torch_state)

    def _seeded(self, index: int, seed: int):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        # The CPU generator alone: torch.manual_seed would also reseed every accelerator, per sample.
        torch.default_generator.manual_seed(seed)
        return self.dataset[index]


def _loader(dataset: Dataset, batch_size: int, sampler: Sized, workers: int, train: bool,
            device: torch.device) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=fast_collate,
        drop_last=train, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        # A private generator for the workers' base seed: creating an iterator must not draw from the
        # global torch generator, whose stream the model and the mixer use.
        generator=torch.Generator().manual_seed(0),
    )


class StartAhead:
    """A ``DataLoader`` whose next pass can be started before a loop asks for it.

    ``start()`` creates the pass's iterator now: its workers begin making the first batches
    (``prefetch_factor`` per worker) while the caller does other work; the next ``iter()`` hands
    out that iterator instead of a fresh one. Without ``start()`` it is the plain loader. What a
    pass yields is fixed when it starts (the sampler's order and seeds), so it must start after
    ``set_epoch``; the workers' seeds come from the loader's private generator, so starting early
    draws nothing from the process's random streams.
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self._started: Optional[Iterator] = None

    def start(self) -> None:
        self._started = iter(self.loader)

    def __iter__(self) -> Iterator:
        started, self._started = self._started, None
        return started if started is not None else iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):  # batch_size, dataset, sampler, ... of the loader (PrefetchLoader reads them)
        return getattr(self.__dict__["loader"], name)


class Loaders:
    """The train and val loaders of a run, and the per-epoch controls of the train order."""

    def __init__(self, train: PrefetchLoader, val: PrefetchLoader, sampler: SeededSampler,
                 random_erasing: Optional[RandomErasing]) -> None:
        self.train, self.val, self.sampler, self.random_erasing = train, val, sampler, random_erasing

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Order and seeds of ``epoch``; its first ``skip_batches`` batches left out (recovery).

        Starts the epoch's train workers now (:class:`StartAhead`): call it for the next epoch
        before evaluating this one, so that evaluation overlaps the first batches' augmentation."""
        self.sampler.set_epoch(epoch)
        self.sampler.skip(skip_batches * self.train.loader.batch_size)
        self.train.loader.start()

    def start_val(self) -> None:
        """Start the val workers: call it as training begins, so the first val batches wait ready."""
        self.val.loader.start()


def _order(args: argparse.Namespace, train_set: Dataset, rank: int, world_size: int) -> Sampler:
    if args.aug_repeats:
        # DeiT's repeated augmentation (timm's port of DeiT's RASampler); shuffled by epoch.
        return RepeatAugSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True,
                                num_repeats=args.aug_repeats)
    return DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                              drop_last=True)


class IterableEpochs:
    """The train "sampler" of an iterable set: timm's readers split over ranks and workers and shuffle.

    ``set_epoch`` hands the epoch to the dataset, which reseeds its shard and sample shuffles from
    ``--seed`` and the epoch; such a stream cannot start part-way into an epoch.
    """

    def __init__(self, dataset: IterableDataset) -> None:
        self.dataset = dataset

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def skip(self, count: int) -> None:
        if count:
            raise ValueError("--dataset hfids/, wds/ or tfds/ (a stream) cannot resume inside an epoch: resume "
                             "from the epoch's last.pth instead of a recovery checkpoint")


def _iterable_loaders(args: argparse.Namespace, train_set: IterableDataset, val_set: IterableDataset, workers: int,
                      device: torch.device) -> tuple[DataLoader, DataLoader, IterableEpochs]:
    """Loaders without a sampler: the sets shard themselves (timm's ``create_loader`` does the same)."""
    if args.aug_repeats:
        raise ValueError(f"--aug-repeats {args.aug_repeats}: needs a map-style set (a folder, hfds/ or torch/), "
                         "not a stream (hfids/, wds/, tfds/)")
    for dataset in (train_set, val_set):
        dataset.set_loader_cfg(num_workers=workers)  # timm's readers size an epoch by the worker count
    train = _loader(train_set, args.batch_size, None, workers, True, device)
    val = _loader(val_set, args.validation_batch_size or args.batch_size, None, workers, False, device)
    return train, val, IterableEpochs(train_set)


def create_loaders(
    args: argparse.Namespace,
    train_set: Dataset,
    val_set: Dataset,
    settings: DataSettings,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
) -> Loaders:
    """Train and val loaders; call ``loaders.set_epoch(epoch)`` before each epoch."""
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
    if isinstance(train_set, IterableDataset):  # timm's hfids/, wds/, tfds/ sets (see _iterable_loaders)
        train, val, sampler = _iterable_loaders(args, train_set, val_set, workers, device)
    else:
        sampler = SeededSampler(_order(args, train_set, rank, world_size), args.seed, rank)
        train = _loader(SeededSamples(train_set), args.batch_size, sampler, workers, True, device)
        val_batch = args.validation_batch_size or args.batch_size
        val = _loader(val_set, val_batch, range(rank, len(val_set), world_size), workers, False, device)

    def prefetch(loader: DataLoader) -> PrefetchLoader:
        return PrefetchLoader(StartAhead(loader), mean=settings.mean, std=settings.std, channels=settings.input_size[0],
                              device=device)

    erasing = None
    if args.reprob > 0:
        erasing = RandomErasing(args.reprob, mode=args.remode, max_count=args.recount, device=device)
    return Loaders(prefetch(train), prefetch(val), sampler, erasing)
