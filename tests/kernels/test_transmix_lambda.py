"""transmix_lambda / transmix_targets / mix_targets against the reference and timm.

Tolerances. Every path reads the attention in its own dtype and accumulates in float32; the
expected lambda is computed in float64 from the very same (possibly bf16/fp16-rounded) values,
so one bound holds for every input dtype: lam and targets live in [0, 1] and the sums run over
<= 100 tokens, so atol 1e-6 (a few float32 ulps of 1) is tight and cannot be met by a wrong
formula. mix_targets only combines lam with constants, operation for operation as timm's
mixup_target: bitwise.
"""

from __future__ import annotations

import pytest
import torch
from timm.data.mixup import mixup_target

import transmix_kernels as tk
from conftest import assert_close, assert_equal, lambda_fp64
from transmix_kernels import reference
from transmix_kernels._dispatch import TRITON_INTERPRET

IMPLS = ("triton", "torch", "auto")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATOL = 1e-6
# (B, heads or None, gh, gw)
ATTN_SHAPES = {"B7-H3-5x7": (7, 3, 5, 7), "B6-7x11": (6, None, 7, 11)}
RATIOS = (0.5, 0.0, 1.0, 0.3)


def skip_unrunnable(impl: str, device: torch.device) -> None:
    if impl == "triton" and device.type == "cpu" and not TRITON_INTERPRET:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest only without a GPU)")


def make_attention(batch, heads, n_tokens, dtype, device="cpu"):
    """Class-to-patch softmax probabilities, class token dropped (rows sum to < 1), in dtype."""
    logits = torch.randn(batch, heads or 1, n_tokens + 1) * 2
    attn = torch.softmax(logits, -1)[..., 1:]
    return (attn if heads else attn[:, 0]).to(device, dtype)


def make_token_mask(batch, gh, gw, mask_kind, attn_dtype, device="cpu"):
    """Token masks of random boxes (some empty, some full); float32, bool or the attention dtype."""
    height, width = 3 * gh + 1, 2 * gw + 3
    boxes, _ = tk.sample_boxes(torch.rand(batch), height, width)
    boxes[0] = torch.tensor([0, height, 0, width])  # full: all tokens inside
    boxes[1] = torch.tensor([2, 2, 0, width])  # empty
    _, mask = reference.cutmix_paste(torch.randn(batch, 1, height, width), boxes, token_grid=(gh, gw))
    return {"float32": mask, "bool": mask > 0.5, "attn-dtype": mask.to(attn_dtype)}[mask_kind].to(device)


def targets_fp64(target, lam, num_classes, partner, smoothing):
    off = smoothing / num_classes
    y1 = torch.full((target.shape[0], num_classes), off, dtype=torch.float64, device=target.device)
    y1.scatter_(1, target.view(-1, 1), 1 - smoothing + off)
    partner = torch.arange(target.shape[0] - 1, -1, -1, device=target.device) if partner is None else partner
    lam = lam.double().view(-1, 1)
    return lam * y1 + (1 - lam) * y1[partner]


def make_labels(batch, num_classes, device="cpu"):
    target = torch.randint(0, num_classes, (batch,))
    target[0] = target[-1]  # a sample mixed with a partner of its own class
    return target.to(device)


def partners(batch, device):
    repeats = torch.randint(0, batch, (batch,))
    repeats[0] = repeats[1]
    return {"flip": None, "perm": torch.randperm(batch).to(device), "repeats": repeats.to(device)}


@pytest.mark.parametrize("mask_kind", ("float32", "bool", "attn-dtype"))
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", ATTN_SHAPES.values(), ids=ATTN_SHAPES.keys())
@pytest.mark.parametrize("impl", IMPLS)
def test_lambda_matches_fp64_and_reference(seed, device, poison_empty, impl, shape, dtype, mask_kind):
    skip_unrunnable(impl, device)
    batch, heads, gh, gw = shape
    attn = make_attention(batch, heads, gh * gw, dtype, device)
    token_mask = make_token_mask(batch, gh, gw, mask_kind, dtype, device)
    lam_area = torch.rand(batch, dtype=torch.float64 if heads else torch.float32).to(device)
    inputs = [t.clone() for t in (attn, token_mask, lam_area)]
    for ratio in RATIOS:
        lam = tk.transmix_lambda(attn, token_mask, lam_area, ratio=ratio, impl=impl)
        assert lam.dtype == torch.float32 and lam.shape == (batch,)
        assert_close(f"lam vs fp64 (ratio={ratio})", lam, lambda_fp64(attn, token_mask, lam_area, ratio), atol=ATOL)
        want = reference.transmix_lambda(attn, token_mask, lam_area, ratio=ratio)
        assert_close(f"lam vs reference (ratio={ratio})", lam, want, atol=ATOL)
    # The full-box row keeps no attention outside, the empty-box row all of it.
    lam_attn_only = tk.transmix_lambda(attn, token_mask, lam_area, ratio=0.0, impl=impl)
    assert float(lam_attn_only[0]) == 0.0 and abs(float(lam_attn_only[1]) - 1.0) <= ATOL
    for name, before, after in zip(("attn", "token_mask", "lam_area"), inputs, (attn, token_mask, lam_area)):
        assert torch.equal(before, after), f"{name} modified"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 in the interpreter
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("impl", IMPLS)
def test_rows_without_attention_fall_back_to_lam_area(seed, device, poison_empty, impl, dtype):
    skip_unrunnable(impl, device)
    batch, heads, n_tokens = 7, 2, 15
    attn = make_attention(batch, heads, n_tokens, torch.float32)
    attn[0] = 0.0  # no mass
    attn[1, 1, 4] = float("nan")
    attn[2, 0, 0] = float("inf")
    attn[3, 1, 7] = float("-inf")
    attn[4, :, :] = 0.0
    attn[4, 0, 3] = float("nan")  # NaN in an otherwise empty row
    attn = attn.to(device, dtype)
    token_mask = (torch.rand(batch, n_tokens) < 0.5).float().to(device)
    lam_area = torch.rand(batch).to(device)
    for ratio in (0.5, 0.3):
        for attention in (attn, attn[:, 0]):  # (B, heads, N) and (B, N)
            lam = tk.transmix_lambda(attention, token_mask, lam_area, ratio=ratio, impl=impl)
            assert bool(torch.isfinite(lam).all()), lam
            degenerate = [0, 1, 2, 3, 4] if attention.dim() == 3 else [0, 2, 4]
            assert_close(f"fallback rows ({attention.dim()}-D, ratio={ratio})", lam[degenerate], lam_area[degenerate],
                         atol=ATOL)
            assert_close("healthy rows", lam[5:], lambda_fp64(attention, token_mask, lam_area, ratio)[5:], atol=ATOL)
            targets, lam_fused = tk.transmix_targets(attention, token_mask, lam_area, torch.arange(batch, device=device), 9,
                                                     ratio=ratio, impl=impl)
            assert_equal("fused lam", lam_fused, lam)
            assert bool(torch.isfinite(targets).all())


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("impl", IMPLS)
def test_transmix_targets_matches_reference(seed, device, poison_empty, impl, dtype):
    skip_unrunnable(impl, device)
    for (batch, heads, gh, gw), num_classes in zip(ATTN_SHAPES.values(), (37, 1030)):  # 1030: several class tiles
        attn = make_attention(batch, heads, gh * gw, dtype, device)
        token_mask = make_token_mask(batch, gh, gw, "bool" if heads else "float32", dtype, device)
        lam_area = torch.rand(batch).to(device)
        target = make_labels(batch, num_classes, device)
        for pname, partner in partners(batch, device).items():
            for smoothing, ratio in ((0.1, 0.5), (0.0, 0.3)):
                case = f"B{batch} K{num_classes} {pname} s={smoothing} r={ratio}"
                targets, lam = tk.transmix_targets(attn, token_mask, lam_area, target, num_classes, partner=partner,
                                                   ratio=ratio, smoothing=smoothing, impl=impl)
                lam64 = lambda_fp64(attn, token_mask, lam_area, ratio)
                assert_close(f"lam {case}", lam, lam64, atol=ATOL)
                want = targets_fp64(target, lam64, num_classes, partner, smoothing)
                assert_close(f"targets vs fp64 {case}", targets, want, atol=ATOL)
                assert_close(f"row sums {case}", targets.double().sum(1), torch.ones(batch, dtype=torch.float64, device=device),
                             atol=ATOL)
                # Given its own lam, the targets are exactly mix_targets' (the fusion changes nothing).
                assert_equal(f"targets vs reference.mix_targets {case}", targets,
                             reference.mix_targets(target, lam, num_classes, partner=partner, smoothing=smoothing))
                assert_equal(f"lam vs transmix_lambda {case}", lam,
                             tk.transmix_lambda(attn, token_mask, lam_area, ratio=ratio, impl=impl))


@pytest.mark.parametrize("impl", IMPLS)
def test_mix_targets_matches_reference(seed, device, poison_empty, impl):
    skip_unrunnable(impl, device)
    for batch, num_classes in ((7, 37), (6, 1030)):
        target = make_labels(batch, num_classes, device)
        for lam_dtype in (torch.float64, torch.float32):
            lam = torch.rand(batch, dtype=lam_dtype)
            lam[:2] = torch.tensor([0.0, 1.0], dtype=lam_dtype)
            lam = lam.to(device)
            for pname, partner in partners(batch, device).items():
                for smoothing in (0.0, 0.1):
                    case = f"B{batch} K{num_classes} {lam_dtype} {pname} s={smoothing}"
                    out = tk.mix_targets(target, lam, num_classes, partner=partner, smoothing=smoothing, impl=impl)
                    assert out.dtype == torch.float32 and out.shape == (batch, num_classes)
                    want = reference.mix_targets(target, lam, num_classes, partner=partner, smoothing=smoothing)
                    assert_equal(f"mix_targets {case}", out, want)
                    assert_close(f"vs fp64 {case}", out, targets_fp64(target, lam, num_classes, partner, smoothing),
                                 atol=ATOL)


# "torch-ops": impl="torch" with a lam that requires grad, which keeps the CPU path on PyTorch
# operations (it otherwise runs the same float32 operations on NumPy views).
TARGET_PATHS = {impl: (impl, False) for impl in IMPLS} | {"torch-ops": ("torch", True)}


@pytest.mark.parametrize("impl, lam_grad", TARGET_PATHS.values(), ids=TARGET_PATHS.keys())
def test_mix_targets_bitwise_timm(seed, device, poison_empty, impl, lam_grad):
    """timm's mixup_target: a Python-float lam per batch, a (B, 1) float32 tensor per element."""
    skip_unrunnable(impl, device)
    batch, num_classes = 8, 1000
    target = make_labels(batch, num_classes, device)
    for smoothing in (0.0, 0.1):
        for lam_value in (0.6180339887498949, 0.1234567, 1.0, 0.0, float(torch.rand((), dtype=torch.float64))):
            want = mixup_target(target, num_classes, lam_value, smoothing)
            lam = torch.full((batch,), lam_value, dtype=torch.float64, device=device, requires_grad=lam_grad)
            ours = tk.mix_targets(target, lam, num_classes, smoothing=smoothing, impl=impl)
            assert_equal(f"batch lam={lam_value!r} s={smoothing}", ours.detach(), want)
        lam_elem = torch.rand(batch)
        lam_elem[0] = 1.0
        lam_elem = lam_elem.to(device)
        want = mixup_target(target, num_classes, lam_elem.unsqueeze(1), smoothing)
        ours = tk.mix_targets(target, lam_elem.requires_grad_(lam_grad), num_classes, smoothing=smoothing, impl=impl)
        assert_equal(f"elem s={smoothing}", ours.detach(), want)
        assert ours.requires_grad == (lam_grad and impl == "torch")
