"""``--mix attentive_cutmix``: Attentive-CutMix (Walawalkar et al., 2020) as the TransMix paper compared it.

A frozen CNN feature extractor scores a 7x7 grid of cells of the partner image; the partner's
top-k cells are pasted at the same positions; the partner's label share is the pasted share,
``k / 49`` (own lam ``1 - k / 49``; when H or W is not a multiple of 7 the cells are whole
pixels of unequal size and lam is the exact pixel share).

The extractor: the paper used an ImageNet ResNet-50 (25M parameters, 46M with DeiT-S). No model
hub is reachable here, so its weights come from a ``transmix-train`` checkpoint of a timm CNN
(``--attentive-checkpoint``); ``transmix-experiment`` first trains one on the same training
split when none is given. That extractor has seen only the training split of the small data
set, where the paper's had seen ImageNet: the comparison keeps the method, not its prior.

Cell scores: the channel mean of the deepest feature map whose stride ``s`` keeps the resized
input ``7 * s`` at most twice the image side (224 px: ResNet's last stage, 7x7 as in the paper;
32 px: the stride-8 stage on a 56 px input); the map is average-pooled to 7x7 when its size
differs (a channel sum, as in the unofficial code the paper used, ranks cells the same way).
The default ``topk`` 6 is the value we recall from the Attentive-CutMix paper; it is not
checked against that text here (``--attentive-topk`` changes it).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transmix_kernels._checks import check_positive_int

from .base import PairMixState, SwitchedMixer, cells_to_pixels, paste_mask

__all__ = ["AttentiveCutMix", "CellScorer", "load_cell_scorer"]


class CellScorer(nn.Module):
    """Frozen timm CNN -> (B, grid*grid) cell scores of (B, C, H, W) images (no gradients).

    The model must offer timm's ``feature_info`` and ``forward_intermediates`` (timm's ResNets,
    ConvNeXts, EfficientNets, RegNets, ...).
    """

    def __init__(self, model: nn.Module, grid: int = 7) -> None:
        super().__init__()
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "feature_info"):
            raise ValueError(f"{type(model).__name__} has no timm feature_info/forward_intermediates: "
                             "Attentive-CutMix needs a timm CNN (e.g. resnet18, resnet50)")
        self.model, self.grid = model.eval().requires_grad_(False), check_positive_int("grid", grid)
        self.reductions = [int(info["reduction"]) for info in model.feature_info]

    def level_for(self, size: int) -> int:
        """Index of the deepest feature level whose ``grid * stride`` is at most ``2 * size``."""
        fitting = [i for i, s in enumerate(self.reductions) if self.grid * s <= 2 * size]
        return fitting[-1] if fitting else 0

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) float, normalised as the extractor was trained -> (B, grid*grid) float32."""
        self.model.eval()  # stays frozen even when the trainer calls .train() on everything
        level = self.level_for(max(images.shape[-2:]))
        side = self.grid * self.reductions[level]
        resized = F.interpolate(images.float(), size=(side, side), mode="bilinear", align_corners=False)
        features = self.model.forward_intermediates(resized, indices=[level], intermediates_only=True,
                                                       stop_early=True)[-1]
        if tuple(features.shape[-2:]) != (self.grid, self.grid):
            features = F.adaptive_avg_pool2d(features, self.grid)
        return features.float().mean(1).flatten(1)


def load_cell_scorer(path: str, num_classes: int, device: torch.device | str = "cpu", grid: int = 7) -> CellScorer:
    """A :class:`CellScorer` from a ``transmix-train`` checkpoint (errors name ``--attentive-checkpoint``)."""
    from ..model import load_from_checkpoint

    model = load_from_checkpoint(path, "--attentive-checkpoint", num_classes=num_classes)
    model.requires_grad_(False)
    model.to(torch.device(device))
    try:
        return CellScorer(model, grid)
    except ValueError as error:
        raise ValueError(f"--attentive-checkpoint {path}: {error}") from None


class AttentiveCutMix(SwitchedMixer):
    """Attentive-CutMix with TransMix's interface (module docstring; switch as ``SwitchedMixer``).

    Args:
        scorer: a :class:`CellScorer` (moved to the images' device on first use).
        topk: cells pasted, 1 <= topk <= grid * grid. The rest as :class:`SwitchedMixer` (the
            method's lam is fixed by topk, so there is no Beta alpha of its own).

    Example::

        mixer = AttentiveCutMix(10, load_cell_scorer("extractor/last.pth", 10), topk=6, seed=0)
        images, state = mixer(images, labels)
    """

    name = "attentive_cutmix"

    def __init__(self, num_classes: int, scorer: CellScorer, *, topk: int = 6, mixup_alpha: float = 0.8,
                 switch_prob: float = 0.5, prob: float = 1.0, label_smoothing: float = 0.1,
                 seed: Optional[int] = None) -> None:
        super().__init__(num_classes, mixup_alpha=mixup_alpha, alpha=0.0, switch_prob=switch_prob, prob=prob,
                         label_smoothing=label_smoothing, seed=seed)
        if not isinstance(scorer, CellScorer):
            raise TypeError(f"scorer must be a CellScorer, got {type(scorer).__name__}")
        cells = scorer.grid * scorer.grid
        if check_positive_int("topk", topk) > cells:
            raise ValueError(f"topk must be in [1, {cells}] (cells of the {scorer.grid}x{scorer.grid} grid), "
                             f"got {topk!r}")
        self.scorer, self.topk = scorer, topk

    @property
    def extra_parameters(self) -> int:
        """Parameters of the extractor, the model the method adds to training."""
        return sum(p.numel() for p in self.scorer.parameters())

    def _mix(self, images: torch.Tensor, target: torch.Tensor, partner: torch.Tensor) -> PairMixState:
        batch, _, height, width = images.shape
        self.scorer.to(images.device)
        scores = self.scorer(images)[partner]  # the partner's cells decide what is pasted
        grid = self.scorer.grid
        cells = torch.zeros(batch, grid * grid, dtype=torch.bool, device=images.device)
        cells.scatter_(1, scores.topk(self.topk, dim=1).indices, True)
        mask = cells_to_pixels(cells.view(batch, grid, grid), height, width)
        lam = paste_mask(images, mask, partner)
        return PairMixState(self.name, target, partner, lam, self.num_classes, self.smoothing, mask=mask)
