"""What the compared mixers (SaliencyMix, Attentive-CutMix, Puzzle-Mix) share with ``tk.TransMix``.

Each has TransMix's interface::

    images, state = mixer(images, target)   # images (B, C, H, W) mixed in place, target (B,) int64
    targets = state.targets(probe)          # (B, K) float32 soft targets (the probe is ignored)

and the DeiT recipe's switch: with probability ``prob`` a batch is mixed; a mixed batch is a
Mixup batch with probability ``1 - switch_prob`` (when ``mixup_alpha > 0``, exactly as timm's
Mixup/CutMix switch) and otherwise gets the method's own paste, which takes CutMix's place.
Samples are paired as in the reference code: image i with image B-1-i (``partner``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

import transmix_kernels as tk
from transmix_kernels._checks import (
    FLOAT_DTYPES,
    check_batch,
    check_index_range,
    check_non_negative,
    check_positive_int,
    check_range,
    check_tensor,
    flipped_partner,
)

__all__ = ["PairMixState", "SwitchedMixer", "cells_to_pixels", "paste_mask"]


@dataclass
class PairMixState:
    """How one batch was mixed and how to label it.

    Attributes:
        kind: "none", "mixup" or the method's name (its own paste).
        target: (B,) int64 labels; partner: (B,) int64, the image mixed into each row.
        lam: (B,) float32 own-label share (1 - the pasted pixel share for a paste).
        mask: (B, 1, H, W) bool, True where the pixel came from the partner, or None.
        boxes: (B, 4) int32 ``[y0, y1, x0, x1]`` for box pastes, or None.
    """

    kind: str
    target: torch.Tensor
    partner: torch.Tensor
    lam: torch.Tensor
    num_classes: int
    smoothing: float
    mask: Optional[torch.Tensor] = None
    boxes: Optional[torch.Tensor] = None

    def targets(self, attention=None) -> torch.Tensor:
        """(B, num_classes) float32: ``lam * onehot_s(y) + (1 - lam) * onehot_s(y[partner])``.

        ``attention`` is accepted for the trainer's interface and ignored: these methods label by
        their own lam (area or mask share), never by the transformer's attention.
        """
        return tk.mix_targets(self.target, self.lam, self.num_classes, partner=self.partner,
                              smoothing=self.smoothing)


def cells_to_pixels(cells: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, gh, gw) bool cell mask -> (B, 1, H, W) bool pixel mask by nearest lookup.

    Pixel (y, x) belongs to cell (y * gh // H, x * gw // W): exact tiles when H, W are multiples
    of the grid, otherwise cells one pixel wider or narrower.
    """
    _, gh, gw = cells.shape
    rows = torch.arange(height, device=cells.device) * gh // height
    cols = torch.arange(width, device=cells.device) * gw // width
    return cells[:, rows][:, :, cols].unsqueeze(1)


def paste_mask(images: torch.Tensor, mask: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """In place: ``images[b] = where(mask[b], images[partner[b]], images[b])``; returns the own share.

    images: (B, C, H, W) float; mask: (B, 1, H, W) bool; partner: (B,) int64.
    Returns lam: (B,) float32, the share of each image's own pixels left visible.
    """
    # where() reads the unmixed batch for every row before copy_ writes (any partner permutation).
    images.copy_(torch.where(mask, images[partner], images))
    return 1.0 - mask.flatten(1).float().mean(1)


class SwitchedMixer:
    """Base of the compared mixers: checks, the Mixup/method switch, the unmixed case.

    Subclasses implement ``_mix(images, target, partner) -> PairMixState`` (in place). ``rng`` is
    the one NumPy generator of every draw (the Mixup branch shares it), so the trainer's
    checkpoints capture and restore the mixer exactly.

    Args:
        num_classes: K. mixup_alpha: Beta alpha of the Mixup branch (0: never Mixup).
        alpha: Beta alpha of the method's own lam (CutMix's 1.0 by default).
        switch_prob: P(method) when Mixup is on. prob: P(a batch is mixed at all).
        label_smoothing: s of the targets. seed: seeds ``rng``.
    """

    name = "switched"

    def __init__(self, num_classes: int, *, mixup_alpha: float = 0.8, alpha: float = 1.0, switch_prob: float = 0.5,
                 prob: float = 1.0, label_smoothing: float = 0.1, seed: Optional[int] = None) -> None:
        # tk.TransMix's own checks: one rule for every mixer (types: TypeError, values: ValueError).
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.mixup_alpha = check_non_negative("mixup_alpha", mixup_alpha)
        self.alpha = check_non_negative("alpha", alpha)
        self.switch_prob = check_range("switch_prob", switch_prob, 0.0, 1.0)
        self.prob = check_range("prob", prob, 0.0, 1.0)
        self.smoothing = check_range("label_smoothing", label_smoothing, 0.0, 1.0)
        self.rng = np.random.default_rng(seed)
        self._mixup: Optional[tk.TransMix] = None
        if self.mixup_alpha > 0:
            # One generator for every draw (see the class docstring).
            self._mixup = tk.TransMix(num_classes, mixup_alpha=self.mixup_alpha, cutmix_alpha=0.0,
                                      label_smoothing=self.smoothing, generator=self.rng)

    def state_dict(self) -> dict:
        """Where the draws stand (``tk.TransMix``'s protocol: the Mixup branch shares the generator)."""
        return {"generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["generator"]

    def draw_lam(self) -> float:
        """The batch's own-image share from Beta(alpha, alpha) (1.0 when alpha is 0)."""
        return float(self.rng.beta(self.alpha, self.alpha)) if self.alpha > 0 else 1.0

    def check_call(self, images: torch.Tensor, target: torch.Tensor) -> None:
        """Clear errors naming the argument, before anything is touched (``tk.TransMix``'s checks)."""
        check_tensor("images", images, ndim=4, dtypes=FLOAT_DTYPES)
        batch = images.shape[0]
        if batch < 2 or batch % 2:
            raise ValueError(f"images must hold an even batch of at least 2 (pairs i, B-1-i), got {batch}")
        check_tensor("target", target, ndim=1, dtypes=(torch.int64,), device=images.device)
        check_batch("target", target, batch)
        check_index_range("target", target, 0, self.num_classes)

    def __call__(self, images: torch.Tensor, target: torch.Tensor):
        """Mix ``images`` (B, C, H, W) in place; ``target`` (B,) int64. Returns (images, state)."""
        self.check_call(images, target)
        partner = flipped_partner(images.shape[0], images.device)
        if self.rng.random() >= self.prob:
            lam = torch.ones(images.shape[0], device=images.device)
            return images, PairMixState("none", target, partner, lam, self.num_classes, self.smoothing)
        if self._mixup is not None and self.rng.random() >= self.switch_prob:
            return self._mixup(images, target)
        with torch.no_grad():
            return images, self._mix(images, target, partner)

    def _mix(self, images: torch.Tensor, target: torch.Tensor, partner: torch.Tensor) -> PairMixState:
        raise NotImplementedError
