"""What ``tk.MixPro`` and ``tk.TokenMix`` share: a mixer that pastes a patch-aligned cell mask
with :func:`transmix_kernels.mask_paste`, and the state it reports.

:class:`CellMixState` is a :class:`~transmix_kernels.mixer.MixState` whose token mask comes from a
(B, gh, gw) cell mask instead of boxes, so TransMix's attention rule (``targets(attention)``,
``lambdas``, the probe and the fused kernels) applies to it unchanged. Batches a method hands to
its Mixup / CutMix branch keep TransMix's state, converted with :meth:`CellMixState.of` (``mask``
None). :class:`CellMixer` holds the arguments, checks, generator and ``state_dict`` protocol of
``tk.TransMix``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import torch

from ._checks import check_positive_int, check_range, flipped_partner
from .mask_paste import MASK_PASTE_INPLACE, mask_paste
from .mixer import DrawState, MixState, _host_to, check_mix_call, token_grid_for

__all__ = ["CellMixState", "CellMixer", "cells_to_tokens"]


def cells_to_tokens(mask: torch.Tensor, token_grid: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
    """(B, gh, gw) bool cell mask -> (B, th*tw) float32 token mask on any token grid.

    TransMix's nearest rule: token (i, j) is pasted iff its top-left pixel (i*H // th, j*W // tw)
    lies in a pasted cell. On a grid that is a multiple of the cell grid this is each cell's
    tokens exactly (what :func:`mask_paste` writes).
    """
    (height, width), (th, tw) = image_size, token_grid
    gh, gw = mask.shape[1:]
    rows = torch.arange(th, device=mask.device) * height // th * gh // height
    cols = torch.arange(tw, device=mask.device) * width // tw * gw // width
    return mask[:, rows][:, :, cols].flatten(1).float()


@dataclass
class CellMixState(MixState):
    """A :class:`MixState` whose pasted region is a cell mask (``kind`` "cutmix" for those batches).

    Extra attribute:
        mask: (B, gh, gw) bool on the images' device, True where the cell came from ``partner``;
            None for a batch of the Mixup / CutMix branch (then ``boxes`` tells what was pasted).
    ``boxes`` are empty for cell-mask batches; ``lam`` = ``lam_area`` (float32) = the own share of
    cells.
    """

    mask: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, state: MixState, **extra) -> "CellMixState":
        """``state`` (of TransMix's Mixup / CutMix branch) as this class, with ``extra`` fields."""
        return cls(**{**{f.name: getattr(state, f.name) for f in fields(MixState)}, **extra})

    def mask_for(self, token_grid: tuple[int, int]) -> torch.Tensor:
        """(B, gh*gw) token mask of the pasted region on any grid (made lazily when not fused)."""
        if self.mask is None:
            return super().mask_for(token_grid)
        token_grid = tuple(token_grid)
        if self.token_mask is not None and self.token_grid == token_grid:
            return self.token_mask
        return cells_to_tokens(self.mask, token_grid, self.image_size)


class CellMixer(DrawState):
    """Arguments, checks, draws and pasting common to the cell-mask mixers (``tk.TransMix``'s rules).

    Subclasses draw a (B, gh, gw) cell mask on the host and call :meth:`_paste`. ``rng`` is the one
    NumPy generator of every draw (a Mixup / CutMix branch shares it), so :meth:`state_dict`
    captures the mixer exactly (``DrawState``'s protocol, as ``tk.TransMix``).
    """

    def __init__(self, num_classes: int, *, label_smoothing: float, patch_size, token_grid, model,
                 seed: Optional[int], generator: Optional[np.random.Generator], impl: str) -> None:
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.label_smoothing = check_range("label_smoothing", label_smoothing, 0.0, 1.0)
        self._set_grid_and_draws(patch_size, token_grid, model, impl, seed, generator)

    def _check_call(self, images: torch.Tensor, target: torch.Tensor):
        """All checks before any work; returns the token grid for these images (or None)."""
        check_mix_call(images, target, self.num_classes, self.impl, MASK_PASTE_INPLACE, mixer=type(self).__name__)
        return token_grid_for(images.shape[2], images.shape[3], self.token_grid, self.patch_size, self.model)

    def _state_fields(self, images: torch.Tensor, target: torch.Tensor, partner: torch.Tensor) -> dict:
        batch, _, height, width = images.shape
        return dict(
            target=target, partner=partner, num_classes=self.num_classes, smoothing=self.label_smoothing,
            image_size=(height, width), impl=self.impl,
            boxes=_host_to(np.zeros((batch, 4), dtype=np.int32), images.device),
        )

    def _unmixed(self, images: torch.Tensor, target: torch.Tensor, state_cls, **extra) -> CellMixState:
        """The state of a batch left as it is (``prob`` or ``mixup_enabled``): targets = smoothed one-hot."""
        batch = images.shape[0]
        ones = _host_to(np.ones(batch, dtype=np.float32), images.device)
        return state_cls(
            kind="none", cutmix=_host_to(np.zeros(batch, dtype=bool), images.device), lam=ones, lam_area=ones,
            **self._state_fields(images, target, flipped_partner(batch, images.device)), **extra,
        )

    def _paste(self, images: torch.Tensor, target: torch.Tensor, cells: np.ndarray, partner: np.ndarray,
               grid, state_cls, **extra) -> CellMixState:
        """Paste ``partner``'s cells where ``cells`` (B, gh, gw) bool is True, in place; the state.

        lam_area = share of own cells, in float64 then float32 (cells are equal, so the pixel share).
        """
        device = images.device
        lam = (1.0 - cells.reshape(cells.shape[0], -1).mean(axis=1)).astype(np.float32)
        mask = _host_to(np.ascontiguousarray(cells), device)
        partner_dev = _host_to(partner.astype(np.int64), device)
        _, token_mask = mask_paste(images, mask, partner_dev, token_grid=grid, inplace=True, impl=self.impl)
        lam_dev = _host_to(lam, device)
        return state_cls(
            kind="cutmix", cutmix=_host_to(np.ones(cells.shape[0], dtype=bool), device), lam=lam_dev,
            lam_area=lam_dev, token_grid=grid if token_mask is not None else None, token_mask=token_mask, mask=mask,
            **self._state_fields(images, target, partner_dev), **extra,
        )
