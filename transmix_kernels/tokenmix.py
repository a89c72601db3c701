"""``tk.TokenMix``: token-level mixing with several separated block regions, labelled by a teacher's
activation maps or, without a teacher, by the student's own class attention.

TokenMix (Liu, Liu, Zhou, Li, Liu, ECCV 2022, arXiv 2207.08409; official code Sense-X/TokenMix)::

    tokenmix = tk.TokenMix(num_classes=1000, patch_size=16)
    images, mix = tokenmix(images, target)                       # mixes in place
    targets = mix.targets(activation_maps=cams)                   # teacher: (B, h, w) maps, own class
    targets = mix.targets(probe)                                  # teacher-free: TransMix's rule

Where each rule comes from. The stored copies of the paper reachable here give its abstract
("TokenMix mixes two images at token level via partitioning the mixing region into multiple
separated parts"; "assign the target score according to the content-based neural activation maps
of the two images from a pre-trained teacher model"), not its numbered equations; the formulas
below were read from the official ``tokenmix.py`` (``generate_mask`` and ``Mixup.__call__``).

Mask (official ``generate_mask``, the block-wise masking of BEiT, ``mask_type="block"``):
    - on the token grid (th, tw) (official: 14 x 14), target count
      ``n = min(N, int(mask_ratio * N) + min_tokens)`` with ``mask_ratio = 1 - lam_constant = 0.5``
      and ``min_tokens = 14`` (``minimum_tokens``); the Beta draw of timm's switch is not used;
    - repeat until n tokens are masked or no block fits: up to 10 attempts of a block of area
      ``U(1, n - masked)`` tokens and aspect ratio ``exp(U(log 0.3, log 1/0.3))``, sides
      ``h = round(sqrt(area * aspect))``, ``w = round(sqrt(area / aspect))``, ``h < th``, ``w < tw``,
      top-left uniform; kept when it adds between 1 and ``n - masked`` new tokens;
    - one mask for the whole batch; masked tokens come from the partner, image i with B-1-i
      (``x.flip(0)``); ``lam_area = 1 - masked / N``.
Teacher label (official ``Mixup.__call__``, the ``mask is not None`` branch):
    - ``A_b``: the teacher's activation map of image b for its own class on the unmixed image
      (official: ReLabel NFNet-F6 label maps, RoI-aligned to the crop at 14 x 14), normalised
      ``Â_b = A_b / (sum A_b + 1e-8)``;
    - ``lam_own[b] = sum Â_b * (1 - M)``, ``lam_partner[b] = sum Â_{partner(b)} * M``;
    - ``targets = y1 + y2`` with ``y1 = onehot(y_b; on = lam_own - s/2 + off/2, off = off/2)``,
      ``y2 = onehot(y_partner; on = lam_partner - s/2 + off/2, off = off/2)``, ``off = s / K``:
      rows sum to ``lam_own + lam_partner``, which is not 1 in general (it is what the paper
      intends: a region with little of either object carries less label).
    ``normalize_teacher=True`` (ours, not official) uses ``lam = lam_own / (lam_own + lam_partner)``
    in the usual ``lam * onehot_s(y) + (1 - lam) * onehot_s(y_partner)`` instead, rows summing to 1.
Teacher-free (ours, as the task asks): TransMix's rule on the token mask, ``lam = ratio * lam_area +
(1 - ratio) * lam_attn`` from the probe (``tk.transmix_lambda`` / the fused kernels).
Switch (official ``Mixup._params_per_batch``, timm's): with probability ``prob`` a batch is mixed;
when ``mixup_alpha > 0`` it is a TokenMix batch with probability ``switch_prob`` and a Mixup batch
(area label) otherwise.

Our choices: activation maps of any (h, w) that is a multiple of the token grid (the mask is
repeated over each token's map cells); the generator draws from NumPy, not Python's ``random``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ._cell_mix import CellMixer, CellMixState
from ._checks import FLOAT_DTYPES, check_batch, check_non_negative, check_range, check_tensor, is_int
from .mixer import TransMix
from .transmix_lambda import mix_targets

__all__ = ["TokenMix", "TokenMixState", "block_mask"]


def block_mask(rng: np.random.Generator, grid: tuple[int, int], num_masked: int, *, min_aspect: float = 0.3,
               attempts: int = 10) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """TokenMix's block-wise mask (official ``generate_mask``): (th, tw) bool and the blocks drawn.

    Blocks are ``(top, left, h, w)`` rectangles of the token grid, each adding at least one new
    token; the mask is their union, with at most ``num_masked`` tokens.
    """
    th, tw = grid
    mask = np.zeros((th, tw), dtype=bool)
    log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
    blocks: list[tuple[int, int, int, int]] = []
    masked = 0
    while masked < num_masked:
        room = min(num_masked - masked, th * tw)
        added = 0
        for _ in range(attempts):
            area = rng.uniform(1, room)
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < tw and h < th:
                top, left = int(rng.integers(0, th - h + 1)), int(rng.integers(0, tw - w + 1))
                new = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < new <= room:
                    mask[top:top + h, left:left + w] = True
                    blocks.append((top, left, h, w))
                    added = new
            if added:
                break
        if not added:
            break
        masked += added
    return mask, blocks


@dataclass
class TokenMixState(CellMixState):
    """What one call of :class:`TokenMix` did, and how to label it (TransMix's :class:`MixState` contract).

    ``kind`` "cutmix" for a TokenMix batch (``mask`` (B, th, tw) set), "mixup" / "none" otherwise
    (``mask`` None, area label). ``blocks``: the (top, left, h, w) token blocks of the batch's mask.
    """

    normalize_teacher: bool = False
    blocks: tuple = ()

    def targets(self, attention=None, *, activation_maps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, num_classes) float32 soft targets.

        Args:
            attention: teacher-free: a (B, N) / (B, heads, N) class-to-patch attention of the mixed
                images or a ``tk.ClassAttentionProbe`` (TransMix's rule on the token mask).
            activation_maps: (B, h, w) non-negative teacher activation of each *unmixed* image for
                its own class, (h, w) a multiple of the token grid: the official teacher rule.
        Neither: the area targets. Mixup and unmixed batches always keep the area targets.
        """
        if activation_maps is None or self.mask is None:
            self._check_one_source(attention, activation_maps)
            return super().targets(attention)
        self._check_one_source(attention, activation_maps)
        lam_own, lam_partner = self.teacher_lambdas(activation_maps)
        if self.normalize_teacher:
            return mix_targets(self.target, _share(lam_own, lam_partner, self.lam_area), self.num_classes,
                               partner=self.partner, smoothing=self.smoothing, impl=self.impl)
        off = self.smoothing / self.num_classes
        own = self._one_hot(self.target, lam_own - self.smoothing / 2 + off / 2, off / 2)
        return own + self._one_hot(self.target[self.partner], lam_partner - self.smoothing / 2 + off / 2, off / 2)

    def lambdas(self, attention=None, *, activation_maps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B,) float32 own-label weight as :meth:`targets` uses it (teacher: ``lam_own``, or its
        normalised share with ``normalize_teacher``)."""
        self._check_one_source(attention, activation_maps)
        if activation_maps is None or self.mask is None:
            return super().lambdas(attention)
        lam_own, lam_partner = self.teacher_lambdas(activation_maps)
        return _share(lam_own, lam_partner, self.lam_area) if self.normalize_teacher else lam_own

    def teacher_lambdas(self, activation_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lam_own, lam_partner), (B,) float32 each: the share of each image's normalised teacher map
        that stays visible (own, outside the mask) and that is pasted (partner's, inside it)."""
        if self.mask is None:
            raise ValueError(f"this batch was not token-mixed (kind {self.kind!r}): it has no teacher label")
        maps = check_tensor("activation_maps", activation_maps, ndim=3, dtypes=FLOAT_DTYPES + (torch.float64,),
                            device=self.target.device)
        check_batch("activation_maps", maps, self.target.shape[0], like="the mixed images")
        (h, w), (gh, gw) = maps.shape[1:], self.mask.shape[1:]
        if h % gh or w % gw or h == 0 or w == 0:
            raise ValueError(
                f"activation_maps must be (B, h, w) with (h, w) a multiple of the token grid {(gh, gw)}, "
                f"got shape {tuple(maps.shape)}"
            )
        lo, hi = (float(v) for v in torch.aminmax(maps.detach()))
        if not (math.isfinite(lo) and math.isfinite(hi) and lo >= 0):
            raise ValueError(f"activation_maps must be finite and non-negative, got values in [{lo}, {hi}]")
        maps = maps.detach().float()
        maps = maps / (maps.sum((1, 2), keepdim=True) + 1e-8)  # official: Â = A / (sum A + 1e-8)
        pasted = self.mask.repeat_interleave(h // gh, 1).repeat_interleave(w // gw, 2).float()
        return (maps * (1.0 - pasted)).sum((1, 2)), (maps[self.partner] * pasted).sum((1, 2))

    def _one_hot(self, labels: torch.Tensor, on: torch.Tensor, off: float) -> torch.Tensor:
        out = torch.full((labels.shape[0], self.num_classes), off, device=labels.device, dtype=torch.float32)
        return out.scatter_(1, labels.view(-1, 1), on.view(-1, 1).float())

    @staticmethod
    def _check_one_source(attention, activation_maps) -> None:
        if attention is not None and activation_maps is not None:
            raise ValueError("give attention (teacher-free) or activation_maps (teacher), not both")


def _share(lam_own: torch.Tensor, lam_partner: torch.Tensor, lam_area: torch.Tensor) -> torch.Tensor:
    """lam_own / (lam_own + lam_partner); the area share where both are 0."""
    total = lam_own + lam_partner
    return torch.where(total > 0, lam_own / torch.where(total > 0, total, torch.ones_like(total)), lam_area)


class TokenMix(CellMixer):
    """TokenMix with the official block masks (see the module docstring for each rule's source).

    Args:
        num_classes: K.
        mixup_alpha: Beta alpha of the Mixup branch (0: every mixed batch is a TokenMix batch).
        switch_prob: P(TokenMix) of a mixed batch when Mixup is on (timm's CutMix switch, 0.5).
        prob: P(a batch is mixed at all).
        mask_ratio: the masked share before ``min_tokens`` (official ``1 - lam_constant`` = 0.5).
        min_tokens: tokens added to the target count (official ``minimum_tokens`` = 14).
        min_aspect: smallest block aspect ratio (official 0.3; the largest is its inverse).
        label_smoothing: s of the targets. ratio: area weight of the teacher-free (TransMix) rule.
        normalize_teacher: rows of the teacher targets sum to 1 (ours; official: they sum to
            lam_own + lam_partner).
        patch_size / token_grid / model: the token grid (required: the mask is drawn on it).
        seed / generator: the one NumPy generator of every draw (as ``tk.TransMix``).
        impl: backend of the ops.

    Calling it mixes ``images`` (B, C, H, W) in place and returns ``(images, TokenMixState)``.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        mixup_alpha: float = 0.8,
        switch_prob: float = 0.5,
        prob: float = 1.0,
        mask_ratio: float = 0.5,
        min_tokens: int = 14,
        min_aspect: float = 0.3,
        label_smoothing: float = 0.1,
        ratio: float = 0.5,
        normalize_teacher: bool = False,
        patch_size: int | tuple[int, int] | None = None,
        token_grid: tuple[int, int] | None = None,
        model: torch.nn.Module | None = None,
        seed: int | None = None,
        impl: str = "auto",
        generator: np.random.Generator | None = None,
    ) -> None:
        super().__init__(num_classes, label_smoothing=label_smoothing, patch_size=patch_size, token_grid=token_grid,
                         model=model, seed=seed, generator=generator, impl=impl)
        if self.patch_size is None and self.token_grid is None and model is None:
            raise ValueError("TokenMix mixes whole tokens: give patch_size, token_grid or model")
        self.mixup_alpha = check_non_negative("mixup_alpha", mixup_alpha)
        self.switch_prob = check_range("switch_prob", switch_prob, 0.0, 1.0)
        self.prob = check_range("prob", prob, 0.0, 1.0)
        self.mask_ratio = check_range("mask_ratio", mask_ratio, 0.0, 1.0)
        if not is_int(min_tokens) or min_tokens < 0:
            raise ValueError(f"min_tokens must be an int >= 0, got {min_tokens!r}")
        self.min_tokens = min_tokens
        self.min_aspect = check_range("min_aspect", min_aspect, 0.0, 1.0)
        if self.min_aspect == 0:
            raise ValueError("min_aspect must be in (0, 1], got 0")
        self.ratio = check_range("ratio", ratio, 0.0, 1.0)
        self.normalize_teacher = bool(normalize_teacher)
        self._mixup = None
        if self.mixup_alpha > 0:
            self._mixup = TransMix(num_classes, mixup_alpha=self.mixup_alpha, cutmix_alpha=0.0,
                                   label_smoothing=label_smoothing, impl=impl, generator=self.rng)

    def num_masked(self, grid: tuple[int, int]) -> int:
        """The official target count ``min(N, int(mask_ratio * N) + min_tokens)``."""
        count = grid[0] * grid[1]
        return min(count, int(self.mask_ratio * count) + self.min_tokens)

    def __call__(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, TokenMixState]:
        """Mix ``images`` (B, C, H, W) in place; ``target`` (B,) int64. Returns (images, TokenMixState)."""
        grid = self._check_call(images, target)
        batch, _, height, width = images.shape
        if height % grid[0] or width % grid[1]:
            raise ValueError(f"token grid {grid} must split the {height}x{width} images into whole patches")
        extra = dict(ratio=self.ratio, normalize_teacher=self.normalize_teacher)
        if not self.mixup_enabled or self.rng.random() >= self.prob:
            return images, self._unmixed(images, target, TokenMixState, **extra)
        if self._mixup is not None and self.rng.random() >= self.switch_prob:
            images, state = self._mixup(images, target)
            return images, TokenMixState.of(state, **extra)
        mask, blocks = block_mask(self.rng, grid, self.num_masked(grid), min_aspect=self.min_aspect)
        cells = np.broadcast_to(mask, (batch, *grid))  # one mask for the batch (official)
        partner = np.arange(batch - 1, -1, -1)
        with torch.no_grad():
            state = self._paste(images, target, cells, partner, grid, TokenMixState, blocks=tuple(blocks), **extra)
        return images, state
