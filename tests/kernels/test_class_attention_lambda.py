"""class_attention_lambda / class_attention_row: the class row recomputed from q and k.

Expected values come from materialising softmax(q k^T * scale) in float64 from the very same
(possibly bf16/fp16) input values, then the lambda formula, still in float64. All our paths compute in fp32
whatever the input dtype, so one tight tolerance holds for every dtype; for bf16/fp16 inputs the
tests also check the STYLE rule (error at most 2x what plain PyTorch makes at that precision).
"""

from __future__ import annotations

import re

import pytest
import torch

import transmix_kernels as tk
from conftest import assert_close, lambda_fp64
from transmix_kernels import reference
from transmix_kernels._dispatch import TRITON_INTERPRET

IMPLS = ("triton", "torch")
# Lambda and probabilities live in [0, 1]; fp32 arithmetic over <= 200 tokens stays well inside.
ATOL = 1e-6
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (batch, n_total, heads, head_dim, num_prefix_tokens, layout)
SHAPES = {
    "B3-N50-H3-D16-p1-timm": (3, 50, 3, 16, 1, "timm"),
    "B2-N197-H3-D24-p2-timm": (2, 197, 3, 24, 2, "timm"),
    "B2-N197-H3-D24-p1-contig": (2, 197, 3, 24, 1, "contiguous"),
    "B1-N17-H1-D16-p1-dstride": (1, 17, 1, 16, 1, "d-strided"),
}


def skip_unrunnable(impl: str, device: torch.device) -> None:
    """Triton on CPU tensors runs only under the interpreter (conftest sets it when there is no GPU)."""
    if impl == "triton" and device.type == "cpu" and not TRITON_INTERPRET:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest only without a GPU)")

def make_qk(batch, n_total, heads, head_dim, layout, dtype=torch.float32, device="cpu"):
    """q_cls (B, heads, D) and k (B, heads, N, D) laid out as timm leaves them (or otherwise)."""
    if layout == "timm":  # views into the qkv projection output, as timm.layers.Attention makes them
        qkv = torch.randn(batch, n_total, 3, heads, head_dim, device=device).to(dtype).permute(2, 0, 3, 1, 4)
        q, k, _ = qkv.unbind(0)
        return q[:, :, 0], k
    if layout == "contiguous":
        return (torch.randn(batch, heads, head_dim, device=device).to(dtype),
                torch.randn(batch, heads, n_total, head_dim, device=device).to(dtype))
    # Feature dimension not unit-stride: k stored (B, heads, D, N) and transposed.
    k = torch.randn(batch, heads, head_dim, n_total, device=device).to(dtype).transpose(-1, -2)
    q = torch.randn(batch, head_dim, heads, device=device).to(dtype).transpose(1, 2)
    return q, k


def make_mask_lam(batch, patches, device="cpu"):
    token_mask = (torch.rand(batch, patches, device=device) < 0.4).float()
    return token_mask, torch.rand(batch, device=device) * 0.8 + 0.1


def probs_fp64(q_cls, k, scale, prefix):
    logits = torch.einsum("bhd,bhnd->bhn", q_cls.double(), k.double()) * scale
    return torch.softmax(logits, -1)[..., prefix:]


def class_lambda_fp64(q_cls, k, token_mask, lam_area, scale, prefix, ratio=0.5):
    """lam in float64 end to end (reference.transmix_lambda would round to float32)."""
    return lambda_fp64(probs_fp64(q_cls, k, scale, prefix), token_mask, lam_area, ratio)


def row_fp64(q_cls, k, scale, prefix):
    a = probs_fp64(q_cls, k, scale, prefix).mean(1)
    return a / a.sum(-1, keepdim=True)


def plain_lowp_lambda(q_cls, k, token_mask, lam_area, scale, prefix):
    """What a user writes in the input precision: logits and softmax in bf16/fp16."""
    logits = torch.matmul(q_cls.unsqueeze(2), k.transpose(-1, -2)).squeeze(2) * scale
    return reference.transmix_lambda(torch.softmax(logits, -1)[..., prefix:], token_mask, lam_area)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_lambda_matches_materialised_softmax(seed, device, poison_empty, impl, dtype, shape):
    skip_unrunnable(impl, device)
    batch, n_total, heads, head_dim, prefix, layout = shape
    q_cls, k = make_qk(batch, n_total, heads, head_dim, layout, dtype, device)
    token_mask, lam_area = make_mask_lam(batch, n_total - prefix, device)
    scale = head_dim ** -0.5
    lam = tk.class_attention_lambda(q_cls, k, token_mask, lam_area, scale=scale, num_prefix_tokens=prefix, impl=impl)
    assert lam.dtype == torch.float32 and lam.shape == (batch,)
    expected = class_lambda_fp64(q_cls, k, token_mask, lam_area, scale, prefix)
    assert_close("lam", lam, expected, atol=ATOL)
    if dtype != torch.float32:
        plain_err = (plain_lowp_lambda(q_cls, k, token_mask, lam_area, scale, prefix).double() - expected.double()).abs().max()
        ours_err = (lam.double() - expected.double()).abs().max()
        assert ours_err <= 2 * plain_err, f"error {ours_err:.3g} vs plain {dtype} PyTorch {plain_err:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_row_matches_materialised_softmax(seed, device, poison_empty, impl, dtype, shape):
    skip_unrunnable(impl, device)
    batch, n_total, heads, head_dim, prefix, layout = shape
    q_cls, k = make_qk(batch, n_total, heads, head_dim, layout, dtype, device)
    scale = head_dim ** -0.5
    row = tk.class_attention_row(q_cls, k, scale=scale, num_prefix_tokens=prefix, impl=impl)
    assert row.dtype == torch.float32 and row.shape == (batch, n_total - prefix)
    # Entries are ~1/N; relative accuracy of fp32 softmax.
    assert_close("row", row, row_fp64(q_cls, k, scale, prefix), atol=1e-8, rtol=2e-6)
    assert_close("row sums", row.sum(-1), torch.ones(batch), atol=2e-6)


@pytest.mark.parametrize("impl", IMPLS + ("reference", "auto"))
def test_all_impls_agree_with_transmix_lambda(seed, device, impl):
    """Parity with the lead's op on the materialised attention (what the fused kernel replaces)."""
    skip_unrunnable(impl, device)
    q_cls, k = make_qk(4, 65, 3, 16, "timm", device=device)
    token_mask, lam_area = make_mask_lam(4, 64, device)
    attn = torch.softmax(torch.einsum("bhd,bhnd->bhn", q_cls, k) * 0.25, -1)[..., 1:]
    expected = tk.transmix_lambda(attn, token_mask, lam_area, ratio=0.3, impl="torch")
    lam = tk.class_attention_lambda(q_cls, k, token_mask, lam_area, scale=0.25, ratio=0.3, impl=impl)
    assert_close("lam", lam, expected, atol=ATOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_kind", ["empty", "full", "bool"])
def test_empty_full_and_bool_masks(seed, device, impl, mask_kind):
    skip_unrunnable(impl, device)
    batch, n_total, ratio = 3, 50, 0.5
    q_cls, k = make_qk(batch, n_total, 3, 16, "timm", device=device)
    lam_area = torch.rand(batch, device=device)
    if mask_kind == "bool":
        token_mask = torch.rand(batch, n_total - 1, device=device) < 0.5
        expected = class_lambda_fp64(q_cls, k, token_mask.float(), lam_area, 0.25, 1, ratio)
    else:
        token_mask = torch.full((batch, n_total - 1), 0.0 if mask_kind == "empty" else 1.0, device=device)
        lam_attn = 1.0 if mask_kind == "empty" else 0.0  # every patch outside / inside the box
        expected = ratio * lam_area + (1 - ratio) * lam_attn
    lam = tk.class_attention_lambda(q_cls, k, token_mask, lam_area, scale=0.25, ratio=ratio, impl=impl)
    assert_close("lam", lam, expected, atol=ATOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_huge_logits_are_stable(seed, device, impl):
    """Logits in the thousands: exp would overflow without the running max. Integer q and k make
    the logits exact in fp32, so the fp64 comparison stays tight."""
    skip_unrunnable(impl, device)
    batch, n_total, heads, head_dim = 3, 50, 3, 16
    q_cls = torch.randint(-40, 41, (batch, heads, head_dim), device=device).float()
    k = torch.randint(-40, 41, (batch, heads, n_total, head_dim), device=device).float()
    token_mask, lam_area = make_mask_lam(batch, n_total - 1, device)
    scale = 0.125  # logits up to 3200, gaps of 0.125 or more
    lam = tk.class_attention_lambda(q_cls, k, token_mask, lam_area, scale=scale, impl=impl)
    assert_close("lam", lam, class_lambda_fp64(q_cls, k, token_mask, lam_area, scale, 1), atol=ATOL)
    row = tk.class_attention_row(q_cls, k, scale=scale, impl=impl)
    assert_close("row", row, row_fp64(q_cls, k, scale, 1), atol=1e-7, rtol=2e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_fallback_to_area_when_patch_mass_vanishes_or_is_nan(seed, device, impl):
    skip_unrunnable(impl, device)
    batch, n_total, heads, head_dim = 3, 30, 2, 16
    q_cls, k = make_qk(batch, n_total, heads, head_dim, "contiguous", device=device)
    k = k.clone()
    # Sample 0: the class token's key aligned with its query at a huge norm: exp(-thousands)
    # underflows, the patch mass is exactly 0 (as in the materialised fp64 softmax).
    k[0, :, 0] = q_cls[0] * 1e4
    k[1, 1, 7, 3] = float("nan")  # sample 1: a NaN key poisons its row
    token_mask, lam_area = make_mask_lam(batch, n_total - 1, device)
    lam = tk.class_attention_lambda(q_cls, k, token_mask, lam_area, scale=0.25, ratio=0.5, impl=impl)
    expected = class_lambda_fp64(q_cls, k, token_mask, lam_area, 0.25, 1)
    assert_close("lam[:2] (area fallback)", lam[:2], lam_area[:2], atol=0)
    assert_close("lam", lam, expected, atol=ATOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_inputs_untouched_and_grad_free(seed, device, impl):
    skip_unrunnable(impl, device)
    q_cls, k = make_qk(2, 33, 3, 16, "timm", device=device)
    k.requires_grad_(False)
    q_cls = q_cls.clone().requires_grad_(True)
    token_mask, lam_area = make_mask_lam(2, 32, device)
    before = [t.detach().clone() for t in (q_cls, k, token_mask, lam_area)]
    lam = tk.class_attention_lambda(q_cls, k, token_mask, lam_area, scale=0.25, impl=impl)
    row = tk.class_attention_row(q_cls, k, scale=0.25, impl=impl)
    assert not lam.requires_grad and not row.requires_grad
    for name, old, new in zip(("q_cls", "k", "token_mask", "lam_area"), before, (q_cls, k, token_mask, lam_area)):
        assert torch.equal(old, new.detach()), f"{name} was modified"


def test_auto_is_a_traceable_op(seed):
    q_cls, k = make_qk(2, 20, 3, 16, "timm")
    token_mask, lam_area = make_mask_lam(2, 19)

    def step(q_cls, k, token_mask, lam_area):
        lam = tk.class_attention_lambda(q_cls, k, token_mask, lam_area, scale=0.25)
        return lam, tk.class_attention_row(q_cls, k, scale=0.25)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(q_cls, k, token_mask, lam_area), step(q_cls, k, token_mask, lam_area)):
        assert_close("compiled", got, want, atol=0)


def _good_args():
    q_cls, k = make_qk(2, 10, 3, 16, "contiguous")
    token_mask, lam_area = make_mask_lam(2, 9)
    return dict(q_cls=q_cls, k=k, token_mask=token_mask, lam_area=lam_area, scale=0.25)


BAD_INPUTS = {
    "k-not-tensor": (dict(k=[[1.0]]), TypeError, "k must be a torch.Tensor"),
    "k-3d": (dict(k=torch.randn(2, 3, 10)), ValueError, "k must have 4 dimensions"),
    "k-int": (dict(k=torch.ones(2, 3, 10, 16, dtype=torch.int64)), TypeError, "k must have dtype"),
    "q-dtype-mismatch": (dict(q_cls=torch.randn(2, 3, 16).double()), TypeError, "q_cls must have dtype in (float32)"),
    "q-wrong-heads": (dict(q_cls=torch.randn(2, 4, 16)), ValueError, "q_cls must have shape (B, heads, D)"),
    "mask-wrong-tokens": (dict(token_mask=torch.ones(2, 10)), ValueError, "token_mask must have shape"),
    "mask-wrong-batch": (dict(token_mask=torch.ones(3, 9)), ValueError, "token_mask must have batch size 2"),
    "mask-int": (dict(token_mask=torch.ones(2, 9, dtype=torch.int32)), TypeError, "token_mask must have dtype"),
    "lam-2d": (dict(lam_area=torch.rand(2, 1)), ValueError, "lam_area must have 1 dimensions"),
    "lam-batch": (dict(lam_area=torch.rand(5)), ValueError, "lam_area must have batch size 2"),
    "scale-zero": (dict(scale=0.0), ValueError, "scale must be a positive finite number"),
    "scale-nan": (dict(scale=float("nan")), ValueError, "scale must be a positive finite number"),
    "prefix-all": (dict(num_prefix_tokens=10, token_mask=torch.ones(2, 0)), ValueError, "num_prefix_tokens must be in [0, N) = [0, 10)"),
    "prefix-float": (dict(num_prefix_tokens=1.0), TypeError, "num_prefix_tokens must be an int"),
    "ratio-range": (dict(ratio=1.5), ValueError, "ratio must be in [0.0, 1.0]"),
    "impl-unknown": (dict(impl="cuda"), ValueError, "impl must be one of"),
}


@pytest.mark.parametrize("change,error,message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise_before_work(change, error, message):
    args = _good_args()
    args.update(change)
    before = {name: value.clone() for name, value in args.items() if isinstance(value, torch.Tensor)}
    with pytest.raises(error, match=re.escape(message)):
        tk.class_attention_lambda(**args)
    for name, value in before.items():
        assert torch.equal(value, args[name]), f"{name} was modified by a failing call"


@pytest.mark.parametrize("change,error,message", [
    (dict(k=torch.randn(2, 3, 10)), ValueError, "k must have 4 dimensions"),
    (dict(q_cls=torch.randn(2, 3, 8)), ValueError, "q_cls must have shape (B, heads, D)"),
    (dict(num_prefix_tokens=-1), ValueError, "num_prefix_tokens must be in [0, N) = [0, 10)"),
    (dict(scale=-1.0), ValueError, "scale must be a positive finite number"),
], ids=["k-3d", "q-wrong-dim", "prefix-negative", "scale-negative"])
def test_row_bad_inputs(change, error, message):
    args = {name: value for name, value in _good_args().items() if name in ("q_cls", "k", "scale")}
    args.update(change)
    with pytest.raises(error, match=re.escape(message)):
        tk.class_attention_row(**args)
