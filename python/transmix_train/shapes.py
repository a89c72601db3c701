"""The trainer's embedded data: a procedurally drawn 10-class image set ("shapes-10").

No downloads are possible on many machines (and none are needed to see TransMix work), so the
demo and the tests draw their images: each class is a shape (disc, square, triangle, ring,
cross, bars, stripes, checker, dots, frame) at a random position, scale and colour on a noisy
background. Object position varies, so CutMix boxes really do cover or miss the object, which
is what TransMix's attention re-weighting is about. Deterministic for a given seed.

``transmix-train --data shapes`` (:mod:`.data`), ``transmix-visualize``'s class names and
``python/mix_demo.py`` read it; the kernel library itself holds no data.
"""

from __future__ import annotations

import torch

__all__ = ["CLASSES", "make_shapes"]

CLASSES = ("disc", "square", "triangle", "ring", "cross", "bars", "stripes", "checker", "dots", "frame")


def _shape_mask(kind: int, yy: torch.Tensor, xx: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool mask of shape `kind`; yy, xx are coordinates relative to each centre."""
    r = radius.view(-1, 1, 1)
    ay, ax = yy.abs(), xx.abs()
    dist = (yy**2 + xx**2).sqrt()
    inside_box = (ay <= r) & (ax <= r)
    masks = {
        0: dist <= r,
        1: inside_box,
        2: (yy <= r) & (yy >= -r) & (ax <= (yy + r) / 2),
        3: (dist <= r) & (dist >= 0.6 * r),
        4: inside_box & ((ay <= 0.3 * r) | (ax <= 0.3 * r)),
        5: inside_box & (torch.remainder(yy / (0.5 * r), 2.0) < 1.0),
        6: inside_box & (torch.remainder((xx + yy) / (0.5 * r), 2.0) < 1.0),
        7: inside_box & ((torch.remainder(yy / (0.5 * r), 2.0) < 1.0) ^ (torch.remainder(xx / (0.5 * r), 2.0) < 1.0)),
        8: inside_box & (torch.remainder(yy / (0.5 * r), 1.0) < 0.45) & (torch.remainder(xx / (0.5 * r), 1.0) < 0.45),
        9: inside_box & ((ay >= 0.7 * r) | (ax >= 0.7 * r)),
    }
    return masks[kind]


def make_shapes(
    count: int, size: int = 224, *, seed: int = 0, dtype: torch.dtype = torch.float32, return_masks: bool = False
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw `count` labelled images.

    Returns:
        images: (count, 3, size, size) in roughly ImageNet-normalised range (mean 0, std ~1).
        labels: (count,) int64 in [0, 10).
        masks: only with ``return_masks=True``: (count, size, size) bool, True on the pixels drawn in
            the shape's colour (the object; everything else is background noise). The images and
            labels are the same, bit for bit, with or without it.

    Example::

        images, labels, masks = make_shapes(8, 32, seed=1, return_masks=True)
    """
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(CLASSES), (count,), generator=gen)
    coords = torch.arange(size, dtype=torch.float32)
    radius = size * (0.12 + 0.18 * torch.rand(count, generator=gen))
    cy = radius + (size - 2 * radius) * torch.rand(count, generator=gen)
    cx = radius + (size - 2 * radius) * torch.rand(count, generator=gen)
    yy = coords.view(1, -1, 1) - cy.view(-1, 1, 1)
    xx = coords.view(1, 1, -1) - cx.view(-1, 1, 1)
    yy, xx = yy.expand(count, size, size), xx.expand(count, size, size)
    mask = torch.zeros(count, size, size, dtype=torch.bool)
    for kind in range(len(CLASSES)):
        rows = labels == kind
        if rows.any():
            mask[rows] = _shape_mask(kind, yy[rows], xx[rows], radius[rows])
    background = 0.3 * torch.rand(count, 3, 1, 1, generator=gen) + 0.15 * torch.randn(count, 3, size, size, generator=gen)
    colour = 0.5 + 0.5 * torch.rand(count, 3, 1, 1, generator=gen)
    images = torch.where(mask.unsqueeze(1), colour, background)
    images = ((images - 0.35) / 0.3).to(dtype)
    return (images, labels, mask) if return_masks else (images, labels)
