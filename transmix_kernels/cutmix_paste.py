"""Fused CutMix paste: box mask, partner gather, paste and token mask in one pass.

``mixed[b] = images[b]`` outside box b and ``images[partner[b]]`` inside it. The token mask
uses the nearest-resize semantics of the official code (``F.interpolate(mode="nearest")`` of the
pixel mask to the token grid, float32 scale): token (i, j) is inside iff pixel
``(min(floor(i * sh), H - 1), min(floor(j * sw), W - 1))`` is, with ``sh = float32(H / gh)``.

Out of place, each element is read once (from the sample or its partner) and written once.
In place, only box regions move: a gather of every partner's box region into a box-sized
staging buffer, then a scatter into the boxes. Two launches, because every gather must finish
before any scatter (a sample can be another's partner), which makes any permutation and any
overlap of per-sample boxes safe.
"""

from __future__ import annotations

import torch

from . import _ext, reference
from ._checks import FLOAT_DTYPES, check_partner, check_tensor, is_dense, is_int
from ._dispatch import HAS_TRITON, Extension, Op, auto_backend, dispatch, resolve_backend
from ._launch import block_size

__all__ = ["PASTE", "PASTE_INPLACE", "check_boxes", "cutmix_paste", "nearest_scale", "run_paste", "token_mask_torch"]

BLOCK_PIXELS = 256


if HAS_TRITON:  # the kernels need triton; the PyTorch paths do not
    import triton
    import triton.language as tl

    @triton.jit
    def _box_of(boxes_ptr, box_stride, b):
        y0 = tl.load(boxes_ptr + b * box_stride + 0).to(tl.int64)
        y1 = tl.load(boxes_ptr + b * box_stride + 1).to(tl.int64)
        x0 = tl.load(boxes_ptr + b * box_stride + 2).to(tl.int64)
        x1 = tl.load(boxes_ptr + b * box_stride + 3).to(tl.int64)
        return y0, y1, x0, x1


    @triton.jit
    def _write_token_mask(
        token_mask_ptr, b, y0, y1, x0, x1, H, W, GH, GW, scale_h, scale_w, BLOCK_TOKENS: tl.constexpr
    ):
        # The token grid is tiny (e.g. 14x14): one program per sample writes its row.
        for start in range(0, GH * GW, BLOCK_TOKENS):
            t = start + tl.arange(0, BLOCK_TOKENS)
            valid = t < GH * GW
            # Same float32 arithmetic as F.interpolate(mode="nearest").
            py = tl.minimum(tl.floor((t // GW).to(tl.float32) * scale_h).to(tl.int64), H - 1)
            px = tl.minimum(tl.floor((t % GW).to(tl.float32) * scale_w).to(tl.int64), W - 1)
            inside = (py >= y0) & (py < y1) & (px >= x0) & (px < x1)
            tl.store(token_mask_ptr + b * GH * GW + t, inside.to(tl.float32), mask=valid)


    @triton.jit
    def _cutmix_paste_kernel(
        images_ptr, out_ptr, boxes_ptr, partner_ptr, token_mask_ptr,
        C, H, W, GH, GW, scale_h, scale_w, box_stride,
        s_b, s_c, s_h, s_w, o_b, o_c, o_h, o_w,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_TOKENS: tl.constexpr, HAS_TOKENS: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1).to(tl.int64)
        y0, y1, x0, x1 = _box_of(boxes_ptr, box_stride, b)
        src = tl.load(partner_ptr + b).to(tl.int64)
        p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        y = p // W
        x = p % W
        valid_p = p < H * W
        inside = (y >= y0) & (y < y1) & (x >= x0) & (x < x1)
        in_off = y * s_h + x * s_w
        out_off = y * o_h + x * o_w
        for c_start in range(0, C, BLOCK_C):
            c = c_start + tl.arange(0, BLOCK_C)
            valid = valid_p[:, None] & (c < C)[None, :]
            take_partner = valid & inside[:, None]
            # Each element is read exactly once: from the sample itself or from its partner.
            own = tl.load(images_ptr + b * s_b + c[None, :] * s_c + in_off[:, None], mask=valid & ~take_partner)
            other = tl.load(images_ptr + src * s_b + c[None, :] * s_c + in_off[:, None], mask=take_partner)
            tl.store(out_ptr + b * o_b + c[None, :] * o_c + out_off[:, None], tl.where(take_partner, other, own), mask=valid)
        if HAS_TOKENS:
            if tile == 0:
                _write_token_mask(token_mask_ptr, b, y0, y1, x0, x1, H, W, GH, GW, scale_h, scale_w, BLOCK_TOKENS)


    @triton.jit
    def _cutmix_box_move_kernel(
        from_ptr, to_ptr, boxes_ptr, partner_ptr, token_mask_ptr,
        C, H, W, GH, GW, scale_h, scale_w, box_stride, MAX_BW, MAX_AREA,
        f_b, f_c, f_h, f_w, t_b, t_c, t_h, t_w,
        GATHER: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_TOKENS: tl.constexpr,
        HAS_TOKENS: tl.constexpr,
    ):
        """In-place half: GATHER copies images[partner[b]][box b] -> staging[b], else staging[b] -> images[b][box b].

        The staging buffer is (B, C, max box height, max box width); (ly, lx) are box-local coordinates.
        """
        b = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1).to(tl.int64)
        y0, y1, x0, x1 = _box_of(boxes_ptr, box_stride, b)
        q = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        ly = q // MAX_BW
        lx = q % MAX_BW
        valid_p = (q < MAX_AREA) & (ly < y1 - y0) & (lx < x1 - x0)
        if GATHER:
            src = tl.load(partner_ptr + b).to(tl.int64)
            from_off = src * f_b + (y0 + ly) * f_h + (x0 + lx) * f_w
            to_off = b * t_b + ly * t_h + lx * t_w
        else:
            from_off = b * f_b + ly * f_h + lx * f_w
            to_off = b * t_b + (y0 + ly) * t_h + (x0 + lx) * t_w
        for c_start in range(0, C, BLOCK_C):
            c = c_start + tl.arange(0, BLOCK_C)
            valid = valid_p[:, None] & (c < C)[None, :]
            v = tl.load(from_ptr + from_off[:, None] + c[None, :] * f_c, mask=valid)
            tl.store(to_ptr + to_off[:, None] + c[None, :] * t_c, v, mask=valid)
        if HAS_TOKENS:
            if tile == 0:
                _write_token_mask(token_mask_ptr, b, y0, y1, x0, x1, H, W, GH, GW, scale_h, scale_w, BLOCK_TOKENS)


def nearest_scale(size: int, grid: int) -> float:
    """F.interpolate(mode="nearest")'s float32 scale; the token mask must match it bit for bit."""
    return float(torch.tensor(size, dtype=torch.float32) / torch.tensor(grid, dtype=torch.float32))


def _launch_settings(images: torch.Tensor, grid_hw: tuple[int, int]):
    channels = images.shape[1]
    # All channels of a pixel in one tile: coalesced for channels_last, cheap for NCHW (C = 3).
    block_c = min(16, 1 << max(0, (channels - 1).bit_length()))
    block_tokens = block_size(max(1, grid_hw[0] * grid_hw[1]), cap=1024)
    return BLOCK_PIXELS, block_c, block_tokens


def _token_mask_buffer(images: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    return torch.empty((images.shape[0], gh * gw), device=images.device, dtype=torch.float32)


def _scales(images: torch.Tensor, gh: int, gw: int) -> tuple[float, float]:
    if gh == 0:
        return 1.0, 1.0
    return nearest_scale(images.shape[2], gh), nearest_scale(images.shape[3], gw)


def _paste_triton(images, boxes, partner, gh, gw):
    # The kernels read boxes row by row and partner as a dense vector: make them so (B or 4B elements).
    boxes, partner = boxes.contiguous(), partner.contiguous()
    batch, channels, height, width = images.shape
    out = torch.empty_like(images)
    token_mask = _token_mask_buffer(images, gh, gw)
    if batch == 0:
        return out, token_mask
    block_p, block_c, block_t = _launch_settings(images, (gh, gw))
    scale_h, scale_w = _scales(images, gh, gw)
    grid = (batch, triton.cdiv(height * width, block_p))
    _cutmix_paste_kernel[grid](
        images, out, boxes, partner, token_mask,
        channels, height, width, gh, gw, scale_h, scale_w, 0 if boxes.dim() == 1 else boxes.stride(0),
        *images.stride(), *out.stride(),
        BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_TOKENS=block_t, HAS_TOKENS=gh > 0,
    )
    return out, token_mask


def _paste_inplace_triton(images, boxes, partner, gh, gw, max_bh, max_bw):
    # The kernels read boxes row by row and partner as a dense vector: make them so (B or 4B elements).
    boxes, partner = boxes.contiguous(), partner.contiguous()
    batch, channels, height, width = images.shape
    token_mask = _token_mask_buffer(images, gh, gw)
    if batch == 0:
        return token_mask
    block_p, block_c, block_t = _launch_settings(images, (gh, gw))
    scale_h, scale_w = _scales(images, gh, gw)
    staging = torch.empty((batch, channels, max(max_bh, 1), max(max_bw, 1)), device=images.device, dtype=images.dtype)
    grid = (batch, max(1, triton.cdiv(max_bh * max_bw, block_p)))
    common = (boxes, partner, token_mask, channels, height, width, gh, gw, scale_h, scale_w,
              0 if boxes.dim() == 1 else boxes.stride(0), max(max_bw, 1), max_bh * max_bw)
    _cutmix_box_move_kernel[grid](
        images, staging, *common, *images.stride(), *staging.stride(),
        GATHER=True, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_TOKENS=block_t, HAS_TOKENS=False,
    )
    _cutmix_box_move_kernel[grid](
        staging, images, *common, *staging.stride(), *images.stride(),
        GATHER=False, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_TOKENS=block_t, HAS_TOKENS=gh > 0,
    )
    return token_mask


# ---------------------------------------------------------------- PyTorch (CPU) path


def token_mask_torch(boxes: torch.Tensor, batch: int, height: int, width: int, gh: int, gw: int) -> torch.Tensor:
    """(B, gh*gw) float32 token mask straight from the boxes, with nearest-resize semantics."""
    boxes = boxes.expand(batch, 4) if boxes.dim() == 1 else boxes
    dev = boxes.device
    scale_h, scale_w = nearest_scale(height, gh), nearest_scale(width, gw)
    py = (torch.arange(gh, device=dev, dtype=torch.float32) * scale_h).floor().long().clamp(max=height - 1)
    px = (torch.arange(gw, device=dev, dtype=torch.float32) * scale_w).floor().long().clamp(max=width - 1)
    b = boxes.long()
    rows = (py[None, :] >= b[:, 0:1]) & (py[None, :] < b[:, 1:2])
    cols = (px[None, :] >= b[:, 2:3]) & (px[None, :] < b[:, 3:4])
    return (rows[:, :, None] & cols[:, None, :]).reshape(batch, gh * gw).float()


def _move_boxes_torch(images: torch.Tensor, boxes: torch.Tensor, partner: torch.Tensor) -> None:
    """images[b][box b] = images[partner[b]][box b] for every b, in place: every read completes
    before the first write, so any partner permutation and any box overlap is safe."""
    batch, channels, height, width = images.shape
    if boxes.dim() == 1:
        y0, y1, x0, x1 = (int(v) for v in boxes.tolist())
        # Advanced indexing on the right-hand side gathers a copy first.
        images[:, :, y0:y1, x0:x1] = images[partner, :, y0:y1, x0:x1]
        return
    # Work on whole image rows that cross a box: index_select / index_copy of contiguous rows are
    # memcpy-speed, and a column mask keeps pixels outside the box as they are.
    b = boxes.long()
    ys = torch.arange(height, device=images.device)
    xs = torch.arange(width, device=images.device)
    row_b, row_y = ((ys[None, :] >= b[:, 0:1]) & (ys[None, :] < b[:, 1:2])).nonzero(as_tuple=True)
    cols = ((xs[None, :] >= b[:, 2:3]) & (xs[None, :] < b[:, 3:4]))[row_b]
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        rows = images.permute(0, 2, 3, 1).reshape(batch * height, width * channels)
        dst, src = row_b * height + row_y, partner[row_b] * height + row_y
        cols = cols.repeat_interleave(channels, dim=1)
    else:
        rows = images.view(batch * channels * height, width)
        chan = torch.arange(channels, device=images.device) * height
        dst = (row_b[:, None] * (channels * height) + chan + row_y[:, None]).flatten()
        src = (partner[row_b][:, None] * (channels * height) + chan + row_y[:, None]).flatten()
        cols = cols.repeat_interleave(channels, dim=0)
    source, kept = rows.index_select(0, src), rows.index_select(0, dst)
    torch.where(cols, source, kept, out=kept)
    rows.index_copy_(0, dst, kept)


def _move_boxes_extension(images: torch.Tensor, boxes: torch.Tensor, partner: torch.Tensor) -> None:
    """The extension's compiled CPU move (one memcpy per box row segment): the same result as
    :func:`_move_boxes_torch`, bit for bit."""
    _ext.extension().cutmix_paste_cpu_(images, boxes.expand(images.shape[0], 4) if boxes.dim() == 1 else boxes, partner)


def _token_mask(boxes, images, gh, gw):
    """(B, gh*gw) float32 token mask of the PyTorch paths, or None without a token grid."""
    if gh == 0:
        return None
    batch, _, height, width = images.shape
    return token_mask_torch(boxes, batch, height, width, gh, gw)


def _op_token_mask(token_mask, images):
    """A registered op returns a tensor: the empty (B, 0) mask where there is no token grid."""
    return images.new_empty((images.shape[0], 0), dtype=torch.float32) if token_mask is None else token_mask


def _copy_and_move(images, boxes, partner, gh, gw, move):
    out = images.clone() if is_dense(images) else images.contiguous()
    move(out, boxes, partner)
    return out, _token_mask(boxes, images, gh, gw)


def _paste_torch(images, boxes, partner, gh, gw):
    return _copy_and_move(images, boxes, partner, gh, gw, _move_boxes_torch)


def _paste_extension(images, boxes, partner, gh, gw):
    return _copy_and_move(images, boxes, partner, gh, gw, _move_boxes_extension)


def _paste_inplace_torch(images, boxes, partner, gh, gw, max_bh, max_bw):
    _move_boxes_torch(images, boxes, partner)
    return _token_mask(boxes, images, gh, gw)


def _paste_inplace_extension(images, boxes, partner, gh, gw, max_bh, max_bw):
    _move_boxes_extension(images, boxes, partner)
    return _token_mask(boxes, images, gh, gw)


def _paste_reference(images, boxes, partner, gh, gw):
    # The twin takes the grid as token_grid (None for none), not as the registered ops' two ints.
    return reference.cutmix_paste(images, boxes, partner, token_grid=(gh, gw) if gh else None)


def _paste_inplace_reference(images, boxes, partner, gh, gw, max_bh, max_bw):
    return reference.cutmix_paste(images, boxes, partner, token_grid=(gh, gw) if gh else None, inplace=True)[1]


# ---------------------------------------------------------------- torch.library registration


@torch.library.custom_op("transmix::cutmix_paste", mutates_args=())
def _cutmix_paste_op(
    images: torch.Tensor, boxes: torch.Tensor, partner: torch.Tensor, gh: int, gw: int
) -> tuple[torch.Tensor, torch.Tensor]:
    mixed, token_mask = dispatch(PASTE, auto_backend(images.device, PASTE), images, boxes, partner, gh, gw)
    return mixed, _op_token_mask(token_mask, images)


@_cutmix_paste_op.register_fake
def _(images, boxes, partner, gh, gw):
    return torch.empty_like(images), images.new_empty((images.shape[0], gh * gw), dtype=torch.float32)


@torch.library.custom_op("transmix::cutmix_paste_", mutates_args=("images",))
def _cutmix_paste_inplace_op(
    images: torch.Tensor, boxes: torch.Tensor, partner: torch.Tensor, gh: int, gw: int, max_bh: int, max_bw: int
) -> torch.Tensor:
    backend = auto_backend(images.device, PASTE_INPLACE)
    token_mask = dispatch(PASTE_INPLACE, backend, images, boxes, partner, gh, gw, max_bh, max_bw)
    return _op_token_mask(token_mask, images)


@_cutmix_paste_inplace_op.register_fake
def _(images, boxes, partner, gh, gw, max_bh, max_bw):
    return images.new_empty((images.shape[0], gh * gw), dtype=torch.float32)


# ---------------------------------------------------------------- the op's backends

# Out of place and in place are two registered ops (one mutates its input) with one backend
# policy, the extension's compiled CPU move included. Arguments of every backend: (images, boxes,
# partner, gh, gw), and max_bh, max_bw in place; gh = gw = 0 means no token grid.
PASTE = Op(
    "cutmix_paste", torch=_paste_torch, reference=_paste_reference, triton=_paste_triton,
    extension=Extension("cutmix_paste_cpu_", ("cpu",), _paste_extension), registered=_cutmix_paste_op,
)
PASTE_INPLACE = Op(
    "cutmix_paste", torch=_paste_inplace_torch, reference=_paste_inplace_reference, triton=_paste_inplace_triton,
    extension=Extension("cutmix_paste_cpu_", ("cpu",), _paste_inplace_extension), registered=_cutmix_paste_inplace_op,
)


def run_paste(
    backend: str,
    images: torch.Tensor,
    boxes: torch.Tensor,
    partner: torch.Tensor,
    gh: int,
    gw: int,
    inplace: bool,
    max_bh: int,
    max_bw: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a validated paste on ``backend`` (from ``resolve_backend(impl, device, PASTE_INPLACE
    if inplace else PASTE)``).

    Package-internal: :func:`cutmix_paste` calls it after its checks, TransMix with boxes it made
    itself. ``gh = gw = 0`` means no token grid; max_bh, max_bw bound the box sizes (in place).

    Returns:
        mixed: (B, C, H, W) (``images`` itself when inplace); token_mask: (B, gh*gw) float32 or None.
    """
    if inplace:
        token_mask = dispatch(PASTE_INPLACE, backend, images, boxes, partner, gh, gw, max_bh, max_bw)
        return images, (token_mask if gh else None)
    mixed, token_mask = dispatch(PASTE, backend, images, boxes, partner, gh, gw)
    return mixed, (token_mask if gh else None)


# ---------------------------------------------------------------- public function


def _check_grid(token_grid, height: int, width: int) -> tuple[int, int]:
    if token_grid is None:
        return 0, 0
    if not isinstance(token_grid, (tuple, list)) or len(token_grid) != 2:
        raise ValueError(f"token_grid must be a (gh, gw) pair of ints, got {token_grid!r}")
    gh, gw = token_grid
    if not all(is_int(g) and g >= 1 for g in (gh, gw)):
        raise ValueError(f"token_grid must hold positive ints, got {tuple(token_grid)}")
    if gh > height or gw > width:
        raise ValueError(f"token_grid {tuple(token_grid)} is larger than the image ({height}, {width})")
    return gh, gw


def check_boxes(boxes, batch: int, height: int, width: int, device: torch.device) -> tuple[int, int]:
    """Validate (B, 4) or (4,) integer boxes; returns the largest box height and width."""
    check_tensor("boxes", boxes, ndim=(1, 2), dtypes=(torch.int32, torch.int64), device=device)
    if boxes.shape[-1] != 4 or (boxes.dim() == 2 and boxes.shape[0] != batch):
        raise ValueError(f"boxes must have shape ({batch}, 4) or (4,) as [y0, y1, x0, x1], got {tuple(boxes.shape)}")
    if boxes.numel() == 0:
        return 0, 0
    b = boxes.reshape(-1, 4).long()
    heights, widths = b[:, 1] - b[:, 0], b[:, 3] - b[:, 2]
    # One host sync for every range condition at once.
    lo_y, hi_y, lo_x, hi_x, min_h, min_w, max_h, max_w = torch.stack(
        [b[:, :2].min(), b[:, :2].max(), b[:, 2:].min(), b[:, 2:].max(),
         heights.min(), widths.min(), heights.max(), widths.max()]
    ).tolist()
    if torch.compiler.is_compiling():
        # Symbolic under torch.compile (see _checks.check_index_range): asserted at run time.
        for ok in (lo_y >= 0, hi_y <= height, lo_x >= 0, hi_x <= width, min_h >= 0, min_w >= 0):
            torch._check(ok, lambda: "boxes must lie inside the image and not be inverted")
        return max_h, max_w
    if lo_y < 0 or hi_y > height or lo_x < 0 or hi_x > width:
        raise ValueError(
            f"boxes must lie inside the {height}x{width} image (0 <= y0, y1 <= {height}, 0 <= x0, x1 <= {width}), "
            f"got y in [{lo_y}, {hi_y}], x in [{lo_x}, {hi_x}]"
        )
    if min_h < 0 or min_w < 0:
        raise ValueError("boxes must not be inverted: need y0 <= y1 and x0 <= x1 in every [y0, y1, x0, x1] row")
    return max_h, max_w


def cutmix_paste(
    images: torch.Tensor,
    boxes: torch.Tensor,
    partner: torch.Tensor | None = None,
    *,
    token_grid: tuple[int, int] | None = None,
    inplace: bool = False,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Paste each sample's partner into its box and make the token mask, in one pass.

    Args:
        images: (B, C, H, W) float32/bfloat16/float16, contiguous or channels_last.
        boxes: (B, 4) int32/int64 ``[y0, y1, x0, x1]`` half-open, or (4,) one box for the batch.
        partner: (B,) int64, the image pasted into each sample's box; default ``B-1-i``.
        token_grid: (gh, gw) of the model's patch tokens, or None for no token mask.
        inplace: write into ``images``, moving only the box regions (exactly the out-of-place
            result for any partner permutation and any overlap of boxes).
        impl: "auto" (Triton on CUDA tensors; on CPU tensors the extension's compiled paste when it
            is built, else the PyTorch path), "triton", "torch" or "reference".

    Returns:
        mixed: (B, C, H, W), same dtype and memory format (``images`` itself when inplace).
        token_mask: (B, gh*gw) float32, 1 where a token lies in the pasted box; None without a grid.

    Example::

        boxes, lam_area = tk.sample_boxes(lam, 224, 224)
        mixed, token_mask = tk.cutmix_paste(images, boxes.cuda(), token_grid=(14, 14))
    """
    check_tensor("images", images, ndim=4, dtypes=FLOAT_DTYPES)
    batch, _, height, width = images.shape
    max_bh, max_bw = check_boxes(boxes, batch, height, width, images.device)
    partner = check_partner(partner, batch, images.device)
    gh, gw = _check_grid(token_grid, height, width)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if inplace and not is_dense(images):
        raise ValueError(
            "inplace=True needs images contiguous or channels_last (a strided or expanded tensor may alias "
            "its own elements); pass inplace=False or a dense tensor"
        )
    backend = resolve_backend(impl, images.device, PASTE_INPLACE if inplace else PASTE)
    return run_paste(backend, images, boxes, partner, gh, gw, inplace, max_bh, max_bw)
