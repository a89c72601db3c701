"""Attention rollout (Abnar & Zuidema 2020) from every block's attention probabilities.

Per layer l (first block first), with r = ``residual``::

    A_l  = fusion over heads of the attention (mean, max or min)                 (B, N, N)
    A'_l = (1 - r) * A_l + r * I, each row divided by its sum
    R    = A'_L @ ... @ A'_1

Only the class token's row of R is needed for the map, so the compiled kernel and the PyTorch
path compute it as a vector pushed through the chain from the last block down, O(L * N^2)::

    v <- e_0;   for l = L .. 1:   v <- v @ A'_l
    with s_i = sum_j A_l[i, j] and w_i = v_i / ((1 - r) * s_i + r):
        (v @ A'_l)[j] = (1 - r) * sum_i w_i * A_l[i, j] + r * w_j

so fusion, residual and renormalisation happen while A_l is read, and the first step reads only
row 0 of the last block. The kernels are in ``csrc/rollout.cpp`` (CPU, at::parallel_for) and
``csrc/rollout_cuda.cu``; without the extension the PyTorch path below runs, after one warning.
There is no Triton kernel: the op is memory bound, and the C++/CUDA kernels already read each
matrix from memory once (the CUDA kernel's second look at a block's rows hits L2).
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import _ext, reference
from ._checks import FLOAT_DTYPES, check_num_prefix_tokens, check_range, check_tensor
from ._dispatch import IMPLS, Extension, Op, auto_backend, dispatch, resolve_backend

__all__ = ["ROLLOUT", "attention_rollout"]

HEAD_FUSIONS = ("mean", "max", "min")


# --- PyTorch path ------------------------------------------------------------------------------


def _fuse_heads(attention: torch.Tensor, head_fusion: str) -> torch.Tensor:
    """(B, heads, ...) -> (B, ...) float32; max/min select an element, so they are exact."""
    if head_fusion == "mean":
        return attention.mean(1, dtype=torch.float32)
    fused = attention.amax(1) if head_fusion == "max" else attention.amin(1)
    return fused.float()


def _rollout_row_torch(
    attentions: Sequence[torch.Tensor], residual: float, head_fusion: str, num_prefix_tokens: int
) -> torch.Tensor:
    keep = 1.0 - residual
    # v = e_0 @ A'_L is the class row of the last block's A'.
    row = keep * _fuse_heads(attentions[-1][:, :, 0, :], head_fusion)
    row[:, 0] += residual
    v = row / row.sum(-1, keepdim=True)
    for attention in reversed(attentions[:-1]):
        fused = _fuse_heads(attention, head_fusion)
        w = v / (keep * fused.sum(-1) + residual)
        v = keep * torch.bmm(w.unsqueeze(1), fused).squeeze(1) + residual * w
    patches = v[:, num_prefix_tokens:]
    return patches / patches.sum(-1, keepdim=True)


def _rollout_layer_torch(attention: torch.Tensor, residual: float, head_fusion: str) -> torch.Tensor:
    """A'_l: (B, heads, N, N) -> (B, N, N) float32."""
    mixed = (1.0 - residual) * _fuse_heads(attention, head_fusion)
    mixed.diagonal(dim1=-2, dim2=-1).add_(residual)
    return mixed / mixed.sum(-1, keepdim=True)


def _rollout_full_torch(attentions: Sequence[torch.Tensor], residual: float, head_fusion: str) -> torch.Tensor:
    product = _rollout_layer_torch(attentions[-1], residual, head_fusion)
    for attention in reversed(attentions[:-1]):
        product = torch.bmm(product, _rollout_layer_torch(attention, residual, head_fusion))
    return product


def _rollout_torch(
    attentions: Sequence[torch.Tensor], residual: float, head_fusion: str, num_prefix_tokens: int, full: bool
) -> torch.Tensor:
    if full:
        return _rollout_full_torch(attentions, residual, head_fusion)
    return _rollout_row_torch(attentions, residual, head_fusion, num_prefix_tokens)


# --- compiled extension -------------------------------------------------------------------------


def _rollout_extension(
    attentions: Sequence[torch.Tensor], residual: float, head_fusion: str, num_prefix_tokens: int, full: bool
) -> torch.Tensor:
    module = _ext.extension()
    # The kernels index densely; .contiguous() copies only inputs that are not.
    layers = [attention.contiguous() for attention in attentions]
    if full:
        return module.attention_rollout_full(layers, float(residual), head_fusion)
    return module.attention_rollout_row(layers, float(residual), head_fusion, int(num_prefix_tokens))


# --- torch.library registration ----------------------------------------------------------------


@torch.library.custom_op("transmix::attention_rollout", mutates_args=())
def _attention_rollout_op(
    attentions: list[torch.Tensor], residual: float, head_fusion: str, num_prefix_tokens: int, full: bool
) -> torch.Tensor:
    backend = auto_backend(attentions[0].device, ROLLOUT)
    return dispatch(
        ROLLOUT, backend, attentions,
        residual=residual, head_fusion=head_fusion, num_prefix_tokens=num_prefix_tokens, full=full,
    )


@_attention_rollout_op.register_fake
def _(attentions, residual, head_fusion, num_prefix_tokens, full):
    batch, _, tokens, _ = attentions[0].shape
    shape = (batch, tokens, tokens) if full else (batch, tokens - num_prefix_tokens)
    return attentions[0].new_empty(shape, dtype=torch.float32)


# --- the op's backends --------------------------------------------------------------------------

# No Triton kernel (see the module docstring), so impl="triton" is refused. Arguments of every
# backend: validated, detached attentions and the keywords residual, head_fusion,
# num_prefix_tokens, full.
ROLLOUT = Op(
    "attention_rollout", torch=_rollout_torch, reference=reference.attention_rollout,
    extension=Extension("attention_rollout_row", ("cpu", "cuda"), _rollout_extension),
    registered=_attention_rollout_op, impls=tuple(impl for impl in IMPLS if impl != "triton"),
)


# --- public function ---------------------------------------------------------------------------


def _check_inputs(attentions, residual, head_fusion, num_prefix_tokens, full) -> None:
    if not isinstance(attentions, (list, tuple)):
        raise TypeError(
            f"attentions must be a list or tuple of (B, heads, N, N) tensors, got {type(attentions).__name__}"
        )
    if len(attentions) == 0:
        raise ValueError("attentions must be a non-empty list of (B, heads, N, N) tensors, got an empty one")
    first = check_tensor("attentions[0]", attentions[0], ndim=4, dtypes=FLOAT_DTYPES)
    for k, attention in enumerate(attentions):
        name = f"attentions[{k}]"
        check_tensor(name, attention, ndim=4, dtypes=FLOAT_DTYPES, device=first.device)
        batch, heads, rows, cols = attention.shape
        if rows != cols or heads < 1 or rows < 1:
            raise ValueError(f"{name} must have shape (B, heads, N, N) with heads, N >= 1, got {tuple(attention.shape)}")
        if attention.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(attention.shape)} but attentions[0] has {tuple(first.shape)}; "
                "all layers must match"
            )
        if attention.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {attention.dtype} but attentions[0] has {first.dtype}; all layers must match")
    check_range("residual", residual, 0.0, 1.0)
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    check_num_prefix_tokens(num_prefix_tokens, first.shape[-1], "each attention")
    if not isinstance(full, bool):
        raise TypeError(f"full must be a bool, got {type(full).__name__}")


def attention_rollout(
    attentions: Sequence[torch.Tensor],
    *,
    residual: float = 0.5,
    head_fusion: str = "mean",
    num_prefix_tokens: int = 1,
    full: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): the class token's attention map through all blocks.

    For each block l = 1 .. L (``attentions[0]`` is block 1), with r = ``residual``:

    1. ``A_l = fusion over heads of attentions[l-1]`` ((B, N, N); fusion = ``head_fusion``:
       "mean", "max" or "min" over the heads dimension);
    2. ``A'_l = (1 - r) * A_l + r * I``, then each row divided by its sum (rows of A'_l sum to 1);
    3. ``rollout = A'_L @ A'_{L-1} @ ... @ A'_1`` ((B, N, N)).

    The class token is token 0. The returned map is row 0 of ``rollout`` restricted to the patch
    columns (index >= ``num_prefix_tokens``) and divided by its sum over those columns, so each
    sample's map sums to 1. With ``full=True`` the whole ``rollout`` is returned instead.

    The map is computed as ``e_0 @ A'_L @ ... @ A'_1``, vector times matrix, in O(L * N^2) work
    with no (B, N, N) intermediate in the compiled kernels; ``full=True`` multiplies matrices,
    O(L * N^3). Values are accumulated in float32 whatever the input dtype. The result carries no
    gradient. Where the definition divides by zero the result is NaN, as the reference's is: a
    fused row summing to 0 with r = 0, or r = 1 (every A'_l = I, so the class row has no patch
    mass) with ``num_prefix_tokens >= 1``.

    Args:
        attentions: L >= 1 tensors (B, heads, N, N) of attention probabilities (softmax rows),
            first block first; all the same shape, dtype (float32, bfloat16 or float16) and device.
        residual: r in [0, 1], the weight of the identity (skip connection); 0.5 in the paper.
        head_fusion: "mean" (the paper), "max" or "min" over heads.
        num_prefix_tokens: class/register/distillation tokens in front of the patches, in [0, N).
        full: return the whole (B, N, N) product instead of the map.
        impl: "auto" (the compiled extension when built for the device, else the PyTorch path
            with a one-time warning), "torch" (vectorised PyTorch vector chain) or "reference"
            (the chained full matrix product, :func:`transmix_kernels.reference.attention_rollout`).
            "triton" is rejected: this op has no Triton kernel.

    Returns:
        (B, N - num_prefix_tokens) float32 map, rows summing to 1; or (B, N, N) float32 with ``full``.

    Example:
        >>> attns = [torch.randn(8, 6, 197, 197).softmax(-1) for _ in range(12)]  # DeiT-S blocks
        >>> amap = attention_rollout(attns)                                        # (8, 196)
        >>> amap.view(8, 14, 14)                                                   # on the patch grid
    """
    _check_inputs(attentions, residual, head_fusion, num_prefix_tokens, full)
    backend = resolve_backend(impl, attentions[0].device, ROLLOUT)
    # A statistic for label weights, not a training signal: no path records a graph.
    attentions = [attention.detach() for attention in attentions]
    return dispatch(
        ROLLOUT, backend, attentions,
        residual=float(residual), head_fusion=head_fusion, num_prefix_tokens=num_prefix_tokens, full=full,
    )
