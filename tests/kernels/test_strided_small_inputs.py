"""Boxes, partner, lam and target given as non-contiguous views give the same results on every
backend (the Triton kernels index them as dense vectors, so the launchers must densify them)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, assert_equal, device_for

import transmix_kernels as tk
from transmix_kernels import reference
from transmix_kernels._dispatch import TRITON_INTERPRET

IMPLS = ["triton", "torch", "auto"]


def _skip(impl: str) -> torch.device:
    device = device_for(impl)
    if impl == "triton" and device.type == "cpu" and not TRITON_INTERPRET:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    return device


def _column(values: torch.Tensor, width: int = 3, at: int = 1) -> torch.Tensor:
    """The same values as a strided column view of a wider tensor."""
    wide = torch.zeros((values.shape[0], width) + values.shape[1:], dtype=values.dtype, device=values.device)
    wide[:, at] = values
    return wide[:, at]


@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
@pytest.mark.parametrize("impl", IMPLS)
def test_paste_with_strided_boxes_and_partner(seed, impl, inplace):
    device = _skip(impl)
    batch, height, width = 5, 11, 23  # W > H: a mis-read coordinate would run off the image
    x = torch.randn(batch, 3, height, width, device=device)
    boxes = torch.tensor([[1, 9, 2, 20], [0, 11, 0, 23], [3, 3, 5, 9], [4, 10, 11, 22], [0, 5, 0, 7]], device=device)
    partner = torch.tensor([3, 0, 4, 1, 2], device=device)
    want, want_mask = reference.cutmix_paste(x, boxes, partner, token_grid=(3, 5))
    strided_boxes = boxes.t().contiguous().t()  # same values, strides (1, B)
    assert not strided_boxes.is_contiguous()
    got, mask = tk.cutmix_paste(x.clone(), strided_boxes, _column(partner), token_grid=(3, 5), inplace=inplace, impl=impl)
    assert_equal("mixed", got, want)
    assert_equal("token_mask", mask, want_mask)
    one_box = torch.tensor([1, 0, 9, 0, 2, 0, 20, 0], device=device)[::2]  # a (4,) view with stride 2
    got, _ = tk.cutmix_paste(x.clone(), one_box, token_grid=(3, 5), inplace=inplace, impl=impl)
    assert_equal("mixed (one strided box)", got, reference.cutmix_paste(x, one_box.contiguous())[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_lambda_and_targets_with_strided_vectors(seed, impl):
    device = _skip(impl)
    batch, heads, tokens, classes = 6, 2, 15, 9
    attn = torch.rand(batch, heads, tokens, device=device).softmax(-1)
    token_mask = (torch.rand(batch, tokens, device=device) > 0.5).float()
    lam_area = torch.rand(batch, device=device)
    target = torch.randint(0, classes, (batch,), device=device)
    partner = torch.randperm(batch, device=device)
    lam = tk.transmix_lambda(attn, token_mask, _column(lam_area), impl=impl)
    assert_close("lam", lam, reference.transmix_lambda(attn, token_mask, lam_area), atol=1e-6)
    got = tk.mix_targets(_column(target), _column(lam_area), classes, partner=_column(partner), impl=impl)
    assert_equal("targets", got, reference.mix_targets(target, lam_area, classes, partner=partner))
    fused, fused_lam = tk.transmix_targets(attn, token_mask, _column(lam_area), _column(target), classes,
                                           partner=_column(partner), impl=impl)
    assert_close("fused lam", fused_lam, lam, atol=1e-6)
    assert_close("fused targets", fused, reference.mix_targets(target, lam, classes, partner=partner), atol=1e-6)
