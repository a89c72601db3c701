"""transmix-train's data sets and transforms."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image
import sklearn  # noqa: F401  (the train extra: a missing extra fails here, never skips)

from transmix_train.config import parse_args
from transmix_train.data import create_datasets, InMemoryImages, SyntheticImages
from transmix_train.loader import build_train_transform, posterize_zero_bits
from transmix_train.data import data_settings


def test_digits_split_is_fixed_and_disjoint():
    train, val, classes = create_datasets(parse_args(["--seed", "5"]))
    again, val_again, _ = create_datasets(parse_args(["--seed", "6"]))
    assert (len(train), len(val), classes) == (1438, 359, 10)
    assert np.array_equal(val.pixels, val_again.pixels), "the split moved with --seed"
    image, label = train[0]
    assert isinstance(image, Image.Image) and image.size == (32, 32) and image.mode == "RGB"
    assert 0 <= label < 10
    train_rows = {row.tobytes() for row in train.pixels}
    assert sum(row.tobytes() in train_rows for row in val.pixels) <= 2  # sklearn's digits hold a few duplicates


def test_shapes_and_synthetic():
    train, val, classes = create_datasets(parse_args(["--data", "shapes", "--train-size", "6", "--val-size", "4",
                                                      "--img-size", "24"]))
    assert isinstance(train, InMemoryImages) and train.pixels.shape == (6, 24, 24, 3) and len(val) == 4
    assert classes == 10
    train, _, classes = create_datasets(parse_args(["--data", "synthetic", "--img-size", "40", "--num-classes", "7",
                                                    "--train-size", "3"]))
    assert isinstance(train, SyntheticImages) and classes == 7
    image, label = train[2]
    assert image.shape == (3, 40, 40) and image.dtype == np.uint8 and 0 <= label < 7
    assert np.array_equal(train[2][0], image), "synthetic images must not change between reads"


def test_image_folder(tmp_path):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (20, 20), (10, 200, 30)).save(tmp_path / split / cls / "x.png")
    train, val, classes = create_datasets(parse_args(["--data", str(tmp_path)]))
    assert (len(train), len(val), classes) == (2, 2, 2)
    (tmp_path / "val" / "b" / "x.png").unlink()
    (tmp_path / "val" / "b").rmdir()
    with pytest.raises(ValueError, match="different class folders"):
        create_datasets(parse_args(["--data", str(tmp_path)]))


def test_posterize_zero_bits_is_black_not_an_error():
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert posterize_zero_bits(image, 0).getextrema() == ((0, 0),) * 3
    assert posterize_zero_bits(image, 8) is image
    assert posterize_zero_bits(image, 1).getpixel((0, 0)) == (128, 0, 0)


def test_randaugment_transform_survives_top_magnitudes():
    # mstd0 and m10: every op at level 10, where timm's inc1 posterize asks Pillow for 0 bits.
    args = parse_args(["--aa", "rand-m10-mstd0-inc1-n4"])
    train, _, _ = create_datasets(args)
    settings = data_settings(args, train, torch.nn.Linear(1, 1))
    transform = build_train_transform(args, settings)
    for index in range(64):
        out = transform(Image.fromarray(train.pixels[index]))
        assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
