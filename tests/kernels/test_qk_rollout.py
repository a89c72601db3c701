"""rollout_from_qk: class-token attention rollout from q and k, no N x N matrix held.

The expected map is reference.rollout_from_qk in float64 on the same input values: full softmax
matrices, explicit row renormalisation, the matrix product A'_L ... A'_1 (not the vector trick).
Every path computes in fp32, so one tight tolerance holds for every input dtype; for bf16/fp16
the tests also check the STYLE rule against plain PyTorch at that precision.
"""

from __future__ import annotations

import re

import pytest
import torch

import transmix_kernels as tk
from conftest import assert_close
from transmix_kernels import reference
from transmix_kernels._dispatch import TRITON_INTERPRET

IMPLS = ("triton", "torch")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Map entries are ~1/N and products of L stochastic matrices: fp32 relative accuracy.
ATOL, RTOL = 1e-8, 5e-6

# (batch, n_tokens, heads, head_dim, blocks, num_prefix_tokens, layout)
SHAPES = {
    "B2-N50-H3-D16-L3-p1-timm": (2, 50, 3, 16, 3, 1, "timm"),
    "B2-N197-H3-D24-L2-p2-timm": (2, 197, 3, 24, 2, 2, "timm"),
    "B3-N17-H1-D16-L1-p1-contig": (3, 17, 1, 16, 1, 1, "contiguous"),
    "B1-N70-H2-D24-L4-p1-dstride": (1, 70, 2, 24, 4, 1, "d-strided"),
}


def skip_unrunnable(impl: str, device: torch.device) -> None:
    """Triton on CPU tensors runs only under the interpreter (conftest sets it when there is no GPU)."""
    if impl == "triton" and device.type == "cpu" and not TRITON_INTERPRET:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest only without a GPU)")

def make_blocks(batch, n_tokens, heads, head_dim, blocks, layout, dtype=torch.float32, device="cpu"):
    queries, keys = [], []
    for _ in range(blocks):
        if layout == "timm":
            qkv = torch.randn(batch, n_tokens, 3, heads, head_dim, device=device).to(dtype).permute(2, 0, 3, 1, 4)
            q, k, _ = qkv.unbind(0)
        elif layout == "contiguous":
            q, k = (torch.randn(batch, heads, n_tokens, head_dim, device=device).to(dtype) for _ in range(2))
        else:  # feature dimension not unit-stride
            q, k = (torch.randn(batch, heads, head_dim, n_tokens, device=device).to(dtype).transpose(-1, -2)
                    for _ in range(2))
        queries.append(q)
        keys.append(k)
    return queries, keys


def rollout_fp64(queries, keys, scale, residual=0.5, prefix=1, attn_bias=None):
    bias = None if attn_bias is None else [None if b is None else b.double() for b in attn_bias]
    return reference.rollout_from_qk(
        [q.double() for q in queries], [k.double() for k in keys],
        scale=scale, residual=residual, num_prefix_tokens=prefix, attn_bias=bias,
    ).double()


def plain_lowp_rollout(queries, keys, scale, prefix):
    """The naive rollout written in the input precision (what a user would run in bf16/fp16)."""
    v = None
    for q, k in reversed(list(zip(queries, keys))):
        a = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, -1).mean(1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype)
        a = a / a.sum(-1, keepdim=True)
        v = a[:, 0] if v is None else torch.einsum("bi,bij->bj", v, a)
    row = v[:, prefix:]
    return row / row.sum(-1, keepdim=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_matrix_product_rollout(seed, device, poison_empty, impl, dtype, shape):
    skip_unrunnable(impl, device)
    batch, n_tokens, heads, head_dim, blocks, prefix, layout = shape
    queries, keys = make_blocks(batch, n_tokens, heads, head_dim, blocks, layout, dtype, device)
    scale = head_dim ** -0.5
    out = tk.rollout_from_qk(queries, keys, scale=scale, num_prefix_tokens=prefix, impl=impl)
    assert out.dtype == torch.float32 and out.shape == (batch, n_tokens - prefix)
    expected = rollout_fp64(queries, keys, scale, prefix=prefix)
    assert_close("rollout", out, expected, atol=ATOL, rtol=RTOL)
    assert_close("rollout row sums", out.sum(-1), torch.ones(batch), atol=2e-6)
    if dtype != torch.float32 and device.type == "cpu":
        plain = plain_lowp_rollout(queries, keys, scale, prefix).double()
        plain_err = ((plain - expected) / expected).abs().max()
        ours_err = ((out.double() - expected) / expected).abs().max()
        assert ours_err <= 2 * plain_err, f"relative error {ours_err:.3g} vs plain {dtype} PyTorch {plain_err:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("residual", [0.0, 0.25, 0.9])
def test_residual_weights(seed, device, impl, residual):
    skip_unrunnable(impl, device)
    queries, keys = make_blocks(2, 33, 3, 16, 3, "timm", device=device)
    out = tk.rollout_from_qk(queries, keys, scale=0.25, residual=residual, impl=impl)
    assert_close("rollout", out, rollout_fp64(queries, keys, 0.25, residual), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_block_is_class_attention_row(seed, device, impl):
    """One block: v = e_0 A' = (1 - r) a_0 + r e_0, whose patch part renormalised is the class row."""
    skip_unrunnable(impl, device)
    queries, keys = make_blocks(2, 45, 3, 24, 1, "timm", device=device)
    out = tk.rollout_from_qk(queries, keys, scale=0.2, residual=0.5, num_prefix_tokens=1, impl=impl)
    row = tk.class_attention_row(queries[0][:, :, 0], keys[0], scale=0.2, impl="torch")
    assert_close("rollout vs class row", out, row, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_bias(seed, device, impl):
    skip_unrunnable(impl, device)
    batch, n_tokens, heads = 2, 40, 3
    queries, keys = make_blocks(batch, n_tokens, heads, 16, 3, "timm", device=device)
    bias = [
        torch.randn(heads, n_tokens, n_tokens, device=device),  # relative-position style, shared by samples
        None,
        torch.randn(batch, 1, n_tokens, n_tokens, device=device).to(torch.bfloat16),
    ]
    out = tk.rollout_from_qk(queries, keys, scale=0.25, attn_bias=bias, impl=impl)
    assert_close("rollout", out, rollout_fp64(queries, keys, 0.25, attn_bias=bias), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_huge_logits_are_stable(seed, device, impl):
    """Integer q and k: logits in the thousands, exact in fp32, so the fp64 comparison stays tight."""
    skip_unrunnable(impl, device)
    queries = [torch.randint(-30, 31, (2, 3, 40, 16), device=device).float() for _ in range(2)]
    keys = [torch.randint(-30, 31, (2, 3, 40, 16), device=device).float() for _ in range(2)]
    out = tk.rollout_from_qk(queries, keys, scale=0.125, impl=impl)
    assert torch.isfinite(out).all()
    assert_close("rollout", out, rollout_fp64(queries, keys, 0.125), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("impl", IMPLS + ("reference", "auto"))
def test_matches_attention_rollout_extension(seed, device, impl):
    skip_unrunnable(impl, device)
    attention_rollout = getattr(tk, "attention_rollout", None)
    if attention_rollout is None:
        pytest.skip("tk.attention_rollout (the C++ extension op) is not available in this build")
    queries, keys = make_blocks(2, 50, 3, 16, 3, "timm", device=device)
    attentions = [torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * 0.25, -1) for q, k in zip(queries, keys)]
    expected = attention_rollout(attentions, residual=0.5, head_fusion="mean", num_prefix_tokens=1)
    out = tk.rollout_from_qk(queries, keys, scale=0.25, residual=0.5, num_prefix_tokens=1, impl=impl)
    assert_close("rollout vs attention_rollout", out, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_inputs_untouched_and_grad_free(seed, device, impl):
    skip_unrunnable(impl, device)
    queries, keys = make_blocks(2, 20, 3, 16, 2, "contiguous", device=device)
    queries = [q.requires_grad_(True) for q in queries]
    before = [t.detach().clone() for t in queries + keys]
    out = tk.rollout_from_qk(queries, keys, scale=0.25, impl=impl)
    assert not out.requires_grad
    for i, (old, new) in enumerate(zip(before, queries + keys)):
        assert torch.equal(old, new.detach()), f"input {i} was modified"


def test_auto_is_a_traceable_op(seed):
    queries, keys = make_blocks(2, 20, 3, 16, 2, "timm")

    def fn(q0, q1, k0, k1):
        return tk.rollout_from_qk([q0, q1], [k0, k1], scale=0.25)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    assert_close("compiled", compiled(*queries, *keys), fn(*queries, *keys), atol=0)


def _good_args():
    queries, keys = make_blocks(2, 10, 3, 16, 2, "contiguous")
    return dict(queries=queries, keys=keys, scale=0.25)


BAD_INPUTS = {
    "queries-tensor": (dict(queries=torch.randn(2, 3, 10, 16)), TypeError, "queries must be a list"),
    "empty": (dict(queries=[], keys=[]), ValueError, "queries and keys must be non-empty lists of the same length"),
    "length-mismatch": (dict(keys=[torch.randn(2, 3, 10, 16)]), ValueError, "got 2 queries and 1 keys"),
    "key-3d": (dict(keys=[torch.randn(2, 3, 10, 16), torch.randn(3, 10, 16)]), ValueError, "keys[1] must have 4 dimensions"),
    "key-dtype": (
        dict(keys=[torch.randn(2, 3, 10, 16), torch.randn(2, 3, 10, 16).half()]),
        TypeError, "keys[1] must have dtype in (float32)",
    ),
    "key-shape": (
        dict(keys=[torch.randn(2, 3, 10, 16), torch.randn(2, 3, 10, 8)]),
        ValueError, "keys[1] must have the shape of queries[1]",
    ),
    "tokens-differ": (
        dict(queries=[torch.randn(2, 3, 10, 16), torch.randn(2, 3, 11, 16)],
             keys=[torch.randn(2, 3, 10, 16), torch.randn(2, 3, 11, 16)]),
        ValueError, "queries[1] must have batch 2 and 10 tokens",
    ),
    "query-int": (dict(queries=[torch.ones(2, 3, 10, 16, dtype=torch.int32)] * 2), TypeError, "queries[0] must have dtype"),
    "bias-tensor": (dict(attn_bias=torch.zeros(10, 10)), TypeError, "attn_bias must be None or a list"),
    "bias-length": (dict(attn_bias=[None]), ValueError, "attn_bias must have one entry per block (2), got 1"),
    "bias-shape": (dict(attn_bias=[None, torch.zeros(3, 10, 9)]), ValueError, "attn_bias[1] must broadcast to (B, heads, N, N)"),
    "bias-int": (dict(attn_bias=[torch.zeros(10, 10, dtype=torch.int64), None]), TypeError, "attn_bias[0] must have dtype"),
    "scale-inf": (dict(scale=float("inf")), ValueError, "scale must be a positive finite number"),
    "residual-range": (dict(residual=-0.1), ValueError, "residual must be in [0.0, 1.0]"),
    "prefix-all": (dict(num_prefix_tokens=10), ValueError, "num_prefix_tokens must be in [0, N) = [0, 10)"),
    "prefix-float": (dict(num_prefix_tokens=1.5), TypeError, "num_prefix_tokens must be an int"),
    "impl-unknown": (dict(impl="numpy"), ValueError, "impl must be one of"),
}


@pytest.mark.parametrize("change,error,message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise_before_work(change, error, message):
    args = _good_args()
    args.update(change)
    with pytest.raises(error, match=re.escape(message)):
        tk.rollout_from_qk(**args)
