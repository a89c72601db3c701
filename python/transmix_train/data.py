"""The trainer's data sets: the built-in ones (``--data``) and every source timm's ``create_dataset`` reads.

Built in (``--data digits | shapes | synthetic``):

- ``digits``: scikit-learn's handwritten digits (1,797 real 8x8 scans shipped inside that
  package: no download), upscaled to 32x32 RGB; a fixed split (``--val-fraction`` held out) that
  does not depend on ``--seed``.
- ``shapes``: the procedural shapes-10 of :mod:`.shapes` (objects at random positions, so a CutMix
  box can cover or miss the object); fixed seeds per split.
- ``synthetic``: random images of any ``--img-size`` and ``--num-classes`` made per index on
  the fly (throughput runs); no augmentation.

Through timm's ``create_dataset``, with the flags of timm's ``train.py`` (``--dataset``,
``--data-dir``, ``--train-split``, ``--val-split``, ``--class-map``, ``--dataset-download``,
``--train-num-samples`` / ``--val-num-samples``, ``--input-key`` / ``--target-key``):

- no ``--dataset`` (or a name without a prefix): a folder (ImageFolder layout, each split a
  sub-folder that timm finds by name: ``train/``, ``val/`` or ``validation/`` ...) or a tar,
  read by timm's ``ImageDataset``; ``--data PATH`` is the short form of ``--data-dir PATH``.
- ``hfds/NAME``: a Hugging Face dataset (a hub name or a local folder of parquet/arrow files),
  ``hfids/NAME`` the same streamed; ``wds/NAME``: WebDataset tar shards in ``--data-dir``;
  ``tfds/NAME``: TensorFlow Datasets; ``torch/NAME``: a torchvision dataset (``mnist``,
  ``cifar10``, ``image_folder`` ...). ``hfds``/``hfids``/``wds`` need the ``data`` extra.

The class count comes from the data (folder names, a ``--class-map`` file, a Hugging Face
``ClassLabel``, a torchvision set's classes), else from ``--num-classes``. Map-style sources
are wrapped in :class:`SourceImages`: an image that cannot be read is an error naming its file
(timm's ``ImageDataset`` would quietly train on the next image instead). ``hfids/``, ``wds/``
and ``tfds/`` are timm's ``IterableImageDataset``: they shard over ranks and workers and
shuffle themselves (``set_epoch``). They are wrapped in ``streams.SourceStream``: a sample timm's
reader skips (WebDataset: a warning) is counted and the count said in the log each epoch; one
that fails inside the reader (a Hugging Face stream) is an error naming the source and position.

Every set has a ``transform`` attribute that the loader fills with timm's ``create_transform``
(PIL in, uint8 array out; normalisation happens on the device). In-memory sets keep uint8
pixels and make a PIL image per sample without decoding anything.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

__all__ = [
    "BUILTIN_DATA",
    "DATASET_PREFIXES",
    "DataSettings",
    "InMemoryImages",
    "LabelCheck",
    "SampleError",
    "SourceImages",
    "SyntheticImages",
    "apply_transforms",
    "create_datasets",
    "data_settings",
    "describe_data",
    "load_digits_images",
]

BUILTIN_DATA = ("digits", "shapes", "synthetic")
#: The source prefixes of timm's ``create_dataset`` (``--dataset PREFIX/NAME``); no prefix: a folder or tar.
DATASET_PREFIXES = ("hfds", "hfids", "wds", "tfds", "torch")
# The package each prefix imports, and how to get it.
_PACKAGES = {
    "hfds": ("datasets", "pip install 'transmix-kernels[data]'"),
    "hfids": ("datasets", "pip install 'transmix-kernels[data]'"),
    "wds": ("webdataset", "pip install 'transmix-kernels[data]'"),
    "tfds": ("tensorflow_datasets", "pip install tensorflow tensorflow-datasets"),
}
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
    from .shapes import CLASSES, make_shapes

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


class SampleError(RuntimeError):
    """A sample that cannot be read, or whose label is not one of the run's classes (names the sample)."""


class LabelCheck:
    """``target_transform`` that lets only int labels in ``range(num_classes)`` through."""

    def __init__(self, num_classes: int, source: str) -> None:
        self.num_classes, self.source = num_classes, source

    def __call__(self, label: Any) -> int:
        # A label outside the head would otherwise fail deep in the loss (or, on a GPU, as a device assert).
        if isinstance(label, (bool, float, str)) or not isinstance(label, (int, np.integer)) \
                or not 0 <= label < self.num_classes:
            raise SampleError(f"label {label!r} of {self.source} is not a class index in 0..{self.num_classes - 1}")
        return int(label)


def apply_transforms(dataset: Any, image: Image.Image, label: Any) -> tuple[Any, int]:
    """``(dataset.transform(image), dataset.target_transform(label))``, each only when set."""
    if dataset.target_transform is not None:
        label = dataset.target_transform(label)
    if dataset.transform is not None:
        image = dataset.transform(image)
    return image, label


class SourceImages(Dataset):
    """A map-style set from timm's ``create_dataset`` as the trainer reads it.

    RGB PIL images and int labels; ``transform`` is set by the loader. An image that cannot be
    opened or decoded raises :class:`SampleError` naming its file, where timm's ``ImageDataset``
    would log in the worker and return the next image instead.
    """

    def __init__(self, dataset: Dataset, source: str) -> None:
        self.dataset, self.source = dataset, source
        self.reader = getattr(dataset, "reader", None)  # timm's reader (None: a torchvision set)
        self.transform: Optional[Callable] = None
        self.target_transform: Optional[Callable] = None

    def __len__(self) -> int:
        return len(self.dataset)

    def _read(self, index: int) -> tuple[Image.Image, Any]:
        if self.reader is None:  # torchvision: its own transform is None, so this is the PIL image
            image, label = self.dataset[index][:2]
            return image.convert("RGB"), label
        file, label = self.reader[index][:2]  # an open file (or bytes) of the image, not yet decoded
        with file, Image.open(file) as image:
            return image.convert("RGB"), label

    def file_name(self, index: int) -> Optional[str]:
        """The file (or tar member, or Hugging Face row path) of sample ``index``, when the source keeps one."""
        try:
            if self.reader is not None:
                return self.reader.filename(index, absolute=True)
            return str(self.dataset.samples[index][0])  # torchvision's ImageFolder
        except (AttributeError, AssertionError, IndexError, KeyError, TypeError):
            return None

    def __getitem__(self, index: int):
        try:
            image, label = self._read(index)
        except Exception as error:  # noqa: BLE001 (PIL raises OSError, SyntaxError, ValueError ... on bad files)
            name = self.file_name(index) or "(no file name)"
            raise SampleError(f"cannot read image {name}, sample {index} of {self.source}: "
                              f"{type(error).__name__}: {error}") from error
        return apply_transforms(self, image, label)


def _prefix(dataset: str) -> str:
    head, sep, _ = dataset.partition("/")
    return head.lower() if sep else ""


def describe_data(args: argparse.Namespace) -> str:
    """The run's data in the words of its flags (log lines, errors)."""
    dataset, data_dir = getattr(args, "dataset", "") or "", getattr(args, "data_dir", None)
    parts = [f"--dataset {dataset!r}"] if dataset else []
    if data_dir:
        parts.append(f"--data-dir {data_dir!r}")
    elif args.data not in BUILTIN_DATA:
        parts.append(f"--data {args.data!r}")
    return " ".join(parts) or args.data


def _uses_create_dataset(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "dataset", "") or getattr(args, "data_dir", None)) or args.data not in BUILTIN_DATA


def _check_source(args: argparse.Namespace, dataset: str, root: Optional[str]) -> None:
    """The flags of a ``create_dataset`` source, checked before any file is read."""
    prefix = _prefix(dataset)
    if "/" in dataset and prefix not in DATASET_PREFIXES:
        raise ValueError(f"--dataset {dataset!r}: unknown source {dataset.partition('/')[0]!r}/ (expected "
                         f"{', '.join(p + '/' for p in DATASET_PREFIXES)}NAME, or no prefix for a folder or tar)")
    if prefix in _PACKAGES:
        package, install = _PACKAGES[prefix]
        try:
            importlib.import_module(package)
        except ImportError:
            raise ValueError(f"--dataset {dataset!r}: needs the Python package '{package}' ({install})") from None
    if prefix in ("", "torch", "wds") and not root:
        raise ValueError(f"--dataset {dataset!r}: needs --data-dir (the folder the data is in)")
    local = prefix in ("", "wds") or (prefix == "torch" and not args.dataset_download)
    if local and not os.path.exists(root):
        flag = "--data" if not args.data_dir else "--data-dir"
        raise ValueError(f"{flag} {root!r}: not one of {', '.join(BUILTIN_DATA)} and not a folder or file "
                         "(expected an ImageFolder layout with train/ and val/ sub-folders, a tar, or the "
                         "files of --dataset)")
    if args.class_map:
        if prefix == "torch":
            raise ValueError(f"--class-map {args.class_map!r}: torchvision sets (--dataset {dataset!r}) keep "
                             "their own classes and do not read a class map")
        path = args.class_map if os.path.exists(args.class_map) else os.path.join(root or "", args.class_map)
        if not os.path.isfile(path) or Path(path).suffix.lower() not in (".txt", ".pkl"):
            raise ValueError(f"--class-map {args.class_map!r}: expected a .txt file (a class name per line, "
                             "index = line number) or a .pkl dict {name: index}")


def _create(args: argparse.Namespace, dataset: str, root: Optional[str], split_flag: str, train: bool) -> Dataset:
    """One split through timm's ``create_dataset``; its errors become a ``ValueError`` naming the flags."""
    from timm.data import create_dataset

    split = getattr(args, split_flag)
    count = args.train_num_samples if train else args.val_num_samples
    keys = {"input_key": args.input_key, "target_key": args.target_key}
    try:
        made = create_dataset(
            dataset, root=root, split=split, is_training=train, class_map=args.class_map or None,
            download=args.dataset_download, batch_size=args.batch_size, seed=args.seed, num_samples=count,
            # torchvision's classes take no reader keys
            **({} if _prefix(dataset) == "torch" else {k: v for k, v in keys.items() if v}),
        )
    except (AssertionError, FileNotFoundError, KeyError, RuntimeError, TypeError, ValueError) as error:
        hint = (" (give --train-num-samples / --val-num-samples, or --dataset-download for hfids/)"
                if "num_samples" in str(error) else "")
        raise ValueError(f"{describe_data(args)} --{split_flag.replace('_', '-')} {split!r}: "
                         f"{type(error).__name__}: {error}{hint}") from None
    if len(made) == 0 and not isinstance(made, IterableDataset):
        raise ValueError(f"{describe_data(args)} --{split_flag.replace('_', '-')} {split!r}: no images found")
    return made


def _check_columns(args: argparse.Namespace, made: Dataset) -> None:
    """hfds/ and hfids/: the image and label columns exist (a missing one would fail at the first sample)."""
    reader = getattr(made, "reader", None)
    if hasattr(reader, "builder"):  # hfids: the builder's features
        columns = list(reader.builder.info.features or [])
    else:  # hfds: timm's cast of the image column adds it, empty, when it is missing; row 0 tells
        table = getattr(reader, "dataset", None)
        columns = list(getattr(table, "column_names", None) or [])
        image = table[0].get(reader.image_key) if columns and len(table) else None
        if not (image and (image.get("bytes") or image.get("path"))):
            columns = [column for column in columns if column != reader.image_key]
    if not columns:
        return
    # timm's defaults for Hugging Face sources; a target key may list several binary fields "a,b".
    wanted = {"--input-key": [args.input_key or "image"], "--target-key": (args.target_key or "label").split(",")}
    for flag, keys in wanted.items():
        for key in keys:
            if key.strip() not in columns:
                raise ValueError(f"{flag} {key.strip()!r}: not a column of {describe_data(args)} (its columns: "
                                 f"{', '.join(columns)})")


def _split_root(dataset: Dataset) -> Optional[str]:
    """Where a folder/tar split was read from (timm falls back to the root when no split folder exists)."""
    root = getattr(getattr(dataset, "reader", None), "root", None) or getattr(dataset, "root", None)
    return os.path.abspath(root) if isinstance(root, (str, os.PathLike)) else None


def _class_to_idx(dataset: Dataset) -> dict:
    mapping = getattr(getattr(dataset, "reader", None), "class_to_idx", None) or getattr(dataset, "class_to_idx",
                                                                                        None)
    return dict(mapping) if mapping else {}


def _num_classes(args: argparse.Namespace, train: Dataset, val: Dataset) -> int:
    """From the data when it says (folders, class map, ClassLabel, torchvision classes), else --num-classes."""
    classes, val_classes = _class_to_idx(train), _class_to_idx(val)
    if classes and val_classes and classes != val_classes:
        raise ValueError(f"{describe_data(args)}: the train and val splits have different classes (different class "
                         f"folders or label names): {sorted(classes)} vs {sorted(val_classes)}")
    if not classes:
        if args.num_classes is None:
            raise ValueError(f"{describe_data(args)}: the data does not say how many classes it has (no class "
                             "names: give --num-classes N, or --class-map FILE)")
        return args.num_classes
    count = max(classes.values()) + 1
    if args.num_classes is not None and args.num_classes != count:
        raise ValueError(f"--num-classes {args.num_classes}: {describe_data(args)} has {count} classes")
    return count


def _from_create_dataset(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    """Train and val through timm's ``create_dataset`` (``--dataset``, ``--data-dir``, ``--data PATH``)."""
    from .config import build_parser

    # A run saved before these flags existed (transmix-visualize reads old configs) gets their defaults.
    args = argparse.Namespace(**{**vars(build_parser().parse_args([])), **vars(args)})
    dataset = args.dataset or ""
    root = args.data_dir or (args.data if args.data not in BUILTIN_DATA else None)
    _check_source(args, dataset, root)
    # A folder or tar (no prefix, or torchvision's ImageFolder): timm looks for a sub-folder named after the
    # split and falls back to the root itself, whose train/ and val/ would become two classes.
    files = _prefix(dataset) == "" or dataset.lower() in ("torch/image_folder", "torch/folder")
    splits = {}
    for flag, train in (("train_split", True), ("val_split", False)):
        made = splits[flag] = _create(args, dataset, root, flag, train)
        if _prefix(dataset) in ("hfds", "hfids"):
            _check_columns(args, made)
        if files and os.path.isdir(root) and _split_root(made) == os.path.abspath(root):
            raise ValueError(f"{describe_data(args)} --{flag.replace('_', '-')} {getattr(args, flag)!r}: no such "
                             f"split folder in {root} (timm looks for the split's name and its synonyms, e.g. "
                             "train/ or training/, val/ or validation/)")
    train_set, val_set = splits["train_split"], splits["val_split"]
    if files and _split_root(train_set) == _split_root(val_set) is not None:
        raise ValueError(f"{describe_data(args)} --val-split {args.val_split!r}: reads the same data as "
                         f"--train-split {args.train_split!r} ({_split_root(train_set)})")
    num_classes = _num_classes(args, train_set, val_set)
    for flag, name in (("train_split", "train"), ("val_split", "val")):
        source = f"{describe_data(args)} --{flag.replace('_', '-')} {getattr(args, flag)!r}"
        if isinstance(splits[flag], IterableDataset):
            from .streams import SourceStream  # streams.py imports SampleError from here

            splits[flag] = SourceStream(splits[flag], source)
        else:
            splits[flag] = SourceImages(splits[flag], source)
        splits[flag].target_transform = LabelCheck(num_classes, source)
    return splits["train_split"], splits["val_split"], num_classes


def create_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    """(train_set, val_set, num_classes); a bad source is a ``ValueError`` naming its flag."""
    if _uses_create_dataset(args):
        return _from_create_dataset(args)
    makers = {"digits": _digits, "shapes": _shapes, "synthetic": _synthetic}
    return makers[args.data](args)


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
