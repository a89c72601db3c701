"""Class-token attention rollout from every block's q and k, no N x N matrix ever held.

Rollout (Abnar & Zuidema 2020) multiplies A'_l = (1 - r) * mean_h P_hl + r * I, P_hl = softmax(q k^T *
scale + bias), as R = A'_L ... A'_1; only the class row e_0^T R is needed, so it is a vector pushed
through the chain from the last block down::

    v <- e_0;   for l = L .. 1:   v_new[j] = (1 - r)/H * sum_h sum_i v[i] * P_h[i, j]  +  r * v[j]

Rows of mean_h P sum to 1, so A' rows already sum to 1 and the "rows renormalised" step is the
identity (the reference twin divides explicitly; the tests check the two agree). Per step, flash
style, memory O(B * heads * N):

1. row statistics: for each query row i, the max mu_hi and normaliser Z_hi of its logits over all
   keys; store c_hi = (1 - r)/H * v[i] / Z_hi next to mu_hi;
2. column sums: for each key column j, v_new[j] = sum_h sum_i c_hi * exp(s_hij - mu_hi) + r v[j],
   the logits recomputed tile by tile.

v starts as e_0, so the first step (block L) needs only query row 0: both passes run over
``n_query = 1`` rows there, over all N rows afterwards. The result is v's patch columns divided by
their sum.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from . import reference
from ._checks import FLOAT_DTYPES, check_num_prefix_tokens, check_range, check_scale, check_tensor
from ._dispatch import HAS_TRITON, TRITON_INTERPRET, Op, auto_backend, dispatch, resolve_backend
from ._launch import block_size

__all__ = ["QK_ROLLOUT", "rollout_from_qk"]

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _qk_logits_tile(
        q_ptr, k_ptr, bias_ptr, b, h, rows, cols,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_bb, stride_bh, stride_bi, stride_bj,
        n_tokens, head_dim, scale,
        HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """[rows, cols] fp32 logits scale * q_i . k_j (+ bias_ij); -inf on padded keys."""
        dims = tl.arange(0, BLOCK_D)
        d_ok = dims < head_dim
        q = tl.load(
            q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + dims[None, :] * stride_qd,
            mask=(rows < n_tokens)[:, None] & d_ok[None, :], other=0.0,
        )
        kt = tl.load(
            k_ptr + b * stride_kb + h * stride_kh + cols[None, :] * stride_kn + dims[:, None] * stride_kd,
            mask=(cols < n_tokens)[None, :] & d_ok[:, None], other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
            kt = kt.to(tl.float32)
        # fp32 inputs: plain TF32 would cost ~1e-3 relative on the logits (bf16/fp16 products are
        # exact in the fp32 accumulator, whatever the setting).
        logits = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale
        if HAS_BIAS:
            logits += tl.load(
                bias_ptr + b * stride_bb + h * stride_bh + rows[:, None] * stride_bi + cols[None, :] * stride_bj,
                mask=(rows < n_tokens)[:, None] & (cols < n_tokens)[None, :], other=0.0,
            ).to(tl.float32)
        return tl.where((cols < n_tokens)[None, :], logits, float("-inf"))

    @triton.jit
    def _qk_rollout_row_stats_kernel(
        q_ptr, k_ptr, bias_ptr, v_ptr, coef_ptr, mu_ptr,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_bb, stride_bh, stride_bi, stride_bj,
        heads, n_tokens, n_query, head_dim, scale, mix,
        HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Pass 1, one (sample, head, query block): coef = mix * v_i / Z_i and the row max mu_i."""
        pid_bh = tl.program_id(0).to(tl.int64)
        b = pid_bh // heads
        h = pid_bh % heads
        rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        mu = tl.full([BLOCK_M], float("-inf"), tl.float32)
        z = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, n_tokens, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            logits = _qk_logits_tile(
                q_ptr, k_ptr, bias_ptr, b, h, rows, cols,
                stride_qb, stride_qh, stride_qn, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_bb, stride_bh, stride_bi, stride_bj,
                n_tokens, head_dim, scale, HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_D,
            )
            mu_new = tl.maximum(mu, tl.max(logits, axis=1))
            # A row masked to -inf throughout keeps mu = -inf; shift by 0 to avoid inf - inf.
            shift = tl.where(mu_new == float("-inf"), 0.0, mu_new)
            z = z * tl.exp(mu - shift) + tl.sum(tl.exp(logits - shift[:, None]), axis=1)
            mu = mu_new
        row_ok = rows < n_query
        v = tl.load(v_ptr + b * n_tokens + rows, mask=row_ok, other=0.0)
        out = pid_bh * n_tokens + rows
        tl.store(coef_ptr + out, mix * v / z, mask=row_ok)
        tl.store(mu_ptr + out, mu, mask=row_ok)

    @triton.jit
    def _qk_rollout_step_kernel(
        q_ptr, k_ptr, bias_ptr, v_ptr, coef_ptr, mu_ptr, v_out_ptr,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_bb, stride_bh, stride_bi, stride_bj,
        heads, n_tokens, n_query, head_dim, scale, residual,
        HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Pass 2, one (sample, key block): v_new[j] = sum_h sum_i coef_hi exp(s_hij - mu_hi) + r v[j]."""
        b = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_tokens
        acc = tl.zeros([BLOCK_N], tl.float32)
        for h in range(0, heads):
            stats = (b * heads + h) * n_tokens
            for start in range(0, n_query, BLOCK_M):
                rows = start + tl.arange(0, BLOCK_M)
                row_ok = rows < n_query
                # Same tile orientation as pass 1, so the logits (and s - mu <= 0) match bit for bit.
                logits = _qk_logits_tile(
                    q_ptr, k_ptr, bias_ptr, b, h, rows, cols,
                    stride_qb, stride_qh, stride_qn, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_bb, stride_bh, stride_bi, stride_bj,
                    n_tokens, head_dim, scale, HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_D,
                )
                coef = tl.load(coef_ptr + stats + rows, mask=row_ok, other=0.0)
                # mu = +inf on rows outside n_query: exp underflows to 0 instead of overflowing.
                mu = tl.load(mu_ptr + stats + rows, mask=row_ok, other=float("inf"))
                p = tl.where(row_ok[:, None], tl.exp(logits - mu[:, None]), 0.0)
                acc += tl.sum(p * coef[:, None], axis=0)
        v = tl.load(v_ptr + b * n_tokens + cols, mask=col_ok, other=0.0)
        tl.store(v_out_ptr + b * n_tokens + cols, acc + residual * v, mask=col_ok)


@functools.lru_cache(maxsize=None)
def _fp32_dot_precision(device: torch.device) -> str:
    """How tl.dot multiplies fp32 tiles: "tf32x3" (three TF32 tensor-core products, fp32-level
    accuracy: max relative error 2.9e-7 on the DeiT-S rollout on an H200, same as "ieee", 5.3x faster)
    where TF32 exists (sm80+), exact fp32 FMA ("ieee") elsewhere and in the interpreter."""
    if device.type != "cuda":
        return "ieee"
    nvidia_tf32 = torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 0)
    return "tf32x3" if nvidia_tf32 else "ieee"


def _bias_view(bias: Optional[torch.Tensor], q: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], bool]:
    """The bias broadcast to (B, heads, N, N) by strides (zero strides: no copy)."""
    if bias is None:
        return q, (0, 0, 0, 0), False
    batch, heads, n_tokens, _ = q.shape
    full = bias.expand(batch, heads, n_tokens, n_tokens)
    return full, full.stride(), True


def _rollout_triton(queries, keys, attn_bias, scale, residual, num_prefix_tokens) -> torch.Tensor:
    batch, _, n_tokens, _ = queries[0].shape
    device = queries[0].device
    v = torch.zeros(batch, n_tokens, device=device, dtype=torch.float32)
    v[:, 0] = 1.0
    v_next = torch.empty_like(v)
    block = min(64, block_size(n_tokens))
    # The Triton interpreter (CPU) multiplies bf16 tiles as raw bits; on a GPU they go to tl.dot as is.
    upcast = TRITON_INTERPRET and queries[0].dtype == torch.bfloat16
    precision = _fp32_dot_precision(device)
    for layer in range(len(queries) - 1, -1, -1):
        q, k = queries[layer], keys[layer]
        heads, head_dim = q.shape[1], q.shape[3]
        bias, bias_strides, has_bias = _bias_view(attn_bias[layer], q)
        # Only row 0 of v is non-zero before the first (last-block) step.
        n_query = 1 if layer == len(queries) - 1 else n_tokens
        coef = torch.empty(batch, heads, n_tokens, device=device, dtype=torch.float32)
        mu = torch.empty_like(coef)
        common = dict(
            HAS_BIAS=has_bias, UPCAST=upcast, DOT_PRECISION=precision,
            BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_size(head_dim), num_warps=4,
        )
        strides = (*q.stride(), *k.stride(), *bias_strides)
        _qk_rollout_row_stats_kernel[(batch * heads, triton.cdiv(n_query, block))](
            q, k, bias, v, coef, mu, *strides,
            heads, n_tokens, n_query, head_dim, scale, (1.0 - residual) / heads, **common,
        )
        _qk_rollout_step_kernel[(batch, triton.cdiv(n_tokens, block))](
            q, k, bias, v, coef, mu, v_next, *strides,
            heads, n_tokens, n_query, head_dim, scale, residual, **common,
        )
        v, v_next = v_next, v
    patches = v[:, num_prefix_tokens:]
    return patches / patches.sum(-1, keepdim=True)


def _rollout_torch(queries, keys, attn_bias, scale, residual, num_prefix_tokens, chunk: int = 64) -> torch.Tensor:
    """Vectorised over batch and heads, chunked over query rows: at most (B, heads, chunk, N) held."""
    batch, _, n_tokens, _ = queries[0].shape
    v = torch.zeros(batch, n_tokens, device=queries[0].device, dtype=torch.float32)
    v[:, 0] = 1.0
    for layer in range(len(queries) - 1, -1, -1):
        # One dense copy per block: timm's strided views would otherwise be copied by every matmul.
        q, k = queries[layer].float().contiguous(), keys[layer].float().contiguous().transpose(-1, -2)
        bias = attn_bias[layer]
        heads = q.shape[1]
        n_query = 1 if layer == len(queries) - 1 else n_tokens
        v_new = residual * v
        for start in range(0, n_query, chunk):
            stop = min(start + chunk, n_query)
            logits = torch.matmul(q[:, :, start:stop], k) * scale
            if bias is not None:
                logits = logits + bias.expand(batch, heads, n_tokens, n_tokens)[:, :, start:stop].float()
            probs = torch.softmax(logits, dim=-1)  # (B, heads, chunk, N)
            # sum_h sum_i w_i p_hij as one (1 x heads*chunk) @ (heads*chunk x N) product per sample.
            weights = (v[:, start:stop] * ((1.0 - residual) / heads)).repeat(1, heads).unsqueeze(1)
            v_new = v_new + torch.bmm(weights, probs.reshape(batch, heads * (stop - start), n_tokens)).squeeze(1)
        v = v_new
    patches = v[:, num_prefix_tokens:]
    return patches / patches.sum(-1, keepdim=True)


@torch.library.custom_op("transmix::rollout_from_qk", mutates_args=())
def _rollout_from_qk_op(
    queries: list[torch.Tensor], keys: list[torch.Tensor], attn_bias: list[Optional[torch.Tensor]],
    scale: float, residual: float, num_prefix_tokens: int,
) -> torch.Tensor:
    backend = auto_backend(queries[0].device, QK_ROLLOUT)
    return dispatch(
        QK_ROLLOUT, backend, queries, keys,
        attn_bias=attn_bias, scale=scale, residual=residual, num_prefix_tokens=num_prefix_tokens,
    )


@_rollout_from_qk_op.register_fake
def _(queries, keys, attn_bias, scale, residual, num_prefix_tokens):
    batch, _, n_tokens, _ = queries[0].shape
    return queries[0].new_empty((batch, n_tokens - num_prefix_tokens), dtype=torch.float32)


# Arguments of every backend: validated, detached lists (queries, keys) and the keywords
# attn_bias (one entry per block), scale, residual, num_prefix_tokens.
QK_ROLLOUT = Op(
    "rollout_from_qk", torch=_rollout_torch, reference=reference.rollout_from_qk,
    triton=_rollout_triton, registered=_rollout_from_qk_op,
)


def _check_bias(name: str, bias, target: tuple[int, int, int, int], device: torch.device) -> None:
    check_tensor(name, bias, dtypes=FLOAT_DTYPES, device=device)
    try:
        fits = bias.dim() <= 4 and torch.broadcast_shapes(bias.shape, target) == target
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"{name} must broadcast to (B, heads, N, N) = {target}, got {tuple(bias.shape)}")


def _check_blocks(queries, keys, attn_bias, scale, num_prefix_tokens) -> tuple[list, list, list]:
    for name, value in (("queries", queries), ("keys", keys)):
        if isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
            raise TypeError(
                f"{name} must be a list of (B, heads, N, D) tensors, one per block, got {type(value).__name__}"
            )
    if len(queries) == 0 or len(queries) != len(keys):
        raise ValueError(
            f"queries and keys must be non-empty lists of the same length (one per block), "
            f"got {len(queries)} queries and {len(keys)} keys"
        )
    first = check_tensor("queries[0]", queries[0], ndim=4, dtypes=FLOAT_DTYPES)
    batch, _, n_tokens, _ = first.shape
    for layer, (q, k) in enumerate(zip(queries, keys)):
        check_tensor(f"queries[{layer}]", q, ndim=4, dtypes=FLOAT_DTYPES, device=first.device)
        check_tensor(f"keys[{layer}]", k, ndim=4, dtypes=(q.dtype,), device=first.device)
        if q.shape != k.shape:
            raise ValueError(
                f"keys[{layer}] must have the shape of queries[{layer}] {tuple(q.shape)}, got {tuple(k.shape)}"
            )
        if q.shape[0] != batch or q.shape[2] != n_tokens:
            raise ValueError(
                f"queries[{layer}] must have batch {batch} and {n_tokens} tokens like queries[0] "
                f"(shape (B, heads, N, D)), got {tuple(q.shape)}"
            )
    if attn_bias is not None:
        if isinstance(attn_bias, torch.Tensor) or not isinstance(attn_bias, Sequence):
            raise TypeError(
                f"attn_bias must be None or a list with one entry (None or a tensor) per block, "
                f"got {type(attn_bias).__name__}"
            )
        if len(attn_bias) != len(queries):
            raise ValueError(f"attn_bias must have one entry per block ({len(queries)}), got {len(attn_bias)}")
        for layer, bias in enumerate(attn_bias):
            if bias is not None:
                target = (batch, queries[layer].shape[1], n_tokens, n_tokens)
                _check_bias(f"attn_bias[{layer}]", bias, target, first.device)
    check_scale(scale)
    check_num_prefix_tokens(num_prefix_tokens, n_tokens, "each block")
    # One entry per block always: the registered op's schema has no optional list.
    return list(queries), list(keys), [None] * len(queries) if attn_bias is None else list(attn_bias)


def rollout_from_qk(
    queries: Sequence[torch.Tensor],
    keys: Sequence[torch.Tensor],
    *,
    scale: float,
    residual: float = 0.5,
    num_prefix_tokens: int = 1,
    impl: str = "auto",
    attn_bias: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> torch.Tensor:
    """Class-token attention rollout over all blocks from their q and k, O(B * heads * N) memory.

    Args:
        queries: one (B, heads, N, D) float32/bfloat16/float16 tensor per block, first block first
            (any strides, e.g. timm's views into the qkv output).
        keys: the blocks' keys, shapes and dtypes as ``queries``.
        scale: the logit scale (timm: ``attn.scale``).
        residual: weight r of the identity in A' = (1 - r) * mean_h softmax + r * I (0.5 in the paper).
        num_prefix_tokens: class/distillation/register tokens before the patches; the class token
            (token 0) is the row followed.
        attn_bias: None, or one entry per block: None or an additive logit bias broadcastable to
            (B, heads, N, N) (e.g. a relative position bias), added after scaling.
        impl: "auto" (Triton on CUDA tensors, the PyTorch path on CPU tensors), "triton", "torch"
            or "reference" (the plain twin in ``transmix_kernels.reference``).

    Returns:
        (B, N - num_prefix_tokens) float32: row 0 of A'_L ... A'_1 on the patch columns,
        renormalised to sum to 1 (the rollout attention map).

    Example:
        >>> amap = rollout_from_qk([b.q for b in caps], [b.k for b in caps], scale=64 ** -0.5)
    """
    queries, keys, attn_bias = _check_blocks(queries, keys, attn_bias, scale, num_prefix_tokens)
    residual = check_range("residual", residual, 0.0, 1.0)
    backend = resolve_backend(impl, queries[0].device, QK_ROLLOUT)
    # An attention map for labels or display: no gradient; detach() is a free view.
    queries = [q.detach() for q in queries]
    keys = [k.detach() for k in keys]
    attn_bias = [None if bias is None else bias.detach() for bias in attn_bias]
    return dispatch(
        QK_ROLLOUT, backend, queries, keys,
        attn_bias=attn_bias, scale=float(scale), residual=residual, num_prefix_tokens=num_prefix_tokens,
    )

