"""TransMix's lambda straight from the class token's q and the keys: softmax recomputed, never stored.

Fused attention (SDPA) never materialises the probabilities, but the class-token row is cheap to
recompute from ``q_cls`` and ``k``. With per-head logits ``s_hj = scale * q_h . k_hj`` and a running
max ``mu_h`` over all N_total tokens (prefix tokens included, as softmax sees them)::

    Z_h = sum_{all j}   exp(s_hj - mu_h)
    S_h = sum_{patch j} exp(s_hj - mu_h)
    O_h = sum_{patch j} exp(s_hj - mu_h) * (1 - m_j)

The head-averaged patch attention is ``a_j = mean_h exp(s_hj - mu_h) / Z_h``, so

    lam_attn = sum_j a_j (1 - m_j) / sum_j a_j = sum_h O_h / Z_h  /  sum_h S_h / Z_h

(the 1/heads cancels). One pass over k with online-softmax rescaling of (Z, S, O) when the running
max grows; all arithmetic in fp32 whatever the input dtype. A row whose patch mass is zero or not
finite falls back to ``lam_attn = lam_area``, as in :func:`transmix_kernels.transmix_lambda`.

``class_attention_row`` shares the statistics pass and writes the head-averaged class-to-patch
probabilities, renormalised over patches (the attention probe's map). ``received_attention`` is
its counterpart for models without a class token: the attention each patch token receives (mean
over query tokens and heads), computed a chunk of queries at a time.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from . import reference
from ._checks import (
    FLOAT_DTYPES,
    check_batch,
    check_num_prefix_tokens,
    check_positive_int,
    check_range,
    check_scale,
    check_tensor,
    check_unit_interval,
)
from ._dispatch import HAS_TRITON, Op, auto_backend, dispatch, resolve_backend
from ._launch import block_size, num_warps_for
from .transmix_lambda import blend_lambda

__all__ = [
    "CLASS_ATTENTION_LAMBDA",
    "CLASS_ATTENTION_ROW",
    "class_attention_lambda",
    "class_attention_row",
    "received_attention",
]

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .transmix_lambda import blend_lambda_triton

    @triton.jit
    def _class_logits(
        q, k_ptr, b, heads_idx, tok, dims,
        stride_kb, stride_kh, stride_kn, stride_kd,
        n_total, heads, head_dim, scale,
    ):
        """[BLOCK_H, BLOCK_N] fp32 logits of one token block; -inf on padded heads and tokens."""
        h_ok = heads_idx < heads
        t_ok = tok < n_total
        k_offs = (
            b * stride_kb
            + heads_idx[:, None, None] * stride_kh
            + tok[None, :, None] * stride_kn
            + dims[None, None, :] * stride_kd
        )
        k_ok = h_ok[:, None, None] & t_ok[None, :, None] & (dims < head_dim)[None, None, :]
        k = tl.load(k_ptr + k_offs, mask=k_ok, other=0.0).to(tl.float32)
        # A (heads x D) by (heads x tokens x D) contraction: one query row, so no tensor-core dot.
        logits = tl.sum(q[:, None, :] * k, axis=2) * scale
        return tl.where(h_ok[:, None] & t_ok[None, :], logits, float("-inf"))

    @triton.jit
    def _load_class_query(q_ptr, b, heads_idx, dims, stride_qb, stride_qh, stride_qd, heads, head_dim):
        offs = b * stride_qb + heads_idx[:, None] * stride_qh + dims[None, :] * stride_qd
        ok = (heads_idx < heads)[:, None] & (dims < head_dim)[None, :]
        return tl.load(q_ptr + offs, mask=ok, other=0.0).to(tl.float32)

    @triton.jit
    def _class_softmax_stats(
        q, k_ptr, mask_ptr, b, heads_idx, dims,
        stride_kb, stride_kh, stride_kn, stride_kd, stride_mb, stride_mn,
        n_total, heads, head_dim, n_prefix, scale,
        HAS_MASK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Per-head running max mu, Z (all tokens), S (patch tokens), O (patch tokens outside the box)."""
        mu = tl.full([BLOCK_H], float("-inf"), tl.float32)
        z = tl.zeros([BLOCK_H], tl.float32)
        s_patch = tl.zeros([BLOCK_H], tl.float32)
        o_patch = tl.zeros([BLOCK_H], tl.float32)
        for start in range(0, n_total, BLOCK_N):
            tok = start + tl.arange(0, BLOCK_N)
            logits = _class_logits(
                q, k_ptr, b, heads_idx, tok, dims,
                stride_kb, stride_kh, stride_kn, stride_kd, n_total, heads, head_dim, scale,
            )
            mu_new = tl.maximum(mu, tl.max(logits, axis=1))
            # Padded heads keep mu = -inf; shifting by 0 there avoids (-inf) - (-inf) = NaN.
            shift = tl.where(mu_new == float("-inf"), 0.0, mu_new)
            alpha = tl.exp(mu - shift)
            e = tl.exp(logits - shift[:, None])
            is_patch = (tok >= n_prefix) & (tok < n_total)
            e_patch = tl.where(is_patch[None, :], e, 0.0)
            z = z * alpha + tl.sum(e, axis=1)
            s_patch = s_patch * alpha + tl.sum(e_patch, axis=1)
            if HAS_MASK:
                inside = tl.load(
                    mask_ptr + b * stride_mb + (tok - n_prefix) * stride_mn, mask=is_patch, other=0.0
                ).to(tl.float32)
                o_patch = o_patch * alpha + tl.sum(e_patch * (1.0 - inside)[None, :], axis=1)
            mu = mu_new
        return mu, z, s_patch, o_patch

    @triton.jit
    def _class_attention_lambda_kernel(
        q_ptr, k_ptr, mask_ptr, lam_area_ptr, out_ptr,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_mb, stride_mn, stride_lb,
        n_total, heads, head_dim, n_prefix, scale, ratio, one_minus_ratio,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        heads_idx = tl.arange(0, BLOCK_H)
        dims = tl.arange(0, BLOCK_D)
        q = _load_class_query(q_ptr, b, heads_idx, dims, stride_qb, stride_qh, stride_qd, heads, head_dim)
        _, z, s_patch, o_patch = _class_softmax_stats(
            q, k_ptr, mask_ptr, b, heads_idx, dims,
            stride_kb, stride_kh, stride_kn, stride_kd, stride_mb, stride_mn,
            n_total, heads, head_dim, n_prefix, scale, True, BLOCK_H, BLOCK_N,
        )
        h_ok = heads_idx < heads
        z = tl.where(h_ok, z, 1.0)
        mass = tl.sum(tl.where(h_ok, s_patch / z, 0.0), axis=0)
        outside = tl.sum(tl.where(h_ok, o_patch / z, 0.0), axis=0)
        lam_area = tl.load(lam_area_ptr + b * stride_lb).to(tl.float32)
        tl.store(out_ptr + b, blend_lambda_triton(mass, outside, lam_area, ratio, one_minus_ratio))

    @triton.jit
    def _class_attention_row_kernel(
        q_ptr, k_ptr, out_ptr,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_ob, stride_on,
        n_total, heads, head_dim, n_prefix, scale,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        heads_idx = tl.arange(0, BLOCK_H)
        dims = tl.arange(0, BLOCK_D)
        q = _load_class_query(q_ptr, b, heads_idx, dims, stride_qb, stride_qh, stride_qd, heads, head_dim)
        mu, z, s_patch, _ = _class_softmax_stats(
            q, k_ptr, q_ptr, b, heads_idx, dims,
            stride_kb, stride_kh, stride_kn, stride_kd, 0, 0,
            n_total, heads, head_dim, n_prefix, scale, False, BLOCK_H, BLOCK_N,
        )
        h_ok = heads_idx < heads
        z = tl.where(h_ok, z, 1.0)
        shift = tl.where(mu == float("-inf"), 0.0, mu)
        # mean_h p_hj / sum_j mean_h p_hj: the 1/heads cancels, leaving 1 / sum_h S_h / Z_h.
        inv_mass = 1.0 / tl.sum(tl.where(h_ok, s_patch / z, 0.0), axis=0)
        # Second pass over the patch tokens only: recompute the logits, write normalised weights.
        for start in range(n_prefix, n_total, BLOCK_N):
            tok = start + tl.arange(0, BLOCK_N)
            logits = _class_logits(
                q, k_ptr, b, heads_idx, tok, dims,
                stride_kb, stride_kh, stride_kn, stride_kd, n_total, heads, head_dim, scale,
            )
            p = tl.exp(logits - shift[:, None]) / z[:, None]
            row = tl.sum(tl.where(h_ok[:, None], p, 0.0), axis=0) * inv_mass
            tl.store(out_ptr + b * stride_ob + (tok - n_prefix) * stride_on, row, mask=tok < n_total)


def _launch_settings(heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_N, BLOCK_D, num_warps): the 3-D k tile kept near 8K elements."""
    block_d = block_size(head_dim, cap=1 << 16)
    # Heads are few (3-16); padding them to 16 like a row length would waste most of the tile.
    block_h = 1 << max(0, (heads - 1).bit_length())
    block_n = max(1, min(64, 8192 // (block_h * block_d)))
    return block_h, block_n, block_d, num_warps_for(block_h * block_n * block_d // 2)


def _class_attention_lambda_triton(
    q_cls: torch.Tensor, k: torch.Tensor, token_mask: torch.Tensor, lam_area: torch.Tensor,
    scale: float, num_prefix_tokens: int, ratio: float,
) -> torch.Tensor:
    batch, heads, n_total, head_dim = k.shape
    out = torch.empty(batch, device=k.device, dtype=torch.float32)
    if batch == 0:
        return out
    if token_mask.dtype == torch.bool:
        token_mask = token_mask.view(torch.uint8)  # same bytes; Triton loads i1 pointers poorly
    block_h, block_n, block_d, warps = _launch_settings(heads, head_dim)
    _class_attention_lambda_kernel[(batch,)](
        q_cls, k, token_mask, lam_area, out,
        *q_cls.stride(), *k.stride(), *token_mask.stride(), lam_area.stride(0),
        n_total, heads, head_dim, num_prefix_tokens, float(scale), float(ratio), 1.0 - float(ratio),
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
    )
    return out


def _class_attention_row_triton(
    q_cls: torch.Tensor, k: torch.Tensor, scale: float, num_prefix_tokens: int
) -> torch.Tensor:
    batch, heads, n_total, head_dim = k.shape
    out = torch.empty(batch, n_total - num_prefix_tokens, device=k.device, dtype=torch.float32)
    if batch == 0:
        return out
    block_h, block_n, block_d, warps = _launch_settings(heads, head_dim)
    _class_attention_row_kernel[(batch,)](
        q_cls, k, out,
        *q_cls.stride(), *k.stride(), *out.stride(),
        n_total, heads, head_dim, num_prefix_tokens, float(scale),
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
    )
    return out


def _class_softmax_stats_torch(
    q_cls: torch.Tensor, k: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, heads, N_total) fp32 exp(s - max) and (B, heads, 1) normaliser Z."""
    # (B, heads, 1, D) @ (B, heads, D, N) -> (B, heads, 1, N): a row per head, never N x N.
    logits = torch.matmul(q_cls.float().unsqueeze(2), k.float().transpose(-1, -2)).squeeze(2) * scale
    mu = logits.amax(dim=-1, keepdim=True)
    e = torch.exp(logits - torch.where(mu == float("-inf"), torch.zeros_like(mu), mu))
    return e, e.sum(dim=-1, keepdim=True)


def _class_attention_lambda_torch(
    q_cls: torch.Tensor, k: torch.Tensor, token_mask: torch.Tensor, lam_area: torch.Tensor,
    scale: float, num_prefix_tokens: int, ratio: float,
) -> torch.Tensor:
    e, z = _class_softmax_stats_torch(q_cls, k, scale)
    weights = (e[..., num_prefix_tokens:] / z)  # (B, heads, N): per-head patch probabilities
    outside = 1.0 - token_mask.float()
    mass = weights.sum(dim=(1, 2))
    outside_mass = (weights * outside.unsqueeze(1)).sum(dim=(1, 2))
    return blend_lambda(mass, outside_mass, lam_area.float(), ratio)


def _class_attention_row_torch(
    q_cls: torch.Tensor, k: torch.Tensor, scale: float, num_prefix_tokens: int
) -> torch.Tensor:
    e, z = _class_softmax_stats_torch(q_cls, k, scale)
    row = (e[..., num_prefix_tokens:] / z).sum(dim=1)
    return row / row.sum(dim=-1, keepdim=True)


@torch.library.custom_op("transmix::class_attention_lambda", mutates_args=())
def _class_attention_lambda_op(
    q_cls: torch.Tensor, k: torch.Tensor, token_mask: torch.Tensor, lam_area: torch.Tensor,
    scale: float, num_prefix_tokens: int, ratio: float,
) -> torch.Tensor:
    backend = auto_backend(k.device, CLASS_ATTENTION_LAMBDA)
    return dispatch(
        CLASS_ATTENTION_LAMBDA, backend, q_cls, k, token_mask, lam_area,
        scale=scale, num_prefix_tokens=num_prefix_tokens, ratio=ratio,
    )


@_class_attention_lambda_op.register_fake
def _(q_cls, k, token_mask, lam_area, scale, num_prefix_tokens, ratio):
    return k.new_empty((k.shape[0],), dtype=torch.float32)


@torch.library.custom_op("transmix::class_attention_row", mutates_args=())
def _class_attention_row_op(q_cls: torch.Tensor, k: torch.Tensor, scale: float, num_prefix_tokens: int) -> torch.Tensor:
    backend = auto_backend(k.device, CLASS_ATTENTION_ROW)
    return dispatch(CLASS_ATTENTION_ROW, backend, q_cls, k, scale=scale, num_prefix_tokens=num_prefix_tokens)


@_class_attention_row_op.register_fake
def _(q_cls, k, scale, num_prefix_tokens):
    return k.new_empty((k.shape[0], k.shape[2] - num_prefix_tokens), dtype=torch.float32)


# Arguments of every backend: validated, detached (q_cls, k, token_mask, lam_area) and the
# keywords scale, num_prefix_tokens, ratio; the row takes (q_cls, k, scale, num_prefix_tokens).
CLASS_ATTENTION_LAMBDA = Op(
    "class_attention_lambda", torch=_class_attention_lambda_torch, reference=reference.class_attention_lambda,
    triton=_class_attention_lambda_triton, registered=_class_attention_lambda_op,
)
CLASS_ATTENTION_ROW = Op(
    "class_attention_row", torch=_class_attention_row_torch, reference=reference.class_attention_row,
    triton=_class_attention_row_triton, registered=_class_attention_row_op,
)


def _check_query_keys(q_cls, k, scale, num_prefix_tokens) -> None:
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("q_cls", q_cls, ndim=3, dtypes=(k.dtype,), device=k.device)
    batch, heads, n_total, head_dim = k.shape
    if tuple(q_cls.shape) != (batch, heads, head_dim):
        raise ValueError(
            f"q_cls must have shape (B, heads, D) = {(batch, heads, head_dim)} to match k of shape "
            f"{tuple(k.shape)}, got {tuple(q_cls.shape)}"
        )
    check_scale(scale)
    check_num_prefix_tokens(num_prefix_tokens, n_total, "k")


def class_attention_lambda(
    q_cls: torch.Tensor,
    k: torch.Tensor,
    token_mask: torch.Tensor,
    lam_area: torch.Tensor,
    *,
    scale: float,
    num_prefix_tokens: int = 1,
    ratio: float = 0.5,
    impl: str = "auto",
) -> torch.Tensor:
    """TransMix's lam from the class token's query and the keys, the attention row never stored.

    Args:
        q_cls: (B, heads, D) float32/bfloat16/float16, the class token's query (any strides).
        k: (B, heads, N_total, D), same dtype; any strides, e.g. timm's view into the qkv output.
        token_mask: (B, N_total - num_prefix_tokens) float or bool, 1 for patch tokens in the box.
        lam_area: (B,) float32/float64, the area share of the image that was not pasted over.
        scale: the attention's logit scale (timm: ``attn.scale`` = head_dim ** -0.5).
        num_prefix_tokens: class/distillation/register tokens before the patches (excluded from
            the attention share but part of the softmax).
        ratio: weight of lam_area in the blend (0.5 in the paper).
        impl: "auto" (Triton on CUDA tensors, the PyTorch path on CPU tensors), "triton", "torch"
            or "reference" (the plain twin in ``transmix_kernels.reference``).

    Returns:
        lam: (B,) float32 = ratio * lam_area + (1 - ratio) * lam_attn, with
        lam_attn = sum_j a_j (1 - m_j) / sum_j a_j over patch tokens, a = softmax(q k^T * scale)
        averaged over heads; lam_attn = lam_area where the patch mass is zero or not finite.

    Example:
        >>> qkv = attn.qkv(x).reshape(B, N, 3, heads, D).permute(2, 0, 3, 1, 4)
        >>> lam = class_attention_lambda(qkv[0][:, :, 0], qkv[1], token_mask, lam_area, scale=attn.scale)
    """
    _check_query_keys(q_cls, k, scale, num_prefix_tokens)
    batch, _, n_total, _ = k.shape
    check_tensor("token_mask", token_mask, ndim=2, dtypes=FLOAT_DTYPES + (torch.bool,), device=k.device)
    check_batch("token_mask", token_mask, batch, like="k")
    if token_mask.shape[1] != n_total - num_prefix_tokens:
        raise ValueError(
            f"token_mask must have shape (B, N_total - num_prefix_tokens) = {(batch, n_total - num_prefix_tokens)}, "
            f"got {tuple(token_mask.shape)}"
        )
    check_tensor("lam_area", lam_area, ndim=1, dtypes=(torch.float32, torch.float64), device=k.device)
    check_batch("lam_area", lam_area, batch, like="k")
    check_unit_interval("lam_area", lam_area)
    ratio = check_range("ratio", ratio, 0.0, 1.0)
    backend = resolve_backend(impl, k.device, CLASS_ATTENTION_LAMBDA)
    # The lambda is a label weight: no gradient flows into it, and detach() is a free view.
    return dispatch(
        CLASS_ATTENTION_LAMBDA, backend, q_cls.detach(), k.detach(), token_mask.detach(), lam_area.detach(),
        scale=float(scale), num_prefix_tokens=num_prefix_tokens, ratio=ratio,
    )


def class_attention_row(
    q_cls: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    num_prefix_tokens: int = 1,
    impl: str = "auto",
) -> torch.Tensor:
    """Head-averaged class-to-patch attention, renormalised over the patch tokens.

    Args:
        q_cls: (B, heads, D) float32/bfloat16/float16 (any strides).
        k: (B, heads, N_total, D), same dtype (any strides).
        scale: the attention's logit scale.
        num_prefix_tokens: tokens before the patches; they take part in the softmax, then are dropped.
        impl: "auto" (Triton on CUDA tensors, the PyTorch path on CPU tensors), "triton", "torch"
            or "reference" (the plain twin in ``transmix_kernels.reference``).

    Returns:
        (B, N_total - num_prefix_tokens) float32 whose rows sum to 1: mean over heads of
        softmax(q_cls k^T * scale) on the patch columns, divided by its row sum. A row whose patch
        mass underflows to zero comes out NaN, as the plain formula would.

    Example:
        >>> a = class_attention_row(q[:, :, 0], k, scale=attn.scale)   # (B, 196) for DeiT at 224 px
    """
    _check_query_keys(q_cls, k, scale, num_prefix_tokens)
    backend = resolve_backend(impl, k.device, CLASS_ATTENTION_ROW)
    return dispatch(
        CLASS_ATTENTION_ROW, backend, q_cls.detach(), k.detach(),
        scale=float(scale), num_prefix_tokens=num_prefix_tokens,
    )


def received_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    num_prefix_tokens: int = 0,
    logit_addends: Optional[Callable[[int, int], Sequence[torch.Tensor]]] = None,
    max_chunk_elements: int = 1 << 23,
) -> torch.Tensor:
    """Attention each patch token receives: mean over patch queries and heads, renormalised.

    The map for models without a class token (PVTv2, Swin, ViT with ``class_token=False``).

    Args:
        q, k: (B, heads, N, D) float32/bfloat16/float16, the same dtype (computed in float32).
        scale: the attention's logit scale.
        num_prefix_tokens: tokens before the patches, dropped as queries and as keys.
        logit_addends: ``logit_addends(start, stop)`` returns tensors broadcastable to
            (B, heads, stop - start, N) that the model adds to the logits of query rows
            [start, stop), in the model's order (Swin: relative position bias, then shift mask).
        max_chunk_elements: queries run in chunks whose (B, heads, chunk, N) float32 logits stay
            under this many elements (default 2**23, 32 MiB), so no N x N tensor exists whole.

    Returns:
        (B, N - num_prefix_tokens) float32, rows sum to 1.

    Example:
        >>> a = received_attention(q, k, scale=attn.scale)   # (B, 49) for PVTv2's last stage at 224 px
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device)
    if q.shape != k.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)} (B, heads, N, D), got {tuple(k.shape)}")
    _check_query_keys(q[:, :, 0], k, scale, num_prefix_tokens)
    if logit_addends is not None and not callable(logit_addends):
        raise TypeError(f"logit_addends must be callable (start, stop) -> tensors or None, got {logit_addends!r}")
    check_positive_int("max_chunk_elements", max_chunk_elements)
    batch, heads, tokens, _ = q.shape
    q32, k_t = q.detach().float(), k.detach().float().transpose(-2, -1)
    chunk = max(1, max_chunk_elements // (batch * heads * tokens))
    received = torch.zeros(batch, tokens, dtype=torch.float32, device=q.device)
    for start in range(num_prefix_tokens, tokens, chunk):
        stop = min(tokens, start + chunk)
        # q * scale first, as timm's naive path does, so the logits round the same way.
        logits = (q32[:, :, start:stop] * float(scale)) @ k_t
        for addend in logit_addends(start, stop) if logit_addends is not None else ():
            logits = logits + addend.float()
        received += logits.softmax(dim=-1).sum(dim=(1, 2))
    received = received[:, num_prefix_tokens:]
    return received / received.sum(dim=-1, keepdim=True)

