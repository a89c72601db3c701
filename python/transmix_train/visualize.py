"""transmix-visualize: the paper's Figure 1 for a trained checkpoint, as one PNG.

    transmix-visualize --checkpoint output/run/last.pth                  # two val images of the run's data
    transmix-visualize --checkpoint run/best.pth --index-a 3 --index-b 17 --lam 0.6
    transmix-visualize --checkpoint run/best.pth --image-a cat.jpg --image-b dog.jpg -o fig1.png

Panels, left to right: image A, image B, the mixed image (B's box pasted into A, outlined), the
class attention of the model on the mixed image (upsampled over it, box outlined), and A's / B's
label weight by area (CutMix) and by TransMix, with the class names when they are known.

One CutMix box is drawn from ``--lam`` and ``--seed`` exactly as ``tk.sample_boxes`` draws it in
training, the model runs once (eval mode) with a ``tk.ClassAttentionProbe`` attached, and the
label follows the paper: ``lam = ratio * lam_area + (1 - ratio) * lam_attn``.

This module is the command: its flags, the checkpoint, the run's data and the two images; the
figure itself (the box, the forward, the labels, the panels) is :mod:`transmix_train.figure`.

A checkpoint is required: the attention of a randomly initialised model is close to uniform and
says nothing about the method (train one with ``transmix-train``; a 1-epoch run on the embedded
data is enough to see the pipeline work, a real training run to see meaningful attention).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import attn_source
from .figure import Figure, FigureImages, compute_figure, draw_figure
from .model import load_from_checkpoint, probe_for

__all__ = [
    "Figure",
    "FigureImages",
    "Selection",
    "build_parser",
    "compute_figure",
    "draw_figure",
    "load_images",
    "load_model",
    "main",
    "read_run",
    "rebuild_model",
    "select_images",
]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``transmix-visualize``."""
    parser = argparse.ArgumentParser(
        prog="transmix-visualize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="a transmix-train checkpoint (last.pth / best.pth)")
    for which in ("a", "b"):
        group = parser.add_mutually_exclusive_group()
        group.add_argument(f"--image-{which}", default=None, help=f"an image file for {which.upper()}")
        group.add_argument(
            f"--index-{which}", type=int, default=None,
            help=f"the index of {which.upper()} in the val set of the checkpoint's data (default: "
            + ("0)" if which == "a" else "the first val image of another class than A's)"),
        )
    parser.add_argument("--label-a", type=int, default=None, help="A's class index when --image-a is a file")
    parser.add_argument("--label-b", type=int, default=None, help="B's class index when --image-b is a file")
    parser.add_argument("--lam", type=float, default=0.6, help="CutMix lambda the box is drawn from, in (0, 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the box position")
    parser.add_argument("--ratio", type=float, default=0.5, help="weight of the area lambda in TransMix's label")
    parser.add_argument("--attn-source", type=attn_source, default=None,
                        help='attention to show: "last", "rollout" or a block index (default: the run\'s own)')
    parser.add_argument("--output", "-o", default="fig1.png", help="the PNG to write")
    parser.add_argument("--use-ema", action="store_true", help="show the EMA weights (a --model-ema run)")
    parser.add_argument("--dpi", type=int, default=120, help="resolution of the PNG (the figure is 20 x 4.2 inches)")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad input by naming the argument, before any model or data is loaded."""
    path = Path(args.checkpoint)
    if not path.is_file():
        parser.error(f"--checkpoint: no checkpoint file at {str(path)!r}")
    for which in ("a", "b"):
        image = getattr(args, f"image_{which}")
        if image is not None and not Path(image).is_file():
            parser.error(f"--image-{which}: no image file at {image!r}")
        index = getattr(args, f"index_{which}")
        if index is not None and index < 0:
            parser.error(f"--index-{which} must be >= 0, got {index}")
        label = getattr(args, f"label_{which}")
        if label is not None and image is None:
            parser.error(f"--label-{which} labels an image file; give it with --image-{which}")
    if not 0.0 < args.lam < 1.0:
        parser.error(f"--lam must lie in (0, 1) so that both images are visible, got {args.lam}")
    if not 0.0 <= args.ratio <= 1.0:
        parser.error(f"--ratio must lie in [0, 1], got {args.ratio}")
    if args.dpi < 10:
        parser.error(f"--dpi must be >= 10, got {args.dpi}")
    output = Path(args.output)
    if output.suffix.lower() != ".png":
        parser.error(f"--output must name a .png file, got {args.output!r}")
    if not output.parent.exists():
        parser.error(f"--output: the folder {str(output.parent)!r} does not exist")


def _train_config(checkpoint: dict) -> argparse.Namespace:
    """The checkpoint's resolved config on top of the trainer's flag defaults (so a checkpoint
    from an older trainer, missing a newer key, still rebuilds)."""
    from .config import build_parser as train_parser

    config = train_parser().parse_args([])
    vars(config).update(checkpoint.get("args") or {})
    return config


def read_run(path: str) -> tuple[dict, argparse.Namespace]:
    """A ``transmix-train`` checkpoint and its run's config (``ValueError`` naming --checkpoint)."""
    from .checkpoint import read_checkpoint

    checkpoint = read_checkpoint(path, "--checkpoint")
    arch = checkpoint.get("arch")
    if not arch:
        raise ValueError(f"--checkpoint {path}: the checkpoint names no 'arch' (expected a transmix-train checkpoint)")
    config = _train_config(checkpoint)
    config.model = arch
    return checkpoint, config


def rebuild_model(checkpoint: dict, config: argparse.Namespace, path: str, *, use_ema: bool = False):
    """The checkpoint's model rebuilt from its config, weights loaded, in eval mode; returns
    (model, a one-line title: model, epoch, data)."""
    model = load_from_checkpoint(path, "--checkpoint", use_ema=use_ema, checkpoint=checkpoint)
    return model, _title(checkpoint, config)


def _title(checkpoint: dict, config: argparse.Namespace) -> str:
    """"deit_tiny_patch16_224 after 40 epochs (val top-1 91.00), data shapes"."""
    epoch, metric = checkpoint.get("epoch"), checkpoint.get("metric")
    trained = "" if epoch is None else f" after {int(epoch) + 1} epochs"
    score = "" if metric is None else f" (val top-1 {float(metric):.2f})"
    return f"{config.model}{trained}{score}, data {config.data}"


def load_model(path: str, *, use_ema: bool = False) -> tuple[torch.nn.Module, argparse.Namespace, str]:
    """Rebuild a ``transmix-train`` checkpoint's model; returns (model, run config, title)."""
    checkpoint, config = read_run(path)
    model, title = rebuild_model(checkpoint, config, path, use_ema=use_ema)
    return model, config, title


def _datasets(config: argparse.Namespace, need: bool):
    """(train_set, val_set) of the run, or None when its data folder is not on this machine and
    both images are files (``need`` False)."""
    from .data import create_datasets

    try:
        train_set, val_set, _ = create_datasets(config)
    except ValueError as error:
        if need:
            raise ValueError(f"{error}; give both images as files (--image-a, --image-b) instead") from None
        return None
    return train_set, val_set


def _class_names(config: argparse.Namespace, val_set) -> tuple[str, ...] | None:
    """Readable class names of the run's data, when it has any: shapes-10 names, digits 0-9,
    folder names (ImageNet WordNet ids become their first English name); None for synthetic."""
    if config.data == "shapes":
        from .shapes import CLASSES

        return CLASSES
    if config.data == "digits":
        return tuple(str(digit) for digit in range(10))
    reader = getattr(val_set, "reader", None)
    if reader is not None and hasattr(reader, "class_to_idx"):
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        folders = sorted(reader.class_to_idx, key=reader.class_to_idx.get)
        return tuple(_imagenet_name(folder, info) for folder in folders)
    return None


def _imagenet_name(folder: str, info) -> str:
    """An ImageNet WordNet id's first English name ("n01440764" -> "tench"); other names as they are."""
    try:
        return info.label_name_to_description(folder).split(",")[0]
    except KeyError:  # not a WordNet id of ImageNet-1k
        return folder


def _label_of(val_set, index: int) -> int:
    """A val sample's label without decoding its image where the set allows it."""
    labels = getattr(val_set, "labels", None)
    if labels is not None:
        return int(labels[index])
    samples = getattr(getattr(val_set, "reader", None), "samples", None)
    if samples is not None:
        return int(samples[index][1])
    return int(val_set[index][1])


def _pick_indices(args: argparse.Namespace, val_set, data: str) -> tuple[int | None, int | None]:
    """The val indices of A and B: as given (range-checked), else A = 0 and B = the first later
    image of another class than A (so the two labels differ)."""
    length = 0 if val_set is None else len(val_set)
    for which in ("a", "b"):
        index = getattr(args, f"index_{which}")
        if index is not None and index >= length:
            raise ValueError(f"--index-{which} {index} is out of range: the val set of --data {data} has {length} images")
    index_a = args.index_a if args.index_a is not None or args.image_a is not None else 0
    index_b = args.index_b
    if index_b is None and args.image_b is None:
        label_a = args.label_a if index_a is None else _label_of(val_set, index_a)
        others = (i for i in range(length) if i != index_a and (label_a is None or _label_of(val_set, i) != label_a))
        index_b = next(others, None)
        if index_b is None:
            raise ValueError(f"--index-b: the val set of --data {data} has no image of another class than A's")
    return index_a, index_b


def _as_pil(image):
    """A val sample's image as PIL (synthetic sets yield uint8 (3, H, W) arrays)."""
    from PIL import Image

    return image if isinstance(image, Image.Image) else Image.fromarray(image.transpose(1, 2, 0))


@dataclass
class Selection:
    """Where A and B come from: the run's data sets (None when only files are used and the
    run's data folder is not on this machine) and the val indices (None for a file)."""

    train_set: object
    val_set: object
    indices: tuple[int | None, int | None]


def select_images(args: argparse.Namespace, config: argparse.Namespace) -> Selection:
    """The run's data sets and the val indices of A and B (range-checked, before any model is built)."""
    sets = _datasets(config, need=None in (args.image_a, args.image_b))
    train_set, val_set = sets if sets is not None else (None, None)
    if val_set is not None:
        val_set.transform = None  # raw PIL images: the eval transform of load_images is the only one
    return Selection(train_set, val_set, _pick_indices(args, val_set, config.data))


def load_images(args: argparse.Namespace, config: argparse.Namespace, model: torch.nn.Module,
                selection: Selection | None = None) -> FigureImages:
    """Images A and B (files or val samples of the run's data), resized, centre-cropped and
    normalised as the run evaluated them."""
    from PIL import Image
    from timm.data import create_transform

    from .data import data_settings

    selection = selection or select_images(args, config)
    val_set, files = selection.val_set, (args.image_a, args.image_b)
    settings = data_settings(config, selection.train_set, model)
    transform = create_transform(
        settings.input_size, is_training=False, interpolation=settings.interpolation,
        mean=settings.mean, std=settings.std, crop_pct=settings.crop_pct,
    )
    pictures, labels, captions = [], [], []
    for file, index, label in zip(files, selection.indices, (args.label_a, args.label_b)):
        if file is not None:
            try:
                picture = Image.open(file).convert("RGB")
            except OSError as error:
                which = "a" if file == args.image_a else "b"
                raise ValueError(f"--image-{which} {file}: not a readable image ({error})") from None
            pictures.append(picture)
            labels.append(label)
            captions.append(Path(file).name)
        else:
            picture, label = val_set[index]
            pictures.append(_as_pil(picture))
            labels.append(int(label))
            captions.append(f"val #{index}")
    return FigureImages(
        images=torch.stack([transform(picture) for picture in pictures]),
        labels=(labels[0], labels[1]),
        names=None if val_set is None else _class_names(config, val_set),
        mean=tuple(settings.mean),
        std=tuple(settings.std),
        captions=(captions[0], captions[1]),
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``transmix-visualize``; bad input exits with an error naming the argument."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        checkpoint, config = read_run(args.checkpoint)
        selection = select_images(args, config)  # bad indices fail before the model is built
        model, title = rebuild_model(checkpoint, config, args.checkpoint, use_ema=args.use_ema)
        source = config.attn_source if args.attn_source is None else args.attn_source
        model, probe = probe_for(model, source)  # a source this model cannot give: an error naming --attn-source
        images = load_images(args, config, model, selection)
    except ValueError as error:
        parser.error(str(error))
    figure = compute_figure(model, images.images, lam=args.lam, seed=args.seed, ratio=args.ratio, probe=probe)
    path = draw_figure(figure, images, args.output, title=title, dpi=args.dpi)
    print(f"wrote {path}: lam_area {figure.lam_area:.4f}, lam_attn {figure.lam_attn:.4f}, TransMix lam {figure.lam:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
