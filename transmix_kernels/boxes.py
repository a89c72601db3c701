"""CutMix box sampling with timm's rand_bbox / rand_bbox_minmax semantics, vectorised over samples.

Box sampling is a few scalar operations per sample, so it has one vectorised PyTorch path, which
every impl except "reference" (the per-sample loop twin) runs, on any device; there is no Triton
kernel.
"""

from __future__ import annotations

import torch

from . import reference
from ._checks import check_positive_int, check_range, check_tensor
from ._dispatch import Op, dispatch, resolve_backend

__all__ = ["BOXES", "box_corners", "sample_boxes"]


def box_corners(lam, height: int, width: int, minmax, draws, *, sqrt, to_int, clip):
    """timm's ``rand_bbox`` / ``rand_bbox_minmax`` arithmetic, on torch tensors or NumPy arrays.

    lam: (B,) float; draws: (2, B) or (4, B) uniform [0, 1) float64 (see reference.draw_box_randoms);
    sqrt, to_int (truncation; values are >= 0) and clip come from the array library. Side
    lengths are computed in lam's own precision, as timm does. Returns y0, y1, x0, x1 (B,) ints.
    """
    if minmax is None:
        ratio = sqrt(1 - lam)
        cut_h, cut_w = to_int(height * ratio), to_int(width * ratio)
        cy, cx = to_int(draws[0] * height), to_int(draws[1] * width)
        y0, y1 = clip(cy - cut_h // 2, 0, height), clip(cy + (cut_h + 1) // 2, 0, height)
        x0, x1 = clip(cx - cut_w // 2, 0, width), clip(cx + (cut_w + 1) // 2, 0, width)
        return y0, y1, x0, x1
    lo_h, hi_h = int(height * minmax[0]), int(height * minmax[1])
    lo_w, hi_w = int(width * minmax[0]), int(width * minmax[1])
    cut_h = lo_h + to_int(draws[0] * (hi_h - lo_h))
    cut_w = lo_w + to_int(draws[1] * (hi_w - lo_w))
    y0 = to_int(draws[2] * (height - cut_h + 1))
    x0 = to_int(draws[3] * (width - cut_w + 1))
    return y0, y0 + cut_h, x0, x0 + cut_w


def _boxes_torch(lam, height, width, minmax, correct_lam, generator):
    draws = reference.draw_box_randoms(lam.shape[0], lam.device, minmax is not None, generator)
    y0, y1, x0, x1 = box_corners(
        lam, height, width, minmax, draws, sqrt=torch.sqrt, to_int=lambda t: t.long(), clip=torch.clamp
    )
    boxes = torch.stack([y0, y1, x0, x1], dim=1).to(torch.int32)
    if correct_lam or minmax is not None:
        lam_area = 1.0 - ((y1 - y0) * (x1 - x0)).double() / float(height * width)
    else:
        lam_area = lam.double()
    return boxes, lam_area.float()


# No Triton kernel and no torch.library op: impl="triton" runs the PyTorch path (see sample_boxes).
BOXES = Op("sample_boxes", torch=_boxes_torch, reference=reference.sample_boxes)


def _check_minmax(minmax, height: int, width: int):
    if minmax is None:
        return None
    if not isinstance(minmax, (tuple, list)) or len(minmax) != 2:
        raise ValueError(f"minmax must be a (min, max) pair of box-side ratios, got {minmax!r}")
    lo = check_range("minmax[0]", minmax[0], 0.0, 1.0)
    hi = check_range("minmax[1]", minmax[1], 0.0, 1.0)
    if int(height * lo) >= int(height * hi) or int(width * lo) >= int(width * hi):
        raise ValueError(
            f"minmax={tuple(minmax)} gives an empty range of box sides for a {height}x{width} image: "
            "need int(size * min) < int(size * max)"
        )
    return (lo, hi)


def sample_boxes(
    lam: torch.Tensor,
    height: int,
    width: int,
    *,
    minmax: tuple[float, float] | None = None,
    correct_lam: bool = True,
    generator: torch.Generator | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one CutMix box per sample, as timm's ``rand_bbox`` (or ``rand_bbox_minmax``).

    Args:
        lam: (B,) float32/float64 in [0, 1], the drawn mixing ratios (own-image share). The side
            arithmetic runs in lam's dtype, as timm does (float64 per batch, float32 per element).
        height, width: image size H, W.
        minmax: optional (min, max) box-side ratios; lam is then ignored for the box size.
        correct_lam: lam_area from the clipped box area (always so with minmax).
        generator: torch.Generator on lam's device for the box positions.
        impl: "reference" runs the per-sample twin; "auto", "torch" and "triton" all run the one
            vectorised PyTorch path (there is no Triton kernel; "triton" still requires a
            device Triton could run on, as for every op).

    Returns:
        boxes: (B, 4) int32 ``[y0, y1, x0, x1]``, half-open, clipped to the image.
        lam_area: (B,) float32, the share of each sample's own pixels left visible.

    Example::

        lam = torch.distributions.Beta(1.0, 1.0).sample((64,))
        boxes, lam_area = tk.sample_boxes(lam, 224, 224)
    """
    check_tensor("lam", lam, ndim=1, dtypes=(torch.float32, torch.float64))
    check_positive_int("height", height)
    check_positive_int("width", width)
    minmax = _check_minmax(minmax, height, width)
    if lam.numel() and (not bool(torch.isfinite(lam).all()) or float(lam.min()) < 0 or float(lam.max()) > 1):
        raise ValueError(f"lam must hold values in [0, 1], got values in [{float(lam.min())}, {float(lam.max())}]")
    if generator is not None and generator.device.type != lam.device.type:
        raise ValueError(f"generator must be on lam's device {lam.device}, got {generator.device}")
    backend = resolve_backend(impl, lam.device, BOXES)
    return dispatch(BOXES, backend, lam, height, width, minmax=minmax, correct_lam=correct_lam, generator=generator)
