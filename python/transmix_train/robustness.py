"""transmix-robustness: val top-1 under occlusion and under patch shuffling, for a checkpoint.

    transmix-robustness output/run/best.pth                       # the run's val set, default grids
    transmix-robustness run/best.pth --data shapes --drop-ratios 0 0.5 0.9 --shuffle-grids 1 2 4 -o rob/

Writes ``robustness.json``, ``robustness.md`` (a table per test) and ``robustness.png`` (top-1
against the drop ratio and against the shuffle grid) into ``--output`` (default: the
checkpoint's folder). Seeded (``--seed``) and deterministic: every random draw is made per image
from the seed and the image's index, so neither ``--batch-size`` nor the device changes which
patches are dropped or how they are shuffled.

The protocol is that of Naseer et al., "Intriguing Properties of Vision Transformers" (NeurIPS
2021, arXiv 2105.10497), read from their public code (``evaluate.py``, ``scripts/evaluate_occlusion.sh``,
``scripts/evaluate_shuffle.sh``), which the TransMix paper's robustness section uses for its
occlusion and patch-permutation curves:

- Occlusion (their "Random PatchDrop"): the image is cut into the grid of the model's patches
  (14 x 14 for a DeiT at 224 px, their default), and ``floor(ratio * N)`` of the N patches, chosen
  at random, have their pixels set to zero before normalisation (black); the drop ratio
  ("information loss") runs 0 %, 10 %, ..., 90 % (their ``drop_count = k * 196 // 10``,
  k = 0..9). Patch tokens are not removed: the model still sees every position.
- Patch shuffling: the image is cut into a g x g grid of equal cells, which are put back in a
  random order. Grid sizes: 1 (the plain image), then 2, 4, 8, ... up to the model's patch grid,
  and the patch grid itself (at 224 px / 16 px patches: 1, 2, 4, 8, 14, the square grids of
  their ``evaluate_shuffle.sh`` that are not finer than a patch).

Where we depart from their code: their patches and permutations are drawn once per batch, unseeded,
from a shuffled loader; here each image gets its own seeded draw. The drops are nested: an image's
patches are put in one random order and the first ``floor(ratio * N)`` of that order are dropped,
so a larger ratio drops a superset (each ratio alone is still a uniform random choice).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

import transmix_kernels as tk

from .fidelity import default_device, open_checkpoint, ValImages

__all__ = [
    "DEFAULT_DROP_RATIOS",
    "RobustnessResult",
    "build_parser",
    "check_drop_ratios",
    "check_grid",
    "default_shuffle_grids",
    "drop_patches",
    "dropped_count",
    "evaluate_robustness",
    "main",
    "random_orders",
    "shuffle_patches",
    "write_report",
]

#: Information loss 0 %, 10 %, ..., 90 % (Naseer et al.'s k / 10, k = 0..9).
DEFAULT_DROP_RATIOS = tuple(k / 10 for k in range(10))


def check_drop_ratios(ratios: Sequence[float], flag: str = "--drop-ratios") -> tuple[float, ...]:
    """The drop ratios as floats, each in [0, 1); otherwise a ``ValueError`` naming ``flag``."""
    if not len(ratios):
        raise ValueError(f"{flag}: give at least one drop ratio")
    for ratio in ratios:
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 <= ratio < 1.0:
            raise ValueError(f"{flag} {ratio!r}: a drop ratio must lie in [0, 1) (the share of patches "
                             "dropped; 1.0 would drop every patch and leave nothing to classify)")
    return tuple(float(ratio) for ratio in ratios)


def check_grid(grid: int, height: int, width: int, flag: str) -> int:
    """``grid`` (cells per side) >= 1 and dividing the ``height`` x ``width`` image; else a ``ValueError``."""
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"{flag} {grid!r}: a grid size must be a whole number >= 1")
    if height % grid or width % grid:
        raise ValueError(f"{flag} {grid}: the {height}x{width} images do not split into {grid}x{grid} equal cells")
    return grid


def dropped_count(ratio: float, cells: int) -> int:
    """Patches dropped at ``ratio`` of ``cells``: ``floor(ratio * cells)`` (Naseer et al.'s ``k * N // 10``)."""
    return min(cells, math.floor(ratio * cells + 1e-9))  # 1e-9: 0.3 * 10 is 2.9999999999999996 in floats


def default_shuffle_grids(height: int, width: int, patch_grid: tuple[int, int]) -> tuple[int, ...]:
    """1, then 2, 4, 8, ... while not finer than the patch grid (and dividing the image), then the
    patch grid itself when it is square and divides the image."""
    grids, size = [1], 2
    while size <= min(patch_grid) and height % size == 0 and width % size == 0:
        grids.append(size)
        size *= 2
    side = patch_grid[0]
    if patch_grid[0] == patch_grid[1] and side not in grids and height % side == 0 and width % side == 0:
        grids.append(side)
    return tuple(grids)


def random_orders(count: int, cells: int, seed: int, *key: int) -> torch.Tensor:
    """(count, cells) int64: a random permutation of the cells per image, from ``seed`` and ``key``
    (one stream per test and grid) only."""
    state = int(np.random.SeedSequence([seed, *key]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.rand(count, cells, generator=torch.Generator().manual_seed(state)).argsort(dim=1)


def drop_patches(images: torch.Tensor, order: torch.Tensor, count: int, grid: tuple[int, int],
                 fill: torch.Tensor) -> torch.Tensor:
    """Random PatchDrop: a copy of ``images`` with the first ``count`` cells of each image's ``order`` set to ``fill``.

    Args:
        images: (B, C, H, W) float, normalised.
        order: (B, gh*gw) int64, each image's cells in drop order (row-major cell index).
        count: cells dropped per image.
        grid: (gh, gw), dividing H and W.
        fill: (1, C, 1, 1) the value of a black pixel after normalisation (``-mean / std``).
    """
    batch, _, height, width = images.shape
    gh, gw = grid
    keep = torch.ones(batch, gh * gw, dtype=torch.bool, device=images.device)
    keep.scatter_(1, order[:, :count].to(images.device), False)
    keep = keep.view(batch, 1, gh, gw).repeat_interleave(height // gh, 2).repeat_interleave(width // gw, 3)
    return torch.where(keep, images, fill.to(images.dtype))


def shuffle_patches(images: torch.Tensor, permutation: torch.Tensor, grid: int) -> torch.Tensor:
    """Patch shuffling: cell j of image b's g x g grid becomes cell ``permutation[b, j]`` of the input.

    images: (B, C, H, W); permutation: (B, g*g) int64; ``grid`` g divides H and W.
    """
    batch, channels, height, width = images.shape
    ph, pw = height // grid, width // grid
    cells = images.reshape(batch, channels, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5)
    cells = cells.reshape(batch, grid * grid, channels, ph, pw)
    cells = cells[torch.arange(batch, device=images.device)[:, None], permutation.to(images.device)]
    return cells.reshape(batch, grid, grid, channels, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(images.shape)


@dataclass
class RobustnessResult:
    """Top-1 (percent) of the plain val images and under each test.

    occlusion: ``{"drop_ratio", "patches_dropped", "top1"}`` per ratio; shuffle: ``{"grid", "top1"}``
    per grid size; patch_grid: the (gh, gw) grid the patches are dropped on.
    """

    images: int
    clean_top1: float
    patch_grid: tuple[int, int]
    occlusion: list[dict]
    shuffle: list[dict]


def evaluate_robustness(model: torch.nn.Module, images: ValImages, *,
                        drop_ratios: Sequence[float] = DEFAULT_DROP_RATIOS,
                        shuffle_grids: Optional[Sequence[int]] = None, patch_grid: Optional[tuple[int, int]] = None,
                        seed: int = 0, batch_size: int = 128, limit: Optional[int] = None,
                        workers: int = 0) -> RobustnessResult:
    """Top-1 of ``model`` (eval mode, no gradient) on ``images`` (the first ``limit``), plain, with
    each drop ratio and with each shuffle grid (see the module's docstring).

    ``patch_grid``: the drop grid (default: the model's token grid, ``tk.infer_token_grid``);
    ``shuffle_grids``: default :func:`default_shuffle_grids`. Bad values are a ``ValueError``
    naming the argument.
    """
    drop_ratios = check_drop_ratios(drop_ratios, "drop_ratios")
    count = len(images) if limit is None else min(limit, len(images))
    if count < 1:
        raise ValueError("no images to evaluate (limit must be >= 1 and the val set not empty)")
    first, _ = images.load([0])
    height, width = first.shape[-2:]
    if patch_grid is None:
        try:
            patch_grid = tuple(tk.infer_token_grid(model, (height, width)))
        except TypeError as error:
            raise ValueError(f"patch_grid: the model has no patch grid TransMix can read ({error}); give one") from None
    gh, gw = patch_grid
    if min(gh, gw) < 1 or height % gh or width % gw:
        raise ValueError(f"patch_grid {gh}x{gw}: does not split the {height}x{width} images into equal patches")
    patch_grid = (int(gh), int(gw))
    grids = default_shuffle_grids(height, width, patch_grid) if shuffle_grids is None else tuple(shuffle_grids)
    grids = tuple(check_grid(grid, height, width, "shuffle_grids") for grid in grids)
    cells = patch_grid[0] * patch_grid[1]
    drop_order = random_orders(count, cells, seed, 0)
    permutations = {grid: random_orders(count, grid * grid, seed, 1, grid) for grid in grids}
    fill = (-images.mean255 / images.std255).view(1, -1, 1, 1)  # a black pixel, normalised
    hits = {"clean": 0, **{("drop", r): 0 for r in drop_ratios}, **{("shuffle", g): 0 for g in grids}}
    model.eval()
    with torch.no_grad():
        for batch, labels, indices in images.batches(range(count), batch_size, workers):
            rows = torch.as_tensor(indices)

            def correct(inputs: torch.Tensor) -> int:
                return int((model(inputs).argmax(dim=-1) == labels).sum())

            hits["clean"] += correct(batch)
            for ratio in drop_ratios:
                dropped = drop_patches(batch, drop_order[rows], dropped_count(ratio, cells), patch_grid, fill)
                hits[("drop", ratio)] += correct(dropped)
            for grid in grids:
                hits[("shuffle", grid)] += correct(shuffle_patches(batch, permutations[grid][rows], grid))
    top1 = lambda key: 100.0 * hits[key] / count  # noqa: E731
    return RobustnessResult(
        images=count, clean_top1=top1("clean"), patch_grid=patch_grid,
        occlusion=[{"drop_ratio": r, "patches_dropped": dropped_count(r, cells), "top1": top1(("drop", r))}
                   for r in drop_ratios],
        shuffle=[{"grid": g, "top1": top1(("shuffle", g))} for g in grids],
    )


def _markdown(result: RobustnessResult, title: str) -> str:
    gh, gw = result.patch_grid
    lines = [f"# Robustness: {title}".rstrip(), "",
             f"{result.images} val images; plain top-1 {result.clean_top1:.2f} %.", "",
             f"Occlusion (random patch drop on the {gh}x{gw} patch grid, pixels set to black):", "",
             "| drop ratio | patches dropped | top-1 (%) |", "| ---: | ---: | ---: |"]
    lines += [f"| {row['drop_ratio']:.0%} | {row['patches_dropped']} / {gh * gw} | {row['top1']:.2f} |"
              for row in result.occlusion]
    lines += ["", "Patch shuffling (the image cut into g x g cells put back in a random order):", "",
              "| grid | top-1 (%) |", "| --- | ---: |"]
    lines += [f"| {row['grid']}x{row['grid']} | {row['top1']:.2f} |" for row in result.shuffle]
    return "\n".join(lines) + "\n"


def _plot(result: RobustnessResult, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (drop_axis, shuffle_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    drop_axis.plot([100 * row["drop_ratio"] for row in result.occlusion], [row["top1"] for row in result.occlusion],
                   marker="o")
    drop_axis.set(xlabel="patches dropped (%)", ylabel="top-1 (%)", title="occlusion (random patch drop)")
    labels = [f"{row['grid']}x{row['grid']}" for row in result.shuffle]
    shuffle_axis.plot(range(len(labels)), [row["top1"] for row in result.shuffle], marker="o")
    shuffle_axis.set_xticks(range(len(labels)), labels)
    shuffle_axis.set(xlabel="shuffle grid", ylabel="top-1 (%)", title="patch shuffling")
    for axis in (drop_axis, shuffle_axis):
        axis.set_ylim(0, 100)
        axis.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(result: RobustnessResult, output: str | Path, meta: dict) -> tuple[Path, Path, Path]:
    """``robustness.json`` (``meta`` and the numbers), ``robustness.md`` and ``robustness.png`` in ``output``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = output / "robustness.json", output / "robustness.md", output / "robustness.png"
    paths[0].write_text(json.dumps({**meta, **asdict(result)}, indent=2) + "\n")
    paths[1].write_text(_markdown(result, meta.get("title", "")))
    _plot(result, paths[2], meta.get("title", ""))
    return paths


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``transmix-robustness``."""
    parser = argparse.ArgumentParser(prog="transmix-robustness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a transmix-train checkpoint (last.pth / best.pth)")
    parser.add_argument("--data", default=None,
                        help="digits, shapes or a folder (default: the checkpoint's own data; its val split is used)")
    parser.add_argument("--output", "-o", default=None, metavar="DIR",
                        help="folder for robustness.json/.md/.png (default: the checkpoint's folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dropped patches and the permutations")
    parser.add_argument("--drop-ratios", type=float, nargs="+", default=list(DEFAULT_DROP_RATIOS), metavar="R",
                        help="shares of patches dropped, each in [0, 1) (default 0 0.1 ... 0.9)")
    parser.add_argument("--shuffle-grids", type=int, nargs="+", default=None, metavar="G",
                        help="shuffle grid sizes g (g x g cells; each must divide the image; default 1 2 4 ... up to "
                             "the model's patch grid, and the patch grid)")
    parser.add_argument("--patch-grid", type=int, default=None, metavar="N",
                        help="drop patches on an N x N grid (default: the model's own patch grid)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's val batch size")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N val images")
    parser.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--use-ema", action="store_true", help="the checkpoint's EMA weights (a --model-ema run)")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad input by naming the argument, before anything is loaded."""
    if not Path(args.checkpoint).is_file():
        parser.error(f"CHECKPOINT: no checkpoint file at {args.checkpoint!r}")
    try:
        check_drop_ratios(args.drop_ratios)
    except ValueError as error:
        parser.error(str(error))
    for flag, value in (("--batch-size", args.batch_size), ("--limit", args.limit), ("--patch-grid", args.patch_grid)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    for grid in args.shuffle_grids or []:
        if grid < 1:
            parser.error(f"--shuffle-grids {grid}: a grid size must be >= 1")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``transmix-robustness``; bad input exits with an error naming the argument."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    output = Path(args.output) if args.output else Path(args.checkpoint).parent
    try:
        opened = open_checkpoint(args.checkpoint, data=args.data, device=args.device or default_device(),
                                 use_ema=args.use_ema)
        batch_size = args.batch_size or opened.config.validation_batch_size or opened.config.batch_size
        result = evaluate_robustness(
            opened.model, opened.images, drop_ratios=args.drop_ratios, shuffle_grids=args.shuffle_grids,
            patch_grid=(args.patch_grid, args.patch_grid) if args.patch_grid else None, seed=args.seed,
            batch_size=batch_size, limit=args.limit, workers=args.workers,
        )
    except ValueError as error:  # the library's argument names, as this command's flags
        message = str(error)
        for name in ("drop_ratios", "shuffle_grids", "patch_grid"):
            message = message.replace(name, "--" + name.replace("_", "-"))
        parser.error(message)
    meta = {"checkpoint": str(args.checkpoint), "title": opened.title, "data": opened.config.data, "seed": args.seed,
            "batch_size": batch_size,
            "protocol": "Naseer et al. 2021: random PatchDrop (pixels set to black) and patch shuffling"}
    paths = write_report(result, output, meta)
    print(_markdown(result, opened.title), end="")
    print(f"wrote {', '.join(str(path) for path in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
