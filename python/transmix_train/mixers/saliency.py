"""``--mix saliencymix``: SaliencyMix (Uddin et al., ICLR 2021) as the TransMix paper compared it.

The CutMix box is centred on the partner's saliency peak instead of a uniform position; its
size comes from lam as in CutMix (timm's ``rand_bbox`` arithmetic, ``transmix_kernels.boxes``),
and the partner's pixels in that box are pasted (``tk.cutmix_paste``, one call per batch).
Targets use the clipped box's area (``tk.mix_targets``).

Saliency: OpenCV's static fine-grained saliency (``cv2.saliency.StaticSaliencyFineGrained``,
opencv-contrib, the extra ``saliency`` of this package), as the paper's supplementary A.2 says.

Differences from the official SaliencyMix code, on purpose:
- one box *per sample*, centred on each partner's own peak; the official code computes the
  saliency of the first partner only and pastes that one box for the whole batch;
- the box half-sides follow timm's ``rand_bbox`` (``cut // 2`` before, ``(cut + 1) // 2`` after
  the centre); the official code uses ``cut // 2`` on both sides (one pixel smaller for odd sides);
- the detector sees each image min-max scaled to uint8 (the official code hands it the
  normalised float tensor);
- each image is edge-padded (replicated) by a quarter of its side and the map cropped back: on
  small images the detector otherwise fires at the image border (unpadded 32 px test images
  peaked in a corner for most spots; padded, on or next to the spot);
- the peak is the arg-max of the map after a 3x3 box blur: the fine-grained map saturates at
  1.0 in several places (image borders included), and the official first arg-max in row-major
  order then picks the top-most of them rather than the salient object.

Cost: OpenCV's detector takes one image per call and has no batched form (a mosaic of the batch
in one call measured no faster, and its centre-surround filters would leak across tiles), so the
batch goes through a Python loop over images on the CPU: about 1 ms per 32x32 image on this
machine's loaded CPU core, i.e. about 0.13 s per batch of 128 (see docs/experiments/README.md).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

import transmix_kernels as tk
from transmix_kernels.boxes import box_corners

from .base import PairMixState, SwitchedMixer

__all__ = ["SaliencyMix", "saliency_boxes", "saliency_detector", "saliency_peaks"]


def saliency_detector():
    """A ``cv2.saliency.StaticSaliencyFineGrained``; an ImportError saying what to install if missing."""
    try:
        import cv2

        return cv2.saliency.StaticSaliencyFineGrained_create()
    except (ImportError, AttributeError) as error:
        raise ImportError(
            "SaliencyMix needs OpenCV's contrib module 'saliency' (cv2.saliency): install the extra, "
            "pip install 'transmix-kernels[saliency]' (opencv-contrib-python-headless); a plain "
            f"opencv-python lacks it ({type(error).__name__}: {error})"
        ) from None


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) float -> (B, H, W, C) uint8 on the host, each image min-max scaled (one transfer)."""
    flat = images.detach().float().flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    scaled = (flat - low) / (high - low).clamp_min(1e-12) * 255.0
    return scaled.round().to(torch.uint8).view_as(images).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def saliency_peaks(images: torch.Tensor, detector=None) -> np.ndarray:
    """(B, C, H, W) float images -> (B, 2) int64 ``[y, x]`` of each image's saliency maximum.

    C must be 1 or 3 (what OpenCV's detector accepts). ``detector`` defaults to a new
    :func:`saliency_detector`.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, 1 or 3, H, W) for OpenCV's saliency, got {tuple(images.shape)}")
    detector = detector or saliency_detector()
    pixels = _to_uint8(images)
    width = images.shape[-1]
    peaks = np.empty((images.shape[0], 2), dtype=np.int64)
    import cv2

    height = images.shape[-2]
    pad_y, pad_x = max(height // 4, 1), max(width // 4, 1)
    for index, image in enumerate(pixels):  # the detector takes one image per call (module docstring)
        padded = cv2.copyMakeBorder(image, pad_y, pad_y, pad_x, pad_x, cv2.BORDER_REPLICATE)
        ok, saliency = detector.computeSaliency(padded)
        saliency = saliency[pad_y:pad_y + height, pad_x:pad_x + width]  # border effects stay outside
        if not ok:
            raise RuntimeError(f"OpenCV's saliency failed on image {index} of the batch")
        flat = int(np.argmax(cv2.blur(saliency, (3, 3))))  # ties of the saturated map: module docstring
        peaks[index] = divmod(flat, width)
    return peaks


def saliency_boxes(peaks: np.ndarray, lam: float, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """CutMix boxes of own share ``lam`` centred on ``peaks`` (B, 2) ``[y, x]``, clipped to the image.

    Returns boxes (B, 4) int32 ``[y0, y1, x0, x1]`` and lam_area (B,) float64, the own-pixel
    share after clipping (timm's ``correct_lam``).
    """
    # rand_bbox takes the centre as int(u * size) for a uniform u: u = (peak + 0.5) / size gives
    # exactly the peak, so the box arithmetic is timm's, only the centre is chosen.
    draws = np.stack([(peaks[:, 0] + 0.5) / height, (peaks[:, 1] + 0.5) / width])
    lams = np.full(peaks.shape[0], lam, dtype=np.float64)
    y0, y1, x0, x1 = box_corners(lams, height, width, None, draws, sqrt=np.sqrt,
                                 to_int=lambda a: a.astype(np.int64), clip=np.clip)
    boxes = np.stack([y0, y1, x0, x1], axis=1).astype(np.int32)
    lam_area = 1.0 - (y1 - y0).astype(np.float64) * (x1 - x0) / float(height * width)
    return boxes, lam_area


class SaliencyMix(SwitchedMixer):
    """SaliencyMix with TransMix's interface (see the module docstring; switch as ``SwitchedMixer``).

    Example::

        mixer = SaliencyMix(num_classes=10, seed=0)
        images, state = mixer(images, labels)        # images (B, 3, H, W), mixed in place
        loss = SoftTargetCrossEntropy()(model(images), state.targets())
    """

    name = "saliencymix"

    def __init__(self, num_classes: int, *, mixup_alpha: float = 0.8, alpha: float = 1.0, switch_prob: float = 0.5,
                 prob: float = 1.0, label_smoothing: float = 0.1, seed: Optional[int] = None) -> None:
        super().__init__(num_classes, mixup_alpha=mixup_alpha, alpha=alpha, switch_prob=switch_prob, prob=prob,
                         label_smoothing=label_smoothing, seed=seed)
        self.detector = saliency_detector()  # fails at construction, before a run writes anything

    def _mix(self, images: torch.Tensor, target: torch.Tensor, partner: torch.Tensor) -> PairMixState:
        _, _, height, width = images.shape
        lam = self.draw_lam()
        peaks = saliency_peaks(images, self.detector)[partner.cpu().numpy()]  # the partner's peak
        boxes, lam_area = saliency_boxes(peaks, lam, height, width)
        boxes_dev = torch.from_numpy(boxes).to(images.device)
        tk.cutmix_paste(images, boxes_dev, partner, inplace=True)
        lam_t = torch.from_numpy(lam_area).to(images.device, torch.float32)
        return PairMixState(self.name, target, partner, lam_t, self.num_classes, self.smoothing, boxes=boxes_dev)
