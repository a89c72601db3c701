"""Full CutMix/TransMix mixing step vs the unfused reference, timm's Mixup and torchvision's CutMix.

A step = draw lam and boxes, paste (in place where the provider does so), make soft targets.
Cases: per-sample boxes (timm mode "elem") and one box per batch (timm mode "batch"), each at
256x3x32x32 and 64x3x224x224, on CPU, and on CUDA when present (BENCH_DEVICES). Every provider gets a
fresh copy of the same batch each round (the copy is outside the timing).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.data import Mixup
from torchvision.transforms import v2

import transmix_kernels as tk
from transmix_kernels import reference

from conftest import bench_devices, sync

NUM_CLASSES = 1000
CASES = [
    pytest.param((256, 3, 32, 32), "elem", id="elem-256x3x32x32"),
    pytest.param((256, 3, 32, 32), "batch", id="batch-256x3x32x32"),
    pytest.param((64, 3, 224, 224), "elem", id="elem-64x3x224x224"),
    pytest.param((64, 3, 224, 224), "batch", id="batch-64x3x224x224"),
]
DEVICES = bench_devices()


def _batch(shape, device):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(shape, generator=gen).to(device)
    target = torch.randint(0, NUM_CLASSES, (shape[0],), generator=gen).to(device)
    return images, target


def _reference_step(mode):
    """Official-style: full flipped copy, full pixel mask + nearest resize, separate sums."""
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)

    def step(images, target):
        batch, _, height, width = images.shape
        lam = torch.from_numpy(rng.beta(1.0, 1.0, size=1 if mode == "batch" else batch))
        boxes, lam_area = reference.sample_boxes(lam, height, width, generator=generator)
        if mode == "batch":  # one box and one lam for the whole batch
            boxes, lam_area = boxes[0], lam_area.expand(batch)
        boxes = boxes.to(images.device)
        reference.cutmix_paste(images, boxes, token_grid=(height // 16 or 1, width // 16 or 1), inplace=True)
        return reference.mix_targets(target, lam_area.to(images.device), NUM_CLASSES)

    return step


def _transmix_step(mode, impl):
    transmix = tk.TransMix(NUM_CLASSES, mixup_alpha=0.0, cutmix_alpha=1.0, mode=mode, seed=0, impl=impl)

    def step(images, target):
        images, mix = transmix(images, target)
        return mix.targets()

    return step


def _providers(mode):
    timm_mixup = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, mode=mode, num_classes=NUM_CLASSES, label_smoothing=0.1)
    tv_cutmix = v2.CutMix(num_classes=NUM_CLASSES, alpha=1.0)

    providers = {
        # impl="auto": on CPU the compiled paste of the extension when built, else the torch path.
        "transmix": _transmix_step(mode, "auto"),
        "transmix-torch-path": _transmix_step(mode, "torch"),
        "reference": _reference_step(mode),
        "timm": lambda images, target: timm_mixup(images, target),
    }
    # torchvision draws one box per batch (no per-sample mode) and has no label smoothing: the
    # same call in both cases, for reference.
    providers["torchvision"] = lambda images, target: tv_cutmix(images, target)
    return providers


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, mode", CASES)
@pytest.mark.parametrize("provider", ["transmix", "transmix-torch-path", "reference", "timm", "torchvision"])
def test_cutmix_step(benchmark, record, provider, shape, mode, device):
    providers = _providers(mode)
    if provider not in providers:
        pytest.skip(f"{provider} has no {mode} mode")
    step = providers[provider]
    images, target = _batch(shape, torch.device(device))
    record(f"cutmix-step {mode} {'x'.join(map(str, shape))} {device}", provider)

    def run(batch, labels):
        out = step(batch, labels)
        sync(batch.device)
        return out

    benchmark.pedantic(run, setup=lambda: ((images.clone(), target), {}), rounds=30, warmup_rounds=3)


ATTN_CASES = [
    pytest.param((256, 3, 64), id="B256-h3-N64"),
    pytest.param((64, 6, 196), id="B64-h6-N196-deit_s"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dims", ATTN_CASES)
@pytest.mark.parametrize("provider", ["transmix", "reference"])
def test_attention_targets(benchmark, record, provider, dims, device):
    """Masked attention reduction + lambda + soft targets: one launch vs separate reference ops."""
    batch, heads, tokens = dims
    gen = torch.Generator().manual_seed(1)
    attn = torch.rand(batch, heads, tokens, generator=gen).softmax(-1).to(device)
    token_mask = (torch.rand(batch, tokens, generator=gen) > 0.5).float().to(device)
    lam_area = torch.rand(batch, generator=gen).to(device)
    target = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    record(f"attention-targets {batch}x{heads}x{tokens} K={NUM_CLASSES} {device}", provider)

    if provider == "transmix":
        def run():
            out = tk.transmix_targets(attn, token_mask, lam_area, target, NUM_CLASSES)
            sync(attn.device)
            return out
    else:
        def run():
            lam = reference.transmix_lambda(attn, token_mask, lam_area)
            out = reference.mix_targets(target, lam, NUM_CLASSES)
            sync(attn.device)
            return out

    benchmark.pedantic(run, rounds=50, warmup_rounds=5)
