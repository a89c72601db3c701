"""Figure 1 of the TransMix paper as data and as a picture: no argument parsing, no loading.

:func:`compute_figure` mixes image B into image A with one CutMix box drawn exactly as
``tk.sample_boxes`` draws it in training, runs the model once (eval mode) with a
``tk.ClassAttentionProbe`` attached, and labels the result both ways, following the paper:
``lam = ratio * lam_area + (1 - ratio) * lam_attn``. :func:`draw_figure` draws the five panels
(A, B, the mixed image with the box outlined, the class attention over it, A's / B's label
weight by area and by TransMix) into a PNG. ``transmix-visualize`` (:mod:`.visualize`) finds
the checkpoint and the images and calls both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import transmix_kernels as tk

__all__ = ["Figure", "FigureImages", "compute_figure", "draw_figure"]


@dataclass
class FigureImages:
    """The two images of the figure and how to show them.

    Attributes:
        images: (2, C, H, W) float32, A then B, normalised as the model expects.
        labels: the class index of A and of B, or None where unknown (an image file).
        names: a readable name per class index, or None.
        mean, std: per-channel normalisation of ``images`` (to undo for display).
        captions: where each image came from ("val #3", a file name).
    """

    images: torch.Tensor
    labels: tuple[int | None, int | None]
    names: tuple[str, ...] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    captions: tuple[str, str]


@dataclass
class Figure:
    """Everything one Figure-1 PNG shows.

    Attributes:
        mixed: (C, H, W) float32, A with B's box pasted in.
        box: ``[y0, y1, x0, x1]`` half-open pixel box holding B.
        attention: (gh, gw) float32, the model's class attention on ``mixed``, summing to 1.
        lam_area, lam_attn, lam: A's share by area, by attention, and TransMix's blend of both.
        predicted: the model's top-1 class index on the mixed image.
    """

    mixed: torch.Tensor
    box: tuple[int, int, int, int]
    attention: torch.Tensor
    lam_area: float
    lam_attn: float
    lam: float
    predicted: int


def _mix_one_box(images: torch.Tensor, lam: float, seed: int, token_grid: tuple[int, int]):
    """Paste one box of B (row 1) into A (row 0) as training does; returns the mixed A, its box,
    A's token mask (1, gh*gw) and lam_area (1,)."""
    height, width = images.shape[-2:]
    generator = torch.Generator().manual_seed(seed)
    # float64 lam: one lam per batch, as timm's batch mode draws it (the box arithmetic follows lam's dtype).
    boxes, lam_area = tk.sample_boxes(torch.tensor([lam], dtype=torch.float64), height, width, generator=generator)
    partner = torch.tensor([1, 0])
    mixed, token_mask = tk.cutmix_paste(images, boxes[0], partner, token_grid=token_grid)
    box = tuple(int(v) for v in boxes[0])
    return mixed[:1], box, token_mask[:1], lam_area


def compute_figure(
    model: torch.nn.Module,
    images: torch.Tensor,
    *,
    lam: float = 0.6,
    seed: int = 0,
    ratio: float = 0.5,
    source: str | int = "last",
    probe: Optional[tk.ClassAttentionProbe] = None,
) -> Figure:
    """Mix B into A with one CutMix box, run the model once and label the result both ways.

    Args:
        model: a timm model of a family ``tk.ClassAttentionProbe`` reads (eval mode is set here).
        images: (2, C, H, W) float32, A then B, normalised as the model expects.
        lam: the CutMix lambda the box size is drawn from; the returned lam_area is the clipped
            box's exact share (timm's ``correct_lam``).
        seed: seed of the box position.
        ratio: weight of lam_area in TransMix's label (0.5 in the paper).
        source: the probe's attention source.
        probe: a probe already attached to ``model`` (then ``source`` is its own); removed at the end.
    """
    model.eval()
    height, width = images.shape[-2:]
    token_grid = tk.infer_token_grid(model, (height, width))
    mixed, box, token_mask, lam_area = _mix_one_box(images, lam, seed, token_grid)
    with torch.no_grad(), (probe or tk.ClassAttentionProbe(model, source=source)) as probe:
        logits = model(mixed)
        attention = probe.attention()
    # ratio 0 gives the attention share alone; the label itself blends it with the area share.
    lam_attn = tk.transmix_lambda(attention, token_mask, lam_area, ratio=0.0)
    blended = tk.transmix_lambda(attention, token_mask, lam_area, ratio=ratio)
    return Figure(
        mixed=mixed[0],
        box=box,
        attention=attention[0].reshape(token_grid),
        lam_area=float(lam_area[0]),
        lam_attn=float(lam_attn[0]),
        lam=float(blended[0]),
        predicted=int(logits[0].argmax()),
    )


def _display(image: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]):
    """(C, H, W) normalised -> (H, W, C) numpy in [0, 1] for imshow."""
    mean_t = torch.tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (image * std_t + mean_t).clamp(0, 1).permute(1, 2, 0).numpy()


def _class_name(names: tuple[str, ...] | None, label: int | None, fallback: str) -> str:
    if label is None:
        return fallback
    if names is not None and 0 <= label < len(names):
        return names[label]
    return f"class {label}"


def _outline(axis, box: tuple[int, int, int, int], colour: str) -> None:
    from matplotlib.patches import Rectangle

    y0, y1, x0, x1 = box
    axis.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=2))


def _attention_panel(axis, figure: Figure, background) -> None:
    """The attention map, upsampled to the image by nearest neighbour (one cell per token, as the
    token mask sees them), drawn over the mixed image."""
    height, width = background.shape[:2]
    upsampled = torch.nn.functional.interpolate(figure.attention[None, None], size=(height, width), mode="nearest")[0, 0]
    axis.imshow(background)
    axis.imshow(upsampled.numpy(), cmap="jet", alpha=0.55, interpolation="nearest")
    _outline(axis, figure.box, "white")
    gh, gw = figure.attention.shape
    axis.set_title(f"class attention ({gh}x{gw} tokens)")


def _label_panel(axis, figure: Figure, name_a: str, name_b: str) -> None:
    """Stacked bars: A's and B's label weight by area and by TransMix."""
    rows = (("area (CutMix)", figure.lam_area), ("TransMix", figure.lam))
    for y, (title, share) in enumerate(rows):
        axis.barh(y, share, color="tab:blue")
        axis.barh(y, 1 - share, left=share, color="tab:orange")
        axis.text(share / 2, y, f"{share:.2f}", ha="center", va="center", color="white", fontweight="bold")
        axis.text(share + (1 - share) / 2, y, f"{1 - share:.2f}", ha="center", va="center", color="white",
                  fontweight="bold")
    axis.set_yticks(range(len(rows)), [title for title, _ in rows])
    axis.invert_yaxis()  # area (the CutMix label) on top, TransMix's below it, as the paper's figure reads
    axis.set_xlim(0, 1)
    axis.set_xlabel(f"label weight: A = {name_a} (blue), B = {name_b} (orange)")
    axis.set_title(f"lam_area {figure.lam_area:.3f}, lam_attn {figure.lam_attn:.3f} -> lam {figure.lam:.3f}")


def draw_figure(figure: Figure, images: FigureImages, output: str | Path, *, title: str = "", dpi: int = 120) -> Path:
    """Write the five panels of Figure 1 to ``output`` (PNG, matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name_a = _class_name(images.names, images.labels[0], "A")
    name_b = _class_name(images.names, images.labels[1], "B")
    shown = [_display(image, images.mean, images.std) for image in (images.images[0], images.images[1], figure.mixed)]
    fig, axes = plt.subplots(1, 5, figsize=(20, 4.2), gridspec_kw={"width_ratios": [1, 1, 1, 1, 1.6]})
    for axis, picture, caption in zip(axes[:3], shown, (
        f"A: {name_a} ({images.captions[0]})", f"B: {name_b} ({images.captions[1]})", "mixed: B's box in A",
    )):
        axis.imshow(picture)
        axis.set_title(caption)
    _outline(axes[2], figure.box, "red")
    _attention_panel(axes[3], figure, shown[2])
    for axis in axes[:4]:
        axis.set_xticks([])
        axis.set_yticks([])
    _label_panel(axes[4], figure, name_a, name_b)
    predicted = _class_name(images.names, figure.predicted, "")
    fig.suptitle(f"{title}   model's top-1 on the mixed image: {predicted}".strip())
    fig.tight_layout()
    output = Path(output)
    fig.savefig(output, dpi=dpi)
    plt.close(fig)
    return output
