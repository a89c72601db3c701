"""The CutMix/TransMix mixing step against the same work in plain PyTorch, the official approach,
timm's Mixup and torchvision's CutMix.

A step = draw lam and boxes, paste in place (torchvision: into a copy), make the soft targets
(``mix.targets()``, timm's). Every provider does the same work in a group; the kinds
(conftest.PROVIDER_KINDS):

* ``transmix`` (ours, ``impl="auto"``: on CPU the extension's compiled paste when built);
* ``transmix-torch-path`` (same algorithm, plain PyTorch: ``impl="torch"``, the path without
  the extension);
* ``reference`` (naive / official approach: boxes drawn in a per-sample Python loop, a full
  flipped copy of the batch and a full pixel mask, ``torch.where``, separate target ops);
* ``timm`` (``timm.data.Mixup``), ``torchvision`` (``v2.CutMix``: one box per batch, no label
  smoothing; the same call in every case, for reference).

Cases (``Case``): modes ``elem`` (per-sample boxes) and ``batch`` (one box) at 256x3x32x32 and
64x3x224x224 (K=1000), CutMix only, and the case a new user tried (``elem``, 256x3x32x32,
K=100; also with the DeiT recipe's Mixup 0.8 / CutMix 1.0 / switch 0.5). Loops:

* ``alone``: the provider's rounds back to back, each on a fresh clone of the same batch (the
  clone is made just before the call, outside the timing);
* ``interleaved``: before each timed call, the other library's step (timm's Mixup for ours,
  ours for timm) runs on another fresh clone, then the fresh clone for the timed call is made:
  the timed call sees the caches, allocator and thread pool as an alternating A/B loop leaves
  them (the loop a user writes to compare the two).

Groups ``+token-mask`` also make the (B, gh*gw) token mask of a 16-px patch grid, as TransMix
needs for attention labels (ours fuses it into the paste; the reference resizes the pixel
mask); timm and torchvision cannot, so they are not in those groups.

Groups ``mask-paste-vs-box``: ``tk.mask_paste`` (provider ``transmix``) against ``tk.cutmix_paste``
on the same work, per-sample boxes on the 16-px patch grid given as (B, gh, gw) cell masks or as
boxes, with the token mask, out of place and in place (``impl="auto"`` for both): what the
generality of a cell mask costs over a box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from timm.data import Mixup
from torchvision.transforms import v2

import transmix_kernels as tk
from transmix_kernels import reference

from conftest import OURS, bench_devices, sync

PATCH = 16
RECIPES = {  # (mixup_alpha, cutmix_alpha, switch_prob)
    "cutmix": (0.0, 1.0, 0.5),
    "deit": (0.8, 1.0, 0.5),
}
DEVICES = bench_devices()


@dataclass(frozen=True)
class Case:
    shape: tuple[int, int, int, int]
    mode: str
    num_classes: int = 1000
    recipe: str = "cutmix"
    token_mask: bool = False
    loop: str = "alone"

    @property
    def name(self) -> str:
        size = "x".join(map(str, self.shape))
        extras = [f"K{self.num_classes}", self.recipe] + (["+token-mask"] if self.token_mask else []) + [self.loop]
        return f"{self.mode} {size} " + " ".join(extras)

    @property
    def providers(self) -> tuple[str, ...]:
        if self.token_mask:
            return ("transmix", "transmix-torch-path", "reference")
        if self.loop == "interleaved" or self.recipe != "cutmix":
            return ("transmix", "transmix-torch-path", "timm")
        return ("transmix", "transmix-torch-path", "reference", "timm", "torchvision")


SMALL, LARGE = (256, 3, 32, 32), (64, 3, 224, 224)
CASES = [
    Case(shape, mode, token_mask=token_mask, loop=loop)
    for shape in (SMALL, LARGE)
    for mode in ("elem", "batch")
    for token_mask, loop in ((False, "alone"), (True, "alone"), (False, "interleaved"))
] + [
    Case(SMALL, "elem", num_classes=100, recipe=recipe, loop=loop)
    for recipe in ("cutmix", "deit")
    for loop in ("alone", "interleaved")
]
PARAMS = [
    pytest.param(case, provider, device, id=f"{case.name.replace(' ', '-')}-{provider}-{device}")
    for case in CASES
    for provider in case.providers
    for device in DEVICES
]


def make_batch(case: Case, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(case.shape, generator=gen).to(device)
    target = torch.randint(0, case.num_classes, (case.shape[0],), generator=gen).to(device)
    return images, target


def reference_step(case: Case):
    """Official-style: boxes per sample in Python, full flipped copy, full pixel mask (+ nearest resize)."""
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)

    def step(images, target):
        batch, _, height, width = images.shape
        lam = torch.from_numpy(rng.beta(1.0, 1.0, size=1 if case.mode == "batch" else batch))
        boxes, lam_area = reference.sample_boxes(lam, height, width, generator=generator)
        if case.mode == "batch":  # one box and one lam for the whole batch
            boxes, lam_area = boxes[0], lam_area.expand(batch)
        grid = (height // PATCH, width // PATCH) if case.token_mask else None
        _, token_mask = reference.cutmix_paste(images, boxes.to(images.device), token_grid=grid, inplace=True)
        return reference.mix_targets(target, lam_area.to(images.device), case.num_classes), token_mask

    return step


def transmix_step(case: Case, impl: str):
    mixup_alpha, cutmix_alpha, switch_prob = RECIPES[case.recipe]
    transmix = tk.TransMix(
        case.num_classes, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, switch_prob=switch_prob,
        mode=case.mode, seed=0, impl=impl, patch_size=PATCH if case.token_mask else None,
    )

    def step(images, target):
        images, mix = transmix(images, target)
        return mix.targets(), mix.token_mask

    return step


def timm_step(case: Case):
    mixup_alpha, cutmix_alpha, switch_prob = RECIPES[case.recipe]
    mixup = Mixup(
        mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, switch_prob=switch_prob, mode=case.mode,
        num_classes=case.num_classes, label_smoothing=0.1,
    )
    return lambda images, target: mixup(images, target)


def provider_step(case: Case, provider: str):
    if provider == "transmix":
        return transmix_step(case, "auto")
    if provider == "transmix-torch-path":
        return transmix_step(case, "torch")
    if provider == "reference":
        return reference_step(case)
    if provider == "timm":
        return timm_step(case)
    cutmix = v2.CutMix(num_classes=case.num_classes, alpha=1.0)
    return lambda images, target: cutmix(images, target)


def round_setup(case: Case, provider: str, images, target):
    """pytest-benchmark setup: a fresh clone per round, after the other library's step if interleaved."""
    other = None
    if case.loop == "interleaved":
        other = provider_step(case, "transmix" if provider == "timm" else "timm")

    def setup():
        if other is not None:
            other(images.clone(), target)
        return (images.clone(), target), {}

    return setup


@pytest.mark.parametrize("case, provider, device", PARAMS)
def test_cutmix_step(benchmark, record, case, provider, device):
    np.random.seed(0)  # timm's Mixup and torchvision draw from the global generators
    torch.manual_seed(0)
    device = torch.device(device)
    step = provider_step(case, provider)
    images, target = make_batch(case, device)
    record(f"cutmix-step {case.name} {device.type}", provider, device)

    def run(batch, labels):
        out = step(batch, labels)
        sync(batch.device)
        return out

    benchmark.pedantic(run, setup=round_setup(case, provider, images, target), rounds=30, warmup_rounds=3)


ATTN_CASES = [
    pytest.param((256, 3, 64), id="B256-h3-N64"),
    pytest.param((64, 6, 196), id="B64-h6-N196-deit_s"),
]
NUM_CLASSES = 1000


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dims", ATTN_CASES)
@pytest.mark.parametrize("provider", ["transmix", "reference-ops"])
def test_attention_targets(benchmark, record, provider, dims, device):
    """Masked attention reduction + lambda + soft targets: one launch vs the same algorithm in
    plain PyTorch, op by op (the reference twins)."""
    batch, heads, tokens = dims
    gen = torch.Generator().manual_seed(1)
    attn = torch.rand(batch, heads, tokens, generator=gen).softmax(-1).to(device)
    token_mask = (torch.rand(batch, tokens, generator=gen) > 0.5).float().to(device)
    lam_area = torch.rand(batch, generator=gen).to(device)
    target = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    record(f"attention-targets {batch}x{heads}x{tokens} K={NUM_CLASSES} {device}", provider, device)

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


PASTE_SHAPES = [pytest.param(SMALL, id="256x3x32x32"), pytest.param(LARGE, id="64x3x224x224")]


def cell_box_batch(shape, device: torch.device):
    """Images, per-sample boxes on the 16-px patch grid, and the same boxes as (B, gh, gw) cell masks."""
    batch, _, height, width = shape
    gen = torch.Generator().manual_seed(2)
    grid = (height // PATCH, width // PATCH)
    rows = torch.randint(0, grid[0] + 1, (batch, 2), generator=gen).sort(1).values
    cols = torch.randint(0, grid[1] + 1, (batch, 2), generator=gen).sort(1).values
    cell_boxes = torch.cat([rows, cols], 1)
    mask = reference.box_pixel_mask(cell_boxes, batch, *grid)[:, 0]
    images = torch.randn(shape, generator=gen)
    return images.to(device), (cell_boxes * PATCH).to(device), mask.to(device), grid


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
@pytest.mark.parametrize("shape", PASTE_SHAPES)
@pytest.mark.parametrize("provider", ["transmix", "cutmix_paste"])
def test_mask_paste(benchmark, record, provider, shape, inplace, device):
    """tk.mask_paste ("transmix") vs tk.cutmix_paste: the same boxes, as cell masks or as boxes."""
    device = torch.device(device)
    images, boxes, mask, grid = cell_box_batch(shape, device)
    size = "x".join(map(str, shape))
    record(f"mask-paste-vs-box {size} {'inplace' if inplace else 'out-of-place'} {device.type}", provider, device)
    benchmark.extra_info["kind"] = OURS  # both providers are this library's ops

    def run(batch):
        if provider == "transmix":
            out = tk.mask_paste(batch, mask, token_grid=grid, inplace=inplace)
        else:
            out = tk.cutmix_paste(batch, boxes, token_grid=grid, inplace=inplace)
        sync(batch.device)
        return out

    benchmark.pedantic(run, setup=lambda: ((images.clone(),), {}), rounds=30, warmup_rounds=3)
