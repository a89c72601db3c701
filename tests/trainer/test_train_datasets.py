"""transmix-train on the sources of timm's ``create_dataset``, each made in the test (no downloads).

Images are solid red, green or blue (MNIST-format: a grey level per class), so a batch's labels
can be checked against its pixels after the real loaders (transforms, collation, normalisation):
a run that trains on the wrong labels fails here, not only one that crashes.
"""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import datasets  # the data extra: a missing extra fails here, never skips
import numpy as np
import pytest
import torch
import webdataset
from PIL import Image

from train_tiny import read_metrics, TINY
from transmix_train.build import build_run
from transmix_train.config import parse_args
from transmix_train.data import create_datasets, SampleError
from transmix_train.distributed import ProcessInfo
from transmix_train.main import main

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
CHANNEL = {name: index for index, name in enumerate(COLOURS)}  # the one channel each colour lights
# Plain pixels in and out (no crop, flip, RandAugment or erasing), 1 epoch of at most 2 batches of 4.
PLAIN = [*TINY, "--aa", "none", "--no-base-aug", "--reprob", "0", "--batch-size", "4", "--epochs", "1",
         "--warmup-epochs", "0"]


def _png(colour: tuple[int, int, int], size: int = 20) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "PNG")
    return buffer.getvalue()


def _image_folder(root: Path, counts: dict[str, int]) -> Path:
    """train/ and val/ with a folder of solid images per colour; ``counts``: images per class per split."""
    for split, count in counts.items():
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                (root / split / name / f"{index}.png").write_bytes(_png(colour))
    return root


def _parquet(root: Path, image_key: str = "image", label_key: str = "label", damaged: int = -1) -> Path:
    """A Hugging Face dataset as local parquet files; the ClassLabel names are not in sorted order.
    ``damaged``: the train row whose image bytes are not an image."""
    features = datasets.Features({image_key: datasets.Image(), label_key: datasets.ClassLabel(names=list(COLOURS))})
    for split, count in (("train", 12), ("validation", 6)):
        labels = [index % 3 for index in range(count)]
        images = [{"bytes": b"not an image" if (split, row) == ("train", damaged) else
                   _png(list(COLOURS.values())[label]), "path": None} for row, label in enumerate(labels)]
        table = datasets.Dataset.from_dict({image_key: images, label_key: labels}, features=features)
        table.to_parquet(str(root / f"{split}-00000-of-00001.parquet"))
    return root


def _first_batches(argv: list[str], tmp_path: Path) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], object]:
    """The first (images, labels) of the real train and val loaders (normalised on the device), and the run."""
    run = build_run(parse_args([*argv, "--output", str(tmp_path / "unused")]), ProcessInfo(torch.device("cpu")),
                    lambda *_: None)
    batches = [next(iter(loader)) for loader in (run.train_loader, run.val_loader)]
    if run.probe is not None:
        run.probe.remove()
    return batches, run


def _check_labels(argv: list[str], label_of_channel: dict[int, int], tmp_path: Path) -> None:
    """Each label of a train and a val batch is the class of the image's colour."""
    for images, labels in _first_batches(argv, tmp_path)[0]:
        channels = images.float().mean((2, 3)).argmax(1).tolist()
        assert labels.tolist() == [label_of_channel[c] for c in channels]


def _train(argv: list[str], output: Path, classes: int) -> None:
    """The real entry point: one epoch, a metrics row, the class count in the log."""
    main([*argv, "--output", str(output)])
    rows = read_metrics(output)
    assert len(rows) == 1 and np.isfinite(float(rows[0]["train_loss"]))
    assert f"({classes} classes)" in (output / "train.log").read_text()


def test_hf_parquet_dataset(tmp_path):
    root = _parquet(tmp_path / "colours")
    argv = [*PLAIN, "--dataset", f"hfds/{root}", "--data-dir", str(tmp_path / "cache")]
    train, val, classes = create_datasets(parse_args(argv))
    assert (len(train), len(val), classes) == (12, 6, 3)
    _check_labels(argv, {CHANNEL[name]: index for index, name in enumerate(COLOURS)}, tmp_path)
    _train(argv, tmp_path / "run", 3)


def test_hf_input_and_target_keys(tmp_path):
    root = _parquet(tmp_path / "colours", image_key="img", label_key="colour")
    argv = [*PLAIN, "--dataset", f"hfds/{root}", "--data-dir", str(tmp_path / "cache")]
    with pytest.raises(ValueError, match="--input-key 'image': not a column"):
        create_datasets(parse_args(argv))
    train, _, classes = create_datasets(parse_args([*argv, "--input-key", "img", "--target-key", "colour"]))
    image, label = train[2]
    assert classes == 3 and label == 2 and image.getpixel((0, 0)) == COLOURS["blue"]


def test_hf_streamed_dataset(tmp_path):
    root = _parquet(tmp_path / "colours")
    argv = [*PLAIN, "--dataset", f"hfids/{root}", "--data-dir", str(tmp_path / "cache")]
    with pytest.raises(ValueError, match="--train-num-samples"):
        create_datasets(parse_args(argv))  # a stream of local files does not know its length
    # Sized by hand; unprepared, it does not know its ClassLabel either.
    counted = [*argv, "--train-num-samples", "12", "--val-num-samples", "6", "--num-classes", "3"]
    _check_labels(counted, {CHANNEL[name]: index for index, name in enumerate(COLOURS)}, tmp_path)
    _train([*argv, "--dataset-download"], tmp_path / "run", 3)  # prepared: the split sizes are known


def _shards(root: Path, damaged: tuple[str, ...] = ()) -> Path:
    """WebDataset shards (png + cls per sample) with timm's _info.json; classes 0 red, 1 green, 2 blue.
    ``damaged``: keys of samples whose png is not an image."""
    root.mkdir()
    splits = {"train": 2, "validation": 1}
    info = {"name": "colours", "splits": {}}
    for split, shards in splits.items():
        names = [f"{split}-{shard:06d}.tar" for shard in range(shards)]
        for shard, name in enumerate(names):
            with webdataset.TarWriter(str(root / name)) as writer:
                for index in range(8):
                    label, key = (index + shard) % 3, f"{split}{shard}_{index:04d}"
                    image = b"not an image" if key in damaged else _png(list(COLOURS.values())[label])
                    writer.write({"__key__": key, "png": image, "cls": label})
        info["splits"][split] = {"name": split, "num_samples": 8 * shards, "filenames": names,
                                 "shard_lengths": [8] * shards}
    (root / "_info.json").write_text(json.dumps(info))
    return root


def test_webdataset_shards(tmp_path):
    root = _shards(tmp_path / "shards")
    argv = [*PLAIN, "--dataset", "wds/colours", "--data-dir", str(root)]
    with pytest.raises(ValueError, match="--num-classes"):
        create_datasets(parse_args(argv))  # .cls files carry indices, not class names
    argv += ["--num-classes", "3", "--workers", "2"]  # two shards: one per worker
    _check_labels(argv, {0: 0, 1: 1, 2: 2}, tmp_path)
    _train(argv, tmp_path / "run", 3)


def test_webdataset_skips_are_counted_in_the_log(tmp_path):
    # timm's reader skips an undecodable sample with a warning, in whichever worker met it.
    root = _shards(tmp_path / "shards", damaged=("train0_0003", "train1_0005", "validation0_0001"))
    output = tmp_path / "run"
    main([*PLAIN, "--dataset", "wds/colours", "--data-dir", str(root), "--num-classes", "3", "--workers", "2",
          "--output", str(output)])
    log = (output / "train.log").read_text()
    assert "epoch 0: skipped 2 unreadable train sample(s) of --dataset 'wds/colours'" in log, log
    assert "epoch 0: skipped 1 unreadable val sample(s)" in log, log


@pytest.mark.parametrize("workers", ["0", "2"])
def test_hf_stream_decode_error_names_the_source(tmp_path, workers):
    root = _parquet(tmp_path / "colours", damaged=4)
    argv = [*PLAIN, "--dataset", f"hfids/{root}", "--data-dir", str(tmp_path / "cache"), "--dataset-download",
            "--workers", workers, "--output", str(tmp_path / "run")]
    with pytest.raises(SampleError, match=rf"cannot read sample \d+ of --dataset 'hfids/{re.escape(str(root))}' .*"
                                          r"--train-split 'train' as read by .*UnidentifiedImageError"):
        main(argv)


def _mnist_files(root: Path) -> Path:
    """torchvision's MNIST raw files (idx format); each image one grey level, 20 + 20 * label."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, count in (("train", 20), ("t10k", 10)):
        labels = np.arange(count, dtype=np.uint8) % 10
        images = np.repeat(20 + 20 * labels, 28 * 28).astype(np.uint8).reshape(count, 28, 28)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(header + array.tobytes())
    return root


def test_torchvision_mnist_files(tmp_path):
    root = _mnist_files(tmp_path / "torchvision")
    argv = [*PLAIN, "--dataset", "torch/mnist", "--data-dir", str(root)]
    batches, run = _first_batches(argv, tmp_path)
    assert run.num_classes == 10
    # Undo the device normalisation (timm's PrefetchLoader keeps mean and std in 0..255 units).
    mean, std = run.train_loader.mean.flatten()[0], run.train_loader.std.flatten()[0]
    for images, labels in batches:
        assert images.shape[1:] == (3, 16, 16), "MNIST's grey images must reach the model as RGB"
        grey = images[:, 0].float().mean((1, 2)) * std + mean
        assert labels.tolist() == ((grey - 20) / 20).round().long().tolist()
    _train(argv, tmp_path / "run", 10)


def test_folder_with_class_map(tmp_path):
    root = _image_folder(tmp_path / "colours", {"train": 4, "val": 2})
    class_map = tmp_path / "classes.txt"
    class_map.write_text("green\nblue\nred\n")  # sorted order would be blue 0, green 1, red 2
    argv = [*PLAIN, "--data", str(root), "--class-map", str(class_map)]
    _check_labels(argv, {CHANNEL["green"]: 0, CHANNEL["blue"]: 1, CHANNEL["red"]: 2}, tmp_path)
    _, _, classes = create_datasets(parse_args([*PLAIN, "--data", str(root)]))
    assert classes == 3
    _check_labels([*PLAIN, "--data", str(root)], {CHANNEL["blue"]: 0, CHANNEL["green"]: 1, CHANNEL["red"]: 2},
                  tmp_path)
    _train(argv, tmp_path / "run", 3)


@pytest.mark.parametrize("damage, workers", [("garbage", "1"), ("truncated", "0")])
def test_corrupt_image_is_an_error_naming_the_file(tmp_path, damage, workers):
    # timm's ImageDataset would log "Skipped sample" in the worker and train on the next image instead.
    root = _image_folder(tmp_path / "colours", {"train": 1, "val": 1})
    bad = root / "train" / "blue" / "bad.png"
    bad.write_bytes(b"not a png at all" if damage == "garbage" else _png(COLOURS["blue"], 64)[:80])
    # The four train images make the one batch; a worker process passes the error on, it does not hang.
    argv = [*PLAIN, "--data", str(root), "--workers", workers, "--output", str(tmp_path / "run")]
    with pytest.raises(SampleError, match=f"cannot read image {bad}"):
        main(argv)


@pytest.fixture
def no_webdataset(monkeypatch):
    monkeypatch.setitem(sys.modules, "webdataset", None)  # import webdataset now raises ImportError


BAD_SOURCES = {
    "unknown-prefix": (["--dataset", "hfd/colours", "--data-dir", "{tmp}"], "--dataset 'hfd/colours': unknown source"),
    "missing-folder": (["--data-dir", "{tmp}/nowhere"], "--data-dir '{tmp}/nowhere'"),
    "missing-split": (["--data", "{tmp}/colours", "--val-split", "test"], "--val-split 'test': no such split folder"),
    "hf-missing-split": (["--dataset", "hfds/{tmp}/parquet", "--data-dir", "{tmp}/cache", "--val-split", "test"],
                         "--val-split 'test': ValueError: Unknown split"),
    "class-map-file": (["--data", "{tmp}/colours", "--class-map", "{tmp}/nowhere.txt"], "--class-map"),
    "class-map-torch": (["--dataset", "torch/image_folder", "--data-dir", "{tmp}/colours", "--class-map",
                         "{tmp}/classes.txt"], "--class-map"),
    "num-classes": (["--data", "{tmp}/colours", "--num-classes", "5"], "--num-classes 5: --data"),
    "missing-extra": (["--dataset", "wds/colours", "--data-dir", "{tmp}"], "pip install 'transmix-kernels[data]'"),
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_source_stops_before_writing(tmp_path, capsys, request, case):
    _image_folder(tmp_path / "colours", {"train": 1, "validation": 1})
    (tmp_path / "classes.txt").write_text("red\ngreen\nblue\n")
    if case == "hf-missing-split":
        (tmp_path / "parquet").mkdir()
        _parquet(tmp_path / "parquet")
    if case == "missing-extra":
        request.getfixturevalue("no_webdataset")
    extra, named = BAD_SOURCES[case]
    output = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main([*PLAIN, *(arg.format(tmp=tmp_path) for arg in extra), "--output", str(output)])
    assert named.format(tmp=tmp_path) in f"{exit_info.value.code} {capsys.readouterr().err}"
    assert not output.exists(), "a bad source left an output folder behind"
