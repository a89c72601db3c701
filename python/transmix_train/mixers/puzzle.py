"""``--mix puzzlemix``: Puzzle-Mix (Kim et al., ICML 2020), simplified, as the TransMix paper compared it.

Per batch: an extra forward and backward pass of the model on the clean batch gives the input
gradient; its per-pixel L2 norm over channels is the saliency (Simonyan et al.), average-pooled
to a ``g x g`` grid with ``g`` drawn from {2, 4, 8, 16} (the official CIFAR choice). A binary
mask per sample (1 = the partner's cell) is optimised on that grid to keep the saliency of both
images, stay smooth, and paste about ``1 - lam`` of the image (lam ~ Beta(alpha, alpha)):

    E(z) = sum_i z_i (s_own_i - s_partner_i) * g^2             (lose little saliency)
         + beta * sum_{i~j} |z_i - z_j|                          (4-neighbour smoothness)
         + eta * g^2 * (mean(z) - (1 - lam))^2                   (the drawn mixing ratio)

with s normalised to sum 1 per image. The label's own share is ``1 - mean(mask)`` (the paper's
lam = mask mean, for the partner).

Differences from the paper and its official code (simplifications, on purpose):
- solver: a mean-field relaxation (``iterations`` damped updates, vectorised over the batch and
  on the device) thresholded at 0.5, instead of alpha-expansion graph cuts (pygco);
- binary labels: the official code mixes with 3 label levels ({0, 0.5, 1}: cells may blend);
- the smoothness weight is constant; the official pairwise term also lowers it across image
  edges (``gamma``, local statistics);
- no optimal transport of the pasted cells (the official ``transport`` step moves salient
  cells inside the mask) and no adversarial perturbation of the inputs;
- the saliency pass computes only input gradients (``torch.autograd.grad``): no weight
  gradients, and the clean loss is not added to the training loss (official ``clean_lam`` 0).

Extra compute per step: one forward and one backward to the input on the clean batch, about
two thirds of a plain training step's forward+backward again; the measured images/s are in
``docs/experiments``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transmix_kernels._checks import check_non_negative, check_positive_int

from .base import PairMixState, SwitchedMixer, cells_to_pixels, paste_mask

__all__ = ["PuzzleMix", "input_saliency", "optimise_masks"]

#: The official CIFAR grid sizes (block_num = 2 ** randint(1, 5)).
GRID_SIZES = (2, 4, 8, 16)


def input_saliency(model: nn.Module, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images -> (B, H, W) float32 ``sqrt(mean_c (dCE/dx)^2)`` of ``model`` on them.

    One forward and one backward to the input; the model's weight gradients are not touched.
    A distilled model's (class, distillation) output pair is averaged first.
    """
    clean = images.detach().float().requires_grad_(True)
    with torch.enable_grad():
        logits = model(clean)
        if isinstance(logits, (tuple, list)):
            logits = sum(logits) / len(logits)
        loss = F.cross_entropy(logits.float(), target)
        (grad,) = torch.autograd.grad(loss, clean)
    return grad.pow(2).mean(1).sqrt()


def _neighbour_sum(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, g, g) -> (sum of the 4 neighbours' values, number of neighbours), zero-padded borders."""
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], device=values.device).view(1, 1, 3, 3)
    total = F.conv2d(values.unsqueeze(1), kernel, padding=1).squeeze(1)
    count = F.conv2d(torch.ones_like(values[:1]).unsqueeze(1), kernel, padding=1).squeeze(1)
    return total, count


def _ranked_start(unary: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """The relaxation's start: the ``share`` of cells where pasting costs least set to 1.

    A uniform start cannot break the symmetry of flat saliency (every cell moves alike and the
    threshold gives all or nothing); ties go to the earlier cell in row-major order (a stable sort).
    """
    flat = unary.flatten(1)
    order = flat.argsort(dim=1, stable=True)
    count = (share.flatten() * flat.shape[1]).round().long().unsqueeze(1)
    chosen = torch.arange(flat.shape[1], device=flat.device).unsqueeze(0) < count
    start = torch.zeros_like(flat).scatter_(1, order, chosen.float())
    return start.view_as(unary)


def optimise_masks(own: torch.Tensor, partner: torch.Tensor, paste_share: torch.Tensor, *, beta: float = 0.3,
                   eta: float = 2.0, iterations: int = 30, temperature: float = 0.1) -> torch.Tensor:
    """Binary masks minimising the module docstring's E(z) by damped mean-field updates.

    own, partner: (B, g, g) float saliency, each image's cells summing to 1.
    paste_share: (B,) float target share of partner cells (1 - lam). Returns (B, g, g) bool.
    """
    cells = own.shape[-1] * own.shape[-2]
    unary = (own - partner) * cells  # < 0 where the partner's cell is the more salient one
    share = paste_share.view(-1, 1, 1).float()
    q = _ranked_start(unary, share)
    for _ in range(iterations):
        neighbours, count = _neighbour_sum(q)
        # dE/dz_i with neighbours at their expectations: |z_i - z_j| = z_i (1 - 2 z_j) + z_j.
        field = unary + beta * (count - 2.0 * neighbours) + 2.0 * eta * (q.mean((1, 2), keepdim=True) - share)
        q = 0.5 * q + 0.5 * torch.sigmoid(-field / temperature)
    return q > 0.5


def _grid_saliency(saliency: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, H, W) -> (B, grid, grid) cell means, each image normalised to sum 1."""
    cells = F.adaptive_avg_pool2d(saliency.unsqueeze(1), grid).squeeze(1)
    return cells / cells.sum((1, 2), keepdim=True).clamp_min(1e-12)


class PuzzleMix(SwitchedMixer):
    """Simplified Puzzle-Mix with TransMix's interface (module docstring; switch as ``SwitchedMixer``).

    Args:
        model: the model being trained (the saliency pass runs it on the clean batch).
        grid_sizes: the grid side drawn per batch (sides larger than the image are dropped).
        beta, eta, iterations: of :func:`optimise_masks`. The rest as :class:`SwitchedMixer`.

    Example::

        mixer = PuzzleMix(10, model, seed=0)
        images, state = mixer(images, labels)      # one extra forward + backward inside
        loss = criterion(model(images), state.targets())
    """

    name = "puzzlemix"

    def __init__(self, num_classes: int, model: nn.Module, *, grid_sizes: Sequence[int] = GRID_SIZES,
                 beta: float = 0.3, eta: float = 2.0, iterations: int = 30, mixup_alpha: float = 0.8,
                 alpha: float = 1.0, switch_prob: float = 0.5, prob: float = 1.0, label_smoothing: float = 0.1,
                 seed: Optional[int] = None) -> None:
        super().__init__(num_classes, mixup_alpha=mixup_alpha, alpha=alpha, switch_prob=switch_prob, prob=prob,
                         label_smoothing=label_smoothing, seed=seed)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (the model being trained), got {type(model).__name__}")
        sizes = tuple(grid_sizes)
        if not sizes:
            raise ValueError(f"grid_sizes must hold at least one size, got {grid_sizes!r}")
        self.model, self.grid_sizes = model, tuple(check_positive_int("grid_sizes", g) for g in sizes)
        self.beta, self.eta = check_non_negative("beta", beta), check_non_negative("eta", eta)
        self.iterations = check_positive_int("iterations", iterations)

    def _mix(self, images: torch.Tensor, target: torch.Tensor, partner: torch.Tensor) -> PairMixState:
        _, _, height, width = images.shape
        sizes = [g for g in self.grid_sizes if g <= min(height, width)] or [1]
        grid = sizes[int(self.rng.integers(len(sizes)))]
        lam = self.draw_lam()
        cells = _grid_saliency(input_saliency(self.model, images, target), grid)
        share = torch.full((images.shape[0],), 1.0 - lam, device=images.device)
        mask = optimise_masks(cells, cells[partner], share, beta=self.beta, eta=self.eta, iterations=self.iterations)
        pixel_mask = cells_to_pixels(mask, height, width)
        lam_t = paste_mask(images, pixel_mask, partner)
        return PairMixState(self.name, target, partner, lam_t, self.num_classes, self.smoothing, mask=pixel_mask)
