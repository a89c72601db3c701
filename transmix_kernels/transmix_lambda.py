"""TransMix label re-weighting: masked class-attention reduction -> lambda -> soft targets.

One Triton launch does all three. Per sample b (heads averaged; the average cancels)::

    mass[b]     = sum_{h,j} attn[b, h, j]
    outside[b]  = sum_{h,j} attn[b, h, j] * (1 - token_mask[b, j])
    lam_attn[b] = outside[b] / mass[b]        (lam_area[b] if mass is 0 or not finite)
    lam[b]      = ratio * lam_area[b] + (1 - ratio) * lam_attn[b]
    targets[b]  = lam[b] * onehot_s(y[b]) + (1 - lam[b]) * onehot_s(y[partner[b]])

The targets follow timm's ``mixup_target`` operation for operation, so a float64 lam (one per
batch, as timm keeps it) gives bit-identical area targets.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import reference
from ._checks import (
    FLOAT_DTYPES,
    check_batch,
    check_index_range,
    check_partner,
    check_positive_int,
    check_range,
    check_tensor,
    check_unit_interval,
)
from ._dispatch import HAS_TRITON, Op, auto_backend, dispatch, resolve_backend
from ._launch import block_size

__all__ = ["LAMBDA_TARGETS", "blend_lambda", "mix_targets", "transmix_lambda", "transmix_targets"]


def blend_lambda(mass: torch.Tensor, outside: torch.Tensor, lam_area: torch.Tensor, ratio: float) -> torch.Tensor:
    """TransMix's lam from the attention mass and its part outside the box, all (B,) float32.

    lam_attn = outside / mass; a row whose mass is zero or not finite carries no attention
    information and keeps lam_attn = lam_area. lam = ratio * lam_area + (1 - ratio) * lam_attn.
    The PyTorch paths of this op and of class_attention_lambda share it.
    """
    usable = torch.isfinite(mass) & (mass > 0) & torch.isfinite(outside)
    lam_attn = torch.where(usable, outside / torch.where(usable, mass, torch.ones_like(mass)), lam_area)
    return ratio * lam_area + (1.0 - ratio) * lam_attn


if HAS_TRITON:  # the kernels need triton; the PyTorch paths do not
    import triton
    import triton.language as tl

    @triton.jit
    def blend_lambda_triton(mass, outside, lam_area, ratio, one_minus_ratio):
        """:func:`blend_lambda` inside a kernel, on fp32 scalars; ``one_minus_ratio`` comes from the
        host (1 - ratio rounded once from float64, as the PyTorch path rounds it)."""
        usable = (mass > 0) & (mass < float("inf")) & (outside == outside) & (tl.abs(outside) < float("inf"))
        lam_attn = tl.where(usable, outside / tl.where(usable, mass, 1.0), lam_area)
        return ratio * lam_area + one_minus_ratio * lam_attn

    __all__ += ["blend_lambda_triton"]

    @triton.jit
    def _transmix_targets_kernel(
        attn_ptr, mask_ptr, lam_ptr, target_ptr, partner_ptr, lam_out_ptr, targets_ptr,
        HEADS, N, K, a_b, a_h, a_n, m_b, m_n,
        ratio, one_minus_ratio, on_value, off_value,
        HAS_ATTN: tl.constexpr, WRITE_TARGETS: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        k_tile = tl.program_id(1).to(tl.int64)
        lam_in = tl.load(lam_ptr + b)
        if HAS_ATTN:
            lam_area = lam_in.to(tl.float32)
            mass = tl.zeros([BLOCK_N], dtype=tl.float32)
            outside = tl.zeros([BLOCK_N], dtype=tl.float32)
            for n_start in range(0, N, BLOCK_N):
                n = n_start + tl.arange(0, BLOCK_N)
                valid = n < N
                m = tl.load(mask_ptr + b * m_b + n * m_n, mask=valid, other=0).to(tl.float32)
                for h in range(0, HEADS):
                    a = tl.load(attn_ptr + b * a_b + h * a_h + n * a_n, mask=valid, other=0).to(tl.float32)
                    mass += a
                    outside += a * (1.0 - m)
            lam = blend_lambda_triton(tl.sum(mass, axis=0), tl.sum(outside, axis=0), lam_area, ratio, one_minus_ratio)
            lam_self = lam
            lam_other = 1.0 - lam
        else:
            lam = lam_in.to(tl.float32)
            lam_self = lam
            # 1 - lam in lam's own precision, as timm: exact for a float64 per-batch lam.
            lam_other = (1.0 - lam_in).to(tl.float32)
        if k_tile == 0:
            tl.store(lam_out_ptr + b, lam)
        if WRITE_TARGETS:
            y_self = tl.load(target_ptr + b)
            y_other = tl.load(target_ptr + tl.load(partner_ptr + b))
            k = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
            y1 = tl.where(k == y_self, on_value, off_value)
            y2 = tl.where(k == y_other, on_value, off_value)
            tl.store(targets_ptr + b * K + k, y1 * lam_self + y2 * lam_other, mask=k < K)


def _smoothing_values(num_classes: int, smoothing: float) -> tuple[float, float]:
    off = smoothing / max(num_classes, 1)
    return 1.0 - smoothing + off, off


def _run_triton(attn, token_mask, lam, target, partner, num_classes, ratio, smoothing):
    # The kernel indexes lam, target and partner as dense vectors (attn and token_mask go by strides).
    lam = lam.contiguous()
    target = target.contiguous() if target is not None else None
    partner = partner.contiguous() if partner is not None else None
    batch = lam.shape[0]
    lam_out = torch.empty(batch, device=lam.device, dtype=torch.float32)
    write_targets = target is not None
    targets = torch.empty((batch, num_classes if write_targets else 0), device=lam.device, dtype=torch.float32)
    if batch == 0:
        return lam_out, targets
    has_attn = attn is not None
    if has_attn:
        a3 = attn if attn.dim() == 3 else attn.unsqueeze(1)
        heads, n_tokens = a3.shape[1], a3.shape[2]
        a_strides = a3.stride()
        m_strides = token_mask.stride()
    else:
        a3 = token_mask = lam  # placeholders, never read
        heads, n_tokens, a_strides, m_strides = 0, 0, (0, 0, 0), (0, 0)
    block_n = block_size(max(n_tokens, 1), cap=1024)
    block_k = block_size(max(num_classes, 1), cap=1024)
    on_value, off_value = _smoothing_values(num_classes, smoothing)
    grid = (batch, triton.cdiv(num_classes, block_k) if write_targets else 1)
    _transmix_targets_kernel[grid](
        a3, token_mask, lam, target if write_targets else lam, partner if write_targets else lam, lam_out, targets,
        heads, n_tokens, num_classes, *a_strides, *m_strides,
        ratio, 1.0 - ratio, on_value, off_value,
        HAS_ATTN=has_attn, WRITE_TARGETS=write_targets, BLOCK_N=block_n, BLOCK_K=block_k,
        # No FMA contraction: y1 * lam + y2 * (1 - lam) must round like timm's separate ops, bit for bit.
        enable_fp_fusion=False,
    )
    return lam_out, targets


# ---------------------------------------------------------------- PyTorch (CPU) path


def _lambda_torch(attn, token_mask, lam_area, ratio):
    a = attn.float() if attn.dim() == 3 else attn.float().unsqueeze(1)
    mass = a.sum((1, 2))
    kept = (a * (1.0 - token_mask.float()).unsqueeze(1)).sum((1, 2))
    return blend_lambda(mass, kept, lam_area.float(), ratio)


def _put_rows_numpy(out: np.ndarray, columns: np.ndarray, values: np.ndarray) -> None:
    out[np.arange(out.shape[0]), columns[:, 0]] = values[:, 0]


# The three operations NumPy and PyTorch spell differently: choose, repeat a column, one entry per row.
_NUMPY_OPS = (np.where, lambda column, count: np.repeat(column, count, axis=1), _put_rows_numpy)
_TORCH_OPS = (
    torch.where,
    lambda column, count: column.expand(-1, count).contiguous(),
    lambda out, columns, values: out.scatter_(1, columns, values),
)


def _soft_targets(target, lam_self, lam_other, partner, num_classes, weights, ops):
    where, repeat_column, put_rows = ops
    sums = lam_self.reshape(-1, 1) * weights[0] + lam_other.reshape(-1, 1) * weights[1]  # (B, 4)
    y_self, y_other = target.reshape(-1, 1), target[partner].reshape(-1, 1)
    out = repeat_column(sums[:, :1], num_classes)
    put_rows(out, y_other, sums[:, 1:2])
    put_rows(out, y_self, where(y_self == y_other, sums[:, 3:], sums[:, 2:3]))
    return out


def _lam_and_targets_torch(lam, target, partner, num_classes, smoothing):
    """(lam (B,) float32, a copy; soft targets (B, K) float32) without two one-hot matrices.

    Every entry is ``a * lam_self + b * lam_other`` for one of four (a, b) pairs of one-hot
    values: (off, off) in most columns, (off, on) at the partner's class, (on, off) at the own
    class, (on, on) there when both classes agree. The four are computed for all rows at once, in
    float32 products and one sum, with lam_other = 1 - lam in lam's own precision, so they round
    exactly like timm's ``y1 * lam + y2 * (1 - lam)``. On CPU tensors the same operations run on
    NumPy views of their memory: the arrays are small, and NumPy's cost per operation is a
    fraction of PyTorch's dispatch.
    """
    on, off = _smoothing_values(num_classes, smoothing)
    weights = np.array([[off, off, on, on], [off, on, off, on]], dtype=np.float32)
    # Only lam can carry a gradient (the others are integer tensors); it keeps PyTorch operations.
    if lam.device.type == "cpu" and not lam.requires_grad and not torch.compiler.is_compiling():
        lam, target, partner = lam.numpy(), target.numpy(), partner.numpy()
        lam_self = lam.astype(np.float32)
        targets = _soft_targets(target, lam_self, (1 - lam).astype(np.float32), partner, num_classes, weights, _NUMPY_OPS)
        return torch.from_numpy(lam_self), torch.from_numpy(targets)
    lam_self = lam.to(torch.float32, copy=True)
    weights = torch.from_numpy(weights).to(lam.device)
    return lam_self, _soft_targets(target, lam_self, (1 - lam).float(), partner, num_classes, weights, _TORCH_OPS)


def _run_torch(attn, token_mask, lam, target, partner, num_classes, ratio, smoothing):
    if attn is not None:
        lam = _lambda_torch(attn, token_mask, lam, ratio)  # float32: the lam of the targets
    if target is None:
        # A copy, never an alias of the caller's lam (custom ops must not return their inputs).
        return lam.to(torch.float32, copy=True), lam.new_empty((lam.shape[0], 0), dtype=torch.float32)
    return _lam_and_targets_torch(lam, target, partner, num_classes, smoothing)


# ---------------------------------------------------------------- torch.library registration


@torch.library.custom_op("transmix::lambda_targets", mutates_args=())
def _lambda_targets_op(
    attn: Optional[torch.Tensor], token_mask: Optional[torch.Tensor], lam: torch.Tensor,
    target: Optional[torch.Tensor], partner: Optional[torch.Tensor], num_classes: int, ratio: float, smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    backend = auto_backend(lam.device, LAMBDA_TARGETS)
    return dispatch(LAMBDA_TARGETS, backend, attn, token_mask, lam, target, partner, num_classes, ratio, smoothing)


@_lambda_targets_op.register_fake
def _(attn, token_mask, lam, target, partner, num_classes, ratio, smoothing):
    batch = lam.shape[0]
    width = num_classes if target is not None else 0
    return lam.new_empty((batch,), dtype=torch.float32), lam.new_empty((batch, width), dtype=torch.float32)


def _run_reference(attn, token_mask, lam, target, partner, num_classes, ratio, smoothing):
    lam_out = lam.float() if attn is None else reference.transmix_lambda(attn, token_mask, lam, ratio=ratio)
    if target is None:
        return lam_out, lam_out.new_empty((lam.shape[0], 0))
    lam_for_targets = lam if attn is None else lam_out
    return lam_out, reference.mix_targets(target, lam_for_targets, num_classes, partner=partner, smoothing=smoothing)


# ---------------------------------------------------------------- the op's backends

# transmix_lambda, mix_targets and transmix_targets share one op (transmix::lambda_targets).
# Arguments of every backend: validated (attn, token_mask, lam, target, partner, num_classes,
# ratio, smoothing) -> (lam (B,) float32, targets (B, K) float32 or (B, 0)); attn None: lam is
# given (targets only); target None: lambda only.
LAMBDA_TARGETS = Op(
    "transmix_lambda", torch=_run_torch, reference=_run_reference, triton=_run_triton, registered=_lambda_targets_op
)


# ---------------------------------------------------------------- validation


def _check_attention(attn, token_mask, lam_area):
    check_tensor("attn", attn, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    check_tensor("token_mask", token_mask, ndim=2, dtypes=FLOAT_DTYPES + (torch.bool,), device=attn.device)
    check_tensor("lam_area", lam_area, ndim=1, dtypes=(torch.float32, torch.float64), device=attn.device)
    batch = attn.shape[0]
    check_batch("token_mask", token_mask, batch, like="attn")
    check_batch("lam_area", lam_area, batch, like="attn")
    check_unit_interval("lam_area", lam_area)
    if token_mask.shape[1] != attn.shape[-1]:
        raise ValueError(
            f"attn and token_mask must cover the same tokens: attn has {attn.shape[-1]} (shape {tuple(attn.shape)}), "
            f"token_mask has {token_mask.shape[1]} (shape {tuple(token_mask.shape)})"
        )
    return token_mask.to(torch.uint8) if token_mask.dtype == torch.bool else token_mask


def _check_targets(target, num_classes, partner, smoothing, device, batch):
    check_positive_int("num_classes", num_classes)
    check_tensor("target", target, ndim=1, dtypes=(torch.int64,), device=device)
    if target.shape[0] != batch:
        raise ValueError(f"target must have shape ({batch},), got {tuple(target.shape)}")
    check_index_range("target", target, 0, num_classes)
    check_range("smoothing", smoothing, 0.0, 1.0)
    return check_partner(partner, batch, device)


# ---------------------------------------------------------------- public functions


def transmix_lambda(
    attn: torch.Tensor,
    token_mask: torch.Tensor,
    lam_area: torch.Tensor,
    *,
    ratio: float = 0.5,
    impl: str = "auto",
) -> torch.Tensor:
    """Each sample's own-label share: the area ratio blended with the attention share outside the box.

    Args:
        attn: (B, N) or (B, heads, N) class-to-patch attention probabilities (heads are averaged).
        token_mask: (B, N) float or bool, 1 where a patch token lies in the pasted box.
        lam_area: (B,) float32/float64, the share of each sample's own pixels.
        ratio: weight of lam_area (0.5 in the paper).
        impl: "auto" (Triton on CUDA tensors, the PyTorch path on CPU tensors), "triton", "torch"
            or "reference" (the plain twin in ``transmix_kernels.reference``).

    Returns:
        lam: (B,) float32. A row whose attention mass is zero or not finite has no attention
        information, so its lam_attn is lam_area (lam = lam_area): never a NaN.
    """
    token_mask = _check_attention(attn, token_mask, lam_area)
    ratio = check_range("ratio", ratio, 0.0, 1.0)
    backend = resolve_backend(impl, lam_area.device, LAMBDA_TARGETS)
    lam, _ = dispatch(LAMBDA_TARGETS, backend, attn, token_mask, lam_area, None, None, 0, ratio, 0.0)
    return lam


def mix_targets(
    target: torch.Tensor,
    lam: torch.Tensor,
    num_classes: int,
    *,
    partner: torch.Tensor | None = None,
    smoothing: float = 0.1,
    impl: str = "auto",
) -> torch.Tensor:
    """Soft targets ``lam * onehot_s(y) + (1 - lam) * onehot_s(y[partner])``, as timm's mixup_target.

    Args:
        target: (B,) int64 class indices in [0, num_classes).
        lam: (B,) float32 or float64 own-label share (float64 reproduces timm's per-batch
            Python-float lam bit for bit).
        partner: (B,) int64, default the flipped batch ``B-1-i``.
        smoothing: label smoothing s: off = s / K, on = 1 - s + off.
        impl: "auto" (Triton on CUDA tensors, the PyTorch path on CPU tensors), "triton", "torch"
            or "reference" (the plain twin in ``transmix_kernels.reference``).

    Returns:
        (B, num_classes) float32.
    """
    check_tensor("lam", lam, ndim=1, dtypes=(torch.float32, torch.float64))
    partner = _check_targets(target, num_classes, partner, smoothing, lam.device, lam.shape[0])
    check_unit_interval("lam", lam)
    backend = resolve_backend(impl, lam.device, LAMBDA_TARGETS)
    _, targets = dispatch(LAMBDA_TARGETS, backend, None, None, lam, target, partner, num_classes, 0.0, float(smoothing))
    return targets


def transmix_targets(
    attn: torch.Tensor,
    token_mask: torch.Tensor,
    lam_area: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    *,
    partner: torch.Tensor | None = None,
    ratio: float = 0.5,
    smoothing: float = 0.1,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`transmix_lambda` and :func:`mix_targets` fused in one launch.

    Args:
        attn: (B, N) or (B, heads, N) class-to-patch attention, as for :func:`transmix_lambda`.
        token_mask: (B, N) float or bool; lam_area: (B,) float32/float64.
        target: (B,) int64 class indices; partner: (B,) int64, default ``B-1-i``.
        ratio, smoothing, impl: as for :func:`transmix_lambda` and :func:`mix_targets`.

    Returns:
        targets: (B, num_classes) float32 and lam: (B,) float32.

    Example::

        targets, lam = tk.transmix_targets(attn, token_mask, lam_area, labels, 1000)
    """
    token_mask = _check_attention(attn, token_mask, lam_area)
    ratio = check_range("ratio", ratio, 0.0, 1.0)
    partner = _check_targets(target, num_classes, partner, smoothing, attn.device, attn.shape[0])
    backend = resolve_backend(impl, attn.device, LAMBDA_TARGETS)
    lam, targets = dispatch(
        LAMBDA_TARGETS, backend, attn, token_mask, lam_area, target, partner, num_classes, ratio, float(smoothing)
    )
    return targets, lam
