"""``tk.MixPro``: MaskMix (a patch-aligned grid mask) with Progressive Attention Labeling.

MixPro (Zhao, Huang, Hu, Zhang, Liu, ICLR 2023, arXiv 2304.12043; official code fistyee/MixPro)::

    mixpro = tk.MixPro(num_classes=1000, patch_size=16, mask_size=32)
    images, mix = mixpro(images, target)            # mixes in place
    with tk.ClassAttentionProbe(model) as probe:     # (attach it once, outside the loop)
        logits = model(images)
        loss = criterion(logits, mix.targets(probe, logits=logits))

Where each rule comes from. The stored copies of the paper reachable here give its abstract and
Fig. 1 ("MixPro mixes patches using a patch-like mask. The size of the mask patches is the
multiple of the image patches"; "progressive attention labeling dynamically re-weights λarea and
λattn using a progressive factor (α)"), not its numbered equations; every formula below was
therefore read from the official code, and the file and lines are named.

MaskMix (official ``utils.py::MaskMix``, called from ``main.py::train_one_epoch``):
    - the image is split into cells of ``mask_size`` pixels (``MODEL.MASK_PATCH_SIZE``, 56 for
      DeiT with 14-pixel patches), a multiple of the patch size, so each patch comes from one image;
    - one ratio per batch, ``r ~ Beta(mask_alpha, mask_alpha)`` (``AUG.MASKMIX_ALPHA`` = 1);
      ``ceil(N * r)`` of the N cells keep the image's own pixels, chosen by an independent random
      permutation per sample; the rest come from the partner;
    - ``lam_area = ceil(N * r) / N`` (the own share) and the area label
      ``lam_area * onehot_s(y) + (1 - lam_area) * onehot_s(y_partner)`` (``utils.py::mixup_target``);
    - with probability ``1 - maskmix_prob`` (``AUG.MASKMIX_PROB`` = 0.5) a batch is not MaskMix'ed
      but goes through timm's Mixup / CutMix (``mixup_fn``) and keeps its area label: here a
      ``tk.TransMix`` sharing this object's generator, with timm's arguments.
PAL (official ``main.py`` lines after ``if maskmix and ATTN``):
    - ``lam_attn = sum_j a_j * own_j / sum_j a_j``: the class token's attention of the last block,
      heads averaged, patch tokens only (``models/vit.py``: ``mean(attn[:, :, 0, 1:], 1)``), over the
      tokens of own cells (TransMix's lam_attn: ``tk.transmix_lambda`` with ratio 0);
    - progressive factor ``alpha = cos(area label, softmax(logits))`` per sample (the cosine
      similarity of the prediction and the area label; a model that does not yet predict the mixed
      label gives a small alpha, so its attention counts little);
    - ``lam = alpha * lam_attn + (1 - alpha) * lam_area``;
    - loss ``lam * CE(logits, y) + (1 - lam) * CE(logits, y_partner)`` with hard labels: the soft
      targets ``lam * onehot(y) + (1 - lam) * onehot(y_partner)``, i.e. ``pal_smoothing = 0``.

Our choices, where the official code leaves a freedom or does something we do not:
    - images must split evenly into cells (``H % mask_size == 0``); the official mask is
      ``ceil(H / mask_size)`` cells cropped to the image, so its last cells can be partial;
    - the partner: ``pairing="random"`` (default) draws a permutation from this object's generator,
      as the official ``torch.randperm``; ``"flip"`` pairs i with B-1-i as TransMix;
    - ``alpha`` is computed without gradient (the official one is not detached, so its loss also
      back-propagates through the label weight); targets are labels here;
    - ``pal_smoothing`` lets the PAL targets be label-smoothed (the official loss uses none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ._cell_mix import CellMixer, CellMixState
from ._checks import FLOAT_DTYPES, check_non_negative, check_range, check_tensor
from .mixer import TransMix, check_pair
from .transmix_lambda import mix_targets

__all__ = ["MixPro", "MixProState", "progressive_factor"]

PAIRINGS = ("random", "flip")


@dataclass
class MixProState(CellMixState):
    """What one call of :class:`MixPro` did, and how to label it (TransMix's :class:`MixState` contract).

    ``kind`` is "cutmix" for a MaskMix batch (``mask`` set, ``lam`` = ``lam_area`` = own share of
    cells); otherwise the kind of the Mixup / CutMix branch ("mixup", "cutmix" with ``boxes``,
    "none"), ``mask`` None. Only MaskMix batches get PAL; the others keep their area label.
    """

    pal_smoothing: float = 0.0

    def targets(self, attention=None, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, num_classes) float32 soft targets.

        Args:
            attention: None for the area targets; a (B, N) / (B, heads, N) class-to-patch attention
                of the mixed images, or a ``tk.ClassAttentionProbe`` attached to the model that saw them.
            logits: (B, num_classes) output of that same forward; needed with ``attention`` on a
                MaskMix batch (the progressive factor is the cosine similarity of its softmax and
                the area label).
        """
        if attention is None or self.mask is None:
            return self.area_targets()
        lam = self.lambdas(attention, logits)
        return mix_targets(self.target, lam, self.num_classes, partner=self.partner, smoothing=self.pal_smoothing,
                           impl=self.impl)

    def lambdas(self, attention=None, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B,) float32 own-label share: PAL's ``alpha * lam_attn + (1 - alpha) * lam_area`` on a MaskMix
        batch with attention, else the area share."""
        if attention is None or self.mask is None:
            return self.lam.float()
        alpha = self.progressive_factor(logits)
        lam_attn = self._attention_lambda(attention)  # ratio 0: the attention's own share alone
        # Both shares lie in [0, 1]; the clamp only removes float32 rounding past its ends.
        return (alpha * lam_attn + (1.0 - alpha) * self.lam_area).clamp_(0.0, 1.0)

    def progressive_factor(self, logits: Optional[torch.Tensor]) -> torch.Tensor:
        """(B,) float32 ``alpha = cos(area targets, softmax(logits))`` (official main.py), no gradient."""
        if logits is None:
            raise ValueError(
                "logits is required with attention: MixPro's progressive factor is the cosine similarity of the "
                "model's prediction and the area label; call mix.targets(probe, logits=outputs)"
            )
        check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,), device=self.target.device)
        if tuple(logits.shape) != (self.target.shape[0], self.num_classes):
            raise ValueError(
                f"logits must have shape ({self.target.shape[0]}, {self.num_classes}) (batch, num_classes), "
                f"got {tuple(logits.shape)}"
            )
        return progressive_factor(self.area_targets(), logits)


def progressive_factor(area_targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """PAL's ``alpha = cos(area targets, softmax(logits))`` per sample (official ``main.py``), no gradient.

    Args:
        area_targets: (B, K) the area label of each mixed image; logits: (B, K) the model's output on it.

    Returns:
        (B,) float32 in [0, 1]: near 0 while the prediction disagrees with the area label (early,
        unreliable attention counts little), near 1 once it agrees.
    """
    with torch.no_grad():
        probs = torch.softmax(logits.detach().float(), dim=-1)
        # Two non-negative vectors: cos in [0, 1] (clamped for rounding).
        return torch.cosine_similarity(area_targets.float(), probs, dim=1).clamp_(0.0, 1.0)


class MixPro(CellMixer):
    """MaskMix + Progressive Attention Labeling (see the module docstring for each rule's source).

    Args:
        num_classes: K.
        mask_size: the mask cell in pixels (int or (h, w)); a multiple of the patch size that divides
            the image (official DeiT configs: 56 with 14-pixel patches at 224).
        mask_alpha: Beta(alpha, alpha) of the batch's own-cell ratio (official ``MASKMIX_ALPHA`` 1.0).
        maskmix_prob: P(a batch is MaskMix'ed) (official ``MASKMIX_PROB`` 0.5); the other batches go
            through timm's Mixup / CutMix with ``mixup_alpha``, ``cutmix_alpha``, ``cutmix_minmax``,
            ``prob``, ``switch_prob``, ``mode``, ``correct_lam`` (as ``tk.TransMix``).
        label_smoothing: s of the area targets (and of the cosine's area label).
        pal_smoothing: s of the PAL targets (official: 0, hard labels).
        pairing: "random" (official: a random permutation per batch) or "flip" (i with B-1-i).
        patch_size / token_grid / model: the token grid, as ``tk.TransMix`` (needed for a fused
            token mask; the probe's grid is used otherwise).
        seed / generator: the one NumPy generator of every draw (as ``tk.TransMix``).
        impl: backend of the ops.

    Calling it mixes ``images`` (B, C, H, W) in place and returns ``(images, MixProState)``.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        mask_size: int | tuple[int, int],
        mask_alpha: float = 1.0,
        maskmix_prob: float = 0.5,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        cutmix_minmax: tuple[float, float] | None = None,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        correct_lam: bool = True,
        label_smoothing: float = 0.1,
        pal_smoothing: float = 0.0,
        pairing: str = "random",
        patch_size: int | tuple[int, int] | None = None,
        token_grid: tuple[int, int] | None = None,
        model: torch.nn.Module | None = None,
        seed: int | None = None,
        impl: str = "auto",
        generator: np.random.Generator | None = None,
    ) -> None:
        super().__init__(num_classes, label_smoothing=label_smoothing, patch_size=patch_size, token_grid=token_grid,
                         model=model, seed=seed, generator=generator, impl=impl)
        self.mask_size = check_pair("mask_size", mask_size)
        if self.mask_size is None:
            raise ValueError("mask_size must be a positive int or a pair of positive ints, got None")
        if self.patch_size is not None and any(m % p for m, p in zip(self.mask_size, self.patch_size)):
            raise ValueError(f"mask_size {self.mask_size} must be a multiple of patch_size {self.patch_size} "
                             "(each patch must come from one image)")
        self.mask_alpha = check_non_negative("mask_alpha", mask_alpha)
        if self.mask_alpha == 0:
            raise ValueError("mask_alpha must be > 0 (the Beta distribution of the own-cell ratio)")
        self.maskmix_prob = check_range("maskmix_prob", maskmix_prob, 0.0, 1.0)
        self.pal_smoothing = check_range("pal_smoothing", pal_smoothing, 0.0, 1.0)
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
        self.pairing = pairing
        # timm's Mixup / CutMix for the other batches, drawing from the same generator.
        self._timm = None
        if self.maskmix_prob < 1.0:
            self._timm = TransMix(
                num_classes, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, cutmix_minmax=cutmix_minmax,
                prob=prob, switch_prob=switch_prob, mode=mode, correct_lam=correct_lam,
                label_smoothing=label_smoothing, patch_size=patch_size, token_grid=token_grid, model=model,
                impl=impl, generator=self.rng,
            )

    def _cell_grid(self, height: int, width: int) -> tuple[int, int]:
        mh, mw = self.mask_size
        if height % mh or width % mw:
            raise ValueError(f"mask_size {self.mask_size} must divide the {height}x{width} images into whole cells")
        return height // mh, width // mw

    def draw_cells(self, batch: int, cells: tuple[int, int]) -> np.ndarray:
        """(B, gh, gw) bool, True = the cell comes from the partner (official utils.py::MaskMix)."""
        count = cells[0] * cells[1]
        ratio = self.rng.beta(self.mask_alpha, self.mask_alpha)
        own = int(np.ceil(count * ratio))
        order = self.rng.permuted(np.tile(np.arange(count), (batch, 1)), axis=1)
        pasted = np.ones((batch, count), dtype=bool)
        np.put_along_axis(pasted, order[:, :own], False, axis=1)
        return pasted.reshape(batch, *cells)

    def __call__(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, MixProState]:
        """Mix ``images`` (B, C, H, W) in place; ``target`` (B,) int64. Returns (images, MixProState)."""
        grid = self._check_call(images, target)
        batch, _, height, width = images.shape
        cells = self._cell_grid(height, width)
        extra = dict(ratio=0.0, pal_smoothing=self.pal_smoothing)
        if not self.mixup_enabled:
            return images, self._unmixed(images, target, MixProState, **extra)
        if self._timm is not None and self.rng.random() >= self.maskmix_prob:
            images, state = self._timm(images, target)
            return images, MixProState.of(state, pal_smoothing=self.pal_smoothing)
        pasted = self.draw_cells(batch, cells)
        partner = self.rng.permutation(batch) if self.pairing == "random" else np.arange(batch - 1, -1, -1)
        with torch.no_grad():
            return images, self._paste(images, target, pasted, partner, grid, MixProState, **extra)
