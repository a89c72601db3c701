"""Fused paste from a patch-aligned cell mask: mask read, partner gather, paste and token mask in one pass.

The image is split into gh x gw equal cells of ``H // gh`` x ``W // gw`` pixels, and
``mixed[b] = images[partner[b]]`` on every cell with ``mask[b, i, j] = 1``, ``images[b]`` elsewhere.
Cells are whole patch tokens, so the token mask needs no resize rule: token (i, j) of a
``th x tw`` grid lies in cell ``(i // (th // gh), j // (tw // gw))``. A CutMix box whose edges lie on
cell edges, written as a cell mask, gives cutmix_paste's pixels and token mask exactly.

The Triton kernel: out of place, each element is read once (from the sample or its partner)
and written once. In place, only pasted pixels move: a gather of every partner's pasted pixels
into a staging buffer the size of the batch, then a scatter into the pasted cells. Two launches,
because every gather must finish before any scatter (a sample can be another's partner), which
makes any partner map safe. The PyTorch path copies the batch (out of place), then moves the
pasted cells as (n, C, cell_h, cell_w) blocks, all gathered from the partners before any is
written.
"""

from __future__ import annotations

import torch

from . import reference
from ._checks import FLOAT_DTYPES, check_batch, check_partner, check_tensor, is_dense
from ._dispatch import HAS_TRITON, Op, auto_backend, dispatch, resolve_backend
from .cutmix_paste import _check_grid, _launch_settings, _op_token_mask, _token_mask_buffer

__all__ = ["MASK_DTYPES", "MASK_PASTE", "MASK_PASTE_INPLACE", "check_cell_mask", "mask_paste"]

# bool, or 0/1 held in uint8 or a float dtype (a float token mask viewed as (B, th, tw)).
MASK_DTYPES = (torch.bool, torch.uint8, torch.float64) + FLOAT_DTYPES


if HAS_TRITON:  # the kernels need triton; the PyTorch paths do not
    import triton
    import triton.language as tl

    @triton.jit
    def _mask_paste_kernel(
        from_ptr, to_ptr, mask_ptr, partner_ptr, token_mask_ptr,
        C, H, W, CELL_H, CELL_W, TH, TW, TOKENS_H, TOKENS_W,
        m_b, m_h, m_w, f_b, f_c, f_h, f_w, t_b, t_c, t_h, t_w,
        FROM_PARTNER: tl.constexpr, PASTED_ONLY: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_TOKENS: tl.constexpr, HAS_TOKENS: tl.constexpr,
    ):
        """Program (b, tile) moves a tile of sample b's pixels, all channels; pixel (y, x) is pasted
        iff ``mask[b, y // CELL_H, x // CELL_W] != 0``. Three uses:

        * out of place (FROM_PARTNER): ``to[b] = from[partner[b]]`` on pasted pixels, ``from[b]`` elsewhere;
        * in-place gather (FROM_PARTNER, PASTED_ONLY): ``to[b] = from[partner[b]]`` on pasted pixels only;
        * in-place scatter (PASTED_ONLY): ``to[b] = from[b]`` on pasted pixels only.

        The tile-0 program of each sample also writes its (TH * TW,) token mask row:
        token (i, j) lies in cell (i // TOKENS_H, j // TOKENS_W).
        """
        b = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1).to(tl.int64)
        p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        y = p // W
        x = p % W
        active = p < H * W
        cell = mask_ptr + b * m_b + (y // CELL_H) * m_h + (x // CELL_W) * m_w
        pasted = tl.load(cell, mask=active, other=0) != 0
        if PASTED_ONLY:
            active = active & pasted
        if FROM_PARTNER:
            # The sample each pixel is read from: one load per element, from the sample or its partner.
            source = tl.where(pasted, tl.load(partner_ptr + b).to(tl.int64), b)
        else:
            source = b
        from_off = source * f_b + y * f_h + x * f_w
        to_off = b * t_b + y * t_h + x * t_w
        for c_start in range(0, C, BLOCK_C):
            c = c_start + tl.arange(0, BLOCK_C)
            move = active[:, None] & (c < C)[None, :]
            pixels = tl.load(from_ptr + from_off[:, None] + c[None, :] * f_c, mask=move)
            tl.store(to_ptr + to_off[:, None] + c[None, :] * t_c, pixels, mask=move)
        if HAS_TOKENS:
            if tile == 0:
                # The token grid is tiny (e.g. 14x14): one program per sample writes its row.
                for start in range(0, TH * TW, BLOCK_TOKENS):
                    t = start + tl.arange(0, BLOCK_TOKENS)
                    in_row = t < TH * TW
                    token_cell = mask_ptr + b * m_b + (t // TW // TOKENS_H) * m_h + (t % TW // TOKENS_W) * m_w
                    inside = tl.load(token_cell, mask=in_row, other=0) != 0
                    tl.store(token_mask_ptr + b * TH * TW + t, inside.to(tl.float32), mask=in_row)


def _launch(source, target, mask, partner, token_mask, th, tw, *, from_partner, pasted_only, tokens):
    """One launch of :func:`_mask_paste_kernel` over every pixel of the batch (B > 0)."""
    batch, channels, height, width = source.shape
    gh, gw = mask.shape[1:]
    # A bool tensor reaches Triton as uint8 (same bytes); other dtypes are read as they are.
    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    block_p, block_c, block_t = _launch_settings(source, (th, tw))
    grid = (batch, triton.cdiv(height * width, block_p))
    _mask_paste_kernel[grid](
        source, target, mask, partner, token_mask,
        channels, height, width, height // gh, width // gw, th, tw, max(th // gh, 1), max(tw // gw, 1),
        *mask.stride(), *source.stride(), *target.stride(),
        FROM_PARTNER=from_partner, PASTED_ONLY=pasted_only,
        BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_TOKENS=block_t, HAS_TOKENS=tokens and th > 0,
    )


def _paste_triton(images, mask, partner, th, tw):
    # The kernel reads partner as a dense vector: make it so (B elements).
    partner = partner.contiguous()
    out = torch.empty_like(images)
    token_mask = _token_mask_buffer(images, th, tw)
    if images.shape[0]:
        _launch(images, out, mask, partner, token_mask, th, tw, from_partner=True, pasted_only=False, tokens=True)
    return out, token_mask


def _paste_inplace_triton(images, mask, partner, th, tw):
    partner = partner.contiguous()
    token_mask = _token_mask_buffer(images, th, tw)
    if images.shape[0]:
        staging = torch.empty_like(images)
        _launch(images, staging, mask, partner, token_mask, th, tw, from_partner=True, pasted_only=True, tokens=False)
        _launch(staging, images, mask, partner, token_mask, th, tw, from_partner=False, pasted_only=True, tokens=True)
    return token_mask


# ---------------------------------------------------------------- PyTorch (CPU) path


def _pasted(mask: torch.Tensor) -> torch.Tensor:
    """The cell mask as bool (values are 0/1, checked)."""
    return mask if mask.dtype == torch.bool else mask != 0


def _upsample(mask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, gh, gw) cell mask -> (B, rows, cols) bool, each cell repeated over its rows x cols share."""
    return _pasted(mask).repeat_interleave(rows // mask.shape[1], 1).repeat_interleave(cols // mask.shape[2], 2)


def _token_mask_torch(mask, th, tw):
    """(B, th*tw) float32 token mask of the PyTorch paths, or None without a token grid."""
    return _upsample(mask, th, tw).flatten(1).float() if th else None


def _move_cells_torch(images: torch.Tensor, mask: torch.Tensor, partner: torch.Tensor) -> None:
    """images[b] = images[partner[b]] on every pasted cell, in place: only pasted cells move.

    images as (B, C, gh, cell_h, gw, cell_w) is a view for any strides; the (n, C, cell_h, cell_w)
    partner cells are gathered into a copy before the first write, so any partner map is safe.
    """
    gh, gw = mask.shape[1:]
    cells = images.unflatten(3, (gw, images.shape[3] // gw)).unflatten(2, (gh, images.shape[2] // gh))
    sample, row, col = _pasted(mask).nonzero(as_tuple=True)
    cells[sample, :, row, :, col, :] = cells[partner[sample], :, row, :, col, :]


def _paste_torch(images, mask, partner, th, tw):
    # A copy (memcpy speed, layout kept; contiguous for a non-dense input), then the pasted cells:
    # on one CPU thread 2.4x (64x3x224x224) to 6x (256x3x32x32) faster than torch.where over a
    # full partner copy of the batch.
    out = images.clone() if is_dense(images) else images.contiguous()
    _move_cells_torch(out, mask, partner)
    return out, _token_mask_torch(mask, th, tw)


def _paste_inplace_torch(images, mask, partner, th, tw):
    _move_cells_torch(images, mask, partner)
    return _token_mask_torch(mask, th, tw)


def _paste_reference(images, mask, partner, th, tw):
    # The twin takes the grid as token_grid (None for none), not as the registered ops' two ints.
    return reference.mask_paste(images, mask, partner, token_grid=(th, tw) if th else None)


def _paste_inplace_reference(images, mask, partner, th, tw):
    return reference.mask_paste(images, mask, partner, token_grid=(th, tw) if th else None, inplace=True)[1]


# ---------------------------------------------------------------- torch.library registration


@torch.library.custom_op("transmix::mask_paste", mutates_args=())
def _mask_paste_op(
    images: torch.Tensor, mask: torch.Tensor, partner: torch.Tensor, th: int, tw: int
) -> tuple[torch.Tensor, torch.Tensor]:
    mixed, token_mask = dispatch(MASK_PASTE, auto_backend(images.device, MASK_PASTE), images, mask, partner, th, tw)
    return mixed, _op_token_mask(token_mask, images)


@_mask_paste_op.register_fake
def _(images, mask, partner, th, tw):
    return torch.empty_like(images), images.new_empty((images.shape[0], th * tw), dtype=torch.float32)


@torch.library.custom_op("transmix::mask_paste_", mutates_args=("images",))
def _mask_paste_inplace_op(
    images: torch.Tensor, mask: torch.Tensor, partner: torch.Tensor, th: int, tw: int
) -> torch.Tensor:
    backend = auto_backend(images.device, MASK_PASTE_INPLACE)
    return _op_token_mask(dispatch(MASK_PASTE_INPLACE, backend, images, mask, partner, th, tw), images)


@_mask_paste_inplace_op.register_fake
def _(images, mask, partner, th, tw):
    return images.new_empty((images.shape[0], th * tw), dtype=torch.float32)


# ---------------------------------------------------------------- the op's backends

# Out of place and in place are two registered ops (one mutates its input). Arguments of every
# backend: (images, mask, partner, th, tw); th = tw = 0 means no token grid.
MASK_PASTE = Op(
    "mask_paste", torch=_paste_torch, reference=_paste_reference, triton=_paste_triton, registered=_mask_paste_op,
)
MASK_PASTE_INPLACE = Op(
    "mask_paste", torch=_paste_inplace_torch, reference=_paste_inplace_reference, triton=_paste_inplace_triton,
    registered=_mask_paste_inplace_op,
)


# ---------------------------------------------------------------- public function


def check_cell_mask(mask, batch: int, height: int, width: int, device: torch.device) -> tuple[int, int]:
    """Validate a (B, gh, gw) cell mask of 0/1 whose cells divide the image; returns (gh, gw)."""
    check_tensor("mask", mask, ndim=3, dtypes=MASK_DTYPES, device=device)
    check_batch("mask", mask, batch)
    gh, gw = mask.shape[1:]
    if not (1 <= gh <= height and 1 <= gw <= width) or height % gh or width % gw:
        raise ValueError(
            f"mask's {gh}x{gw} cell grid must split the {height}x{width} image into equal cells "
            f"(H % gh == 0 and W % gw == 0), got mask of shape {tuple(mask.shape)}"
        )
    if mask.dtype == torch.bool or mask.numel() == 0:
        return gh, gw
    not_binary = (mask != 0) & (mask != 1)  # NaN too
    if torch.compiler.is_compiling():
        # Values are symbolic in a trace (see _checks.check_unit_interval): asserted at run time.
        torch._assert_async(~not_binary.any(), "mask must hold only 0 and 1")
        return gh, gw
    if bool(not_binary.any()):
        index = tuple(int(i) for i in not_binary.nonzero()[0])
        raise ValueError(
            f"mask must hold only 0 and 1 (1 = the cell is pasted from the partner), got {mask[index].item()!r} "
            f"at index {index}"
        )
    return gh, gw


def _check_token_grid(token_grid, cells: tuple[int, int], height: int, width: int) -> tuple[int, int]:
    """(th, tw), or (0, 0) without a grid; each cell must be a whole number of patch tokens."""
    th, tw = _check_grid(token_grid, height, width)
    if th == 0:
        return 0, 0
    if height % th or width % tw:
        raise ValueError(
            f"token_grid {(th, tw)} must split the {height}x{width} image into equal patches "
            f"(H % th == 0 and W % tw == 0)"
        )
    gh, gw = cells
    if th % gh or tw % gw:
        raise ValueError(
            f"the mask's cell ({height // gh}x{width // gw} pixels) is not a multiple of the patch "
            f"({height // th}x{width // tw} pixels): token_grid {(th, tw)} must be a multiple of the "
            f"mask's {gh}x{gw} cell grid (th % gh == 0 and tw % gw == 0)"
        )
    return th, tw


def mask_paste(
    images: torch.Tensor,
    mask: torch.Tensor,
    partner: torch.Tensor | None = None,
    *,
    token_grid: tuple[int, int] | None = None,
    inplace: bool = False,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Paste each sample's partner into the cells its mask selects, and make the token mask, in one pass.

    Args:
        images: (B, C, H, W) float32/bfloat16/float16, contiguous or channels_last (any strides
            when not inplace).
        mask: (B, gh, gw) bool, or uint8 / float holding only 0 and 1: 1 = the cell is pasted from
            the partner. The image is split into gh x gw equal cells (H % gh == 0, W % gw == 0).
            A (B, N) token mask is passed as ``mask.view(B, th, tw)``.
        partner: (B,) int64, the image pasted into each sample's cells; default ``B-1-i``.
        token_grid: (th, tw) of the model's patch tokens, or None for no token mask. Cells must be
            whole tokens: th % gh == 0 and tw % gw == 0 (and H % th == 0, W % tw == 0).
        inplace: write into ``images``, moving only the pasted cells (exactly the out-of-place
            result for any partner map).
        impl: "auto" (Triton on CUDA tensors, the PyTorch path elsewhere), "triton", "torch" or
            "reference".

    Returns:
        mixed: (B, C, H, W), same dtype and memory format (``images`` itself when inplace).
        token_mask: (B, th*tw) float32, 1 where a token lies in a pasted cell; None without a grid.

    Example::

        cells = torch.rand(B, 7, 7, device="cuda") < 0.5          # 32x32-pixel cells of a 224 image
        mixed, token_mask = tk.mask_paste(images, cells, token_grid=(14, 14))
    """
    check_tensor("images", images, ndim=4, dtypes=FLOAT_DTYPES)
    batch, _, height, width = images.shape
    cells = check_cell_mask(mask, batch, height, width, images.device)
    partner = check_partner(partner, batch, images.device)
    th, tw = _check_token_grid(token_grid, cells, height, width)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if inplace and not is_dense(images):
        raise ValueError(
            "inplace=True needs images contiguous or channels_last (a strided or expanded tensor may alias "
            "its own elements); pass inplace=False or a dense tensor"
        )
    if inplace:
        backend = resolve_backend(impl, images.device, MASK_PASTE_INPLACE)
        token_mask = dispatch(MASK_PASTE_INPLACE, backend, images, mask, partner, th, tw)
        return images, (token_mask if th else None)
    backend = resolve_backend(impl, images.device, MASK_PASTE)
    mixed, token_mask = dispatch(MASK_PASTE, backend, images, mask, partner, th, tw)
    return mixed, (token_mask if th else None)
