"""torch.compile(fullgraph=True) traces a training step that calls the mixing ops (impl="auto",
the torch.library ops) and gives the eager result, for new box values too (no specialisation on
data), with the data-dependent input checks kept as run-time asserts."""

from __future__ import annotations

import pytest
import torch

import transmix_kernels as tk
from conftest import assert_equal

B, C, H, W, K, GRID = 5, 3, 13, 17, 11, (3, 4)


def make_inputs(device):
    lam = torch.rand(B, dtype=torch.float64)
    boxes, lam_area = tk.sample_boxes(lam, H, W)
    return {name: value.to(device) for name, value in {
        "images": torch.randn(B, C, H, W),
        "boxes": boxes,
        "partner": torch.randperm(B),
        "target": torch.randint(0, K, (B,)),
        "attn": torch.softmax(torch.randn(B, 2, GRID[0] * GRID[1]), -1),
        "lam_area": lam_area,
        "lam": lam,
    }.items()}


def step(images, boxes, partner, target, attn, lam_area, lam):
    mixed, token_mask = tk.cutmix_paste(images, boxes, partner, token_grid=GRID)
    targets, lam_t = tk.transmix_targets(attn, token_mask, lam_area, target, K, partner=partner)
    area_targets = tk.mix_targets(target, lam, K, partner=partner)
    return mixed * 2, token_mask, targets, lam_t, area_targets


def step_inplace(images, boxes, partner, target, attn, lam_area, lam):
    mixed, token_mask = tk.cutmix_paste(images, boxes[0], partner, token_grid=GRID, inplace=True)
    targets, _ = tk.transmix_targets(attn, token_mask, lam_area, target, K, smoothing=0.0)
    return mixed.sum((1, 2, 3)), targets, tk.mix_targets(target, lam, K)


def check_against_eager(fn, compiled, inputs):
    eager_in = {k: v.clone() for k, v in inputs.items()}
    compiled_in = {k: v.clone() for k, v in inputs.items()}
    want = fn(**eager_in)
    got = compiled(**compiled_in)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_equal(f"output {i}", g, w)
    assert_equal("images after the step", compiled_in["images"], eager_in["images"])


@pytest.mark.parametrize("fn", (step, step_inplace), ids=("out-of-place", "inplace"))
def test_fullgraph_aot_eager(seed, device, fn):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    check_against_eager(fn, compiled, make_inputs(device))
    # New random boxes and partners: the same graph, no data specialisation.
    with torch._dynamo.config.patch(error_on_recompile=True):
        check_against_eager(fn, compiled, make_inputs(device))
    bad = make_inputs(device)
    bad["partner"][1] = B  # out of range: the graph's run-time assert fires before the gather
    images = bad["images"].clone()
    with pytest.raises(RuntimeError):
        compiled(**bad)
    if fn is step_inplace:
        assert_equal("images untouched by the failed call", bad["images"], images)


def test_default_inductor(seed, device):
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    check_against_eager(step, compiled, make_inputs(device))


MASK_H, MASK_W, CELLS, TOKENS = 12, 18, (3, 3), (6, 9)  # 4x6-pixel cells of 2x3 tokens


def mask_step(images, mask, partner):
    mixed, token_mask = tk.mask_paste(images, mask, partner, token_grid=TOKENS)
    _, token_mask_in = tk.mask_paste(images, mask, partner, token_grid=TOKENS, inplace=True)
    return mixed * 2, token_mask, token_mask_in


def mask_inputs(device):
    return {"images": torch.randn(B, C, MASK_H, MASK_W).to(device),
            "mask": (torch.rand(B, *CELLS) < 0.5).float().to(device), "partner": torch.randperm(B).to(device)}


def test_mask_paste_fullgraph_aot_eager(seed, device):
    """mask_paste out of place and in place in one graph; new masks and partners reuse it, and a
    mask value other than 0/1 fails the graph's run-time assert before any pixel moves."""
    torch._dynamo.reset()
    compiled = torch.compile(mask_step, fullgraph=True, backend="aot_eager")
    check_against_eager(mask_step, compiled, mask_inputs(device))
    with torch._dynamo.config.patch(error_on_recompile=True):
        check_against_eager(mask_step, compiled, mask_inputs(device))
    bad = mask_inputs(device)
    bad["mask"][2, 1, 0] = 0.5
    images = bad["images"].clone()
    with pytest.raises(RuntimeError):
        compiled(**bad)
    assert_equal("images untouched by the failed call", bad["images"], images)
