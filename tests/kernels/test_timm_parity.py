"""Exact equality with timm.data.Mixup, at the op level and at the TransMix level.

timm draws its parameters with np.random. A recording wrapper around
``timm.data.mixup.cutmix_bbox_and_lam`` (and ``Mixup._params_per_batch`` / ``_params_per_elem``)
captures every box and lam timm used; our ops, or a TransMix object whose draws are replaced by
timm's, must then reproduce timm's mixed images and targets bit for bit (float32 images; bf16
too where timm's arithmetic is defined by the image dtype alone, i.e. mode="batch").
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import timm.data.mixup as timm_mixup
from timm.data import Mixup

import transmix_kernels as tk
from conftest import assert_equal
from transmix_kernels._dispatch import TRITON_INTERPRET

mixer_module = __import__("sys").modules["transmix_kernels.mixer"]

BATCH, CHANNELS, HEIGHT, WIDTH, NUM_CLASSES = 6, 3, 13, 17, 10
SEEDS = range(6)
CONFIGS = {
    "cutmix": dict(mixup_alpha=0.0, cutmix_alpha=1.0),
    "cutmix-nocorrect": dict(mixup_alpha=0.0, cutmix_alpha=1.0, correct_lam=False),
    "cutmix-minmax": dict(mixup_alpha=0.0, cutmix_alpha=1.0, cutmix_minmax=(0.2, 0.8)),
    "mixup": dict(mixup_alpha=0.8, cutmix_alpha=0.0),
    "both-prob0.7": dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=0.7),
}


@pytest.fixture
def timm_recorder(monkeypatch):
    """Records timm's (box, lam) results and its per-batch / per-element parameter draws."""
    record = {"boxes": [], "batch": [], "elem": []}
    box_fn = timm_mixup.cutmix_bbox_and_lam
    per_batch, per_elem = Mixup._params_per_batch, Mixup._params_per_elem

    def boxes(*args, **kwargs):
        (y0, y1, x0, x1), lam = box_fn(*args, **kwargs)
        record["boxes"].append(([int(y0), int(y1), int(x0), int(x1)], lam))
        return (y0, y1, x0, x1), lam

    def params_batch(self):
        out = per_batch(self)
        record["batch"].append(out)
        return out

    def params_elem(self, count):
        lam, use_cutmix = per_elem(self, count)
        record["elem"].append((lam.copy(), use_cutmix.copy()))  # timm overwrites lam in place afterwards
        return lam, use_cutmix

    monkeypatch.setattr(timm_mixup, "cutmix_bbox_and_lam", boxes)
    monkeypatch.setattr(Mixup, "_params_per_batch", params_batch)
    monkeypatch.setattr(Mixup, "_params_per_elem", params_elem)

    def reset():
        for key in ("boxes", "batch", "elem"):
            record[key].clear()

    record["reset"] = reset
    return record


def run_timm(record, seed, x, target, mode, dtype=torch.float32, **config):
    record["reset"]()
    np.random.seed(seed)
    mixup = Mixup(mode=mode, label_smoothing=0.1, num_classes=NUM_CLASSES, **config)
    images, targets = mixup(x.clone(), target)
    return images, targets


def skip_unrunnable(impl: str, device: torch.device) -> None:
    if impl == "triton" and device.type == "cpu" and not TRITON_INTERPRET:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest only without a GPU)")


def make_batch(dtype=torch.float32):
    x = torch.randn(BATCH, CHANNELS, HEIGHT, WIDTH).to(dtype)
    target = torch.randint(0, NUM_CLASSES, (BATCH,))
    target[0] = target[-1]
    return x, target


# ---------------------------------------------------------------- op level


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
@pytest.mark.parametrize("impl", ("triton", "torch", "auto"))
def test_ops_batch_mode(seed, device, timm_recorder, impl, dtype):
    skip_unrunnable(impl, device)
    for name in ("cutmix", "cutmix-nocorrect", "cutmix-minmax"):
        for s in SEEDS[:3]:
            x, target = make_batch(dtype)
            timm_images, timm_targets = run_timm(timm_recorder, s, x, target, "batch", **CONFIGS[name])
            (box, lam), = timm_recorder["boxes"]
            ours = x.to(device)
            tk.cutmix_paste(ours, torch.tensor(box, device=device), inplace=True, impl=impl)
            assert_equal(f"{name} seed {s} images", ours, timm_images)
            lam64 = torch.full((BATCH,), float(lam), dtype=torch.float64, device=device)
            assert_equal(f"{name} seed {s} targets", tk.mix_targets(target.to(device), lam64, NUM_CLASSES, impl=impl),
                         timm_targets)


def elem_expectation(record, x):
    """Per-sample boxes (empty where timm pasted nothing) and timm's final float32 lam."""
    (lam_drawn, use_cutmix), = record["elem"]
    boxes = torch.zeros(BATCH, 4, dtype=torch.int64)
    lam_final = lam_drawn.copy()
    recorded = iter(record["boxes"])
    blend_rows = []
    for i in range(BATCH):
        if lam_drawn[i] == 1.0:
            continue
        if use_cutmix[i]:
            box, lam = next(recorded)
            boxes[i] = torch.tensor(box)
            lam_final[i] = lam
        else:
            blend_rows.append(i)
    assert next(recorded, None) is None
    return boxes, lam_drawn, lam_final, blend_rows


@pytest.mark.parametrize("config", ("cutmix", "both-prob0.7"))
@pytest.mark.parametrize("impl", ("triton", "torch", "auto"))
def test_ops_elem_mode(seed, device, timm_recorder, impl, config):
    skip_unrunnable(impl, device)
    seen_blend = seen_cut = False
    for s in SEEDS:
        x, target = make_batch()
        timm_images, timm_targets = run_timm(timm_recorder, s, x, target, "elem", **CONFIGS[config])
        boxes, lam_drawn, lam_final, blend_rows = elem_expectation(timm_recorder, x)
        ours, _ = tk.cutmix_paste(x.to(device), boxes.to(device), impl=impl)
        ours = ours.cpu()
        for i in blend_rows:  # blends are not an op of ours: timm's formula, for the unpasted rows
            ours[i] = x[i] * lam_drawn[i] + x[BATCH - 1 - i] * (1 - lam_drawn[i])
        seen_blend |= bool(blend_rows)
        seen_cut |= bool((boxes[:, 1] > boxes[:, 0]).any())
        assert_equal(f"seed {s} images", ours, timm_images)
        targets = tk.mix_targets(target.to(device), torch.from_numpy(lam_final).to(device), NUM_CLASSES, impl=impl)
        assert_equal(f"seed {s} targets", targets, timm_targets)
    assert seen_cut and (seen_blend or config == "cutmix")


# ---------------------------------------------------------------- TransMix level


def drive_with_timm_draws(monkeypatch, mixer, record, mode):
    """Make the mixer use timm's recorded draws and boxes instead of its own generators."""
    if mode == "batch":
        (lam, use_cutmix), = record["batch"]
        draws = (np.array([lam], dtype=np.float64), np.array([bool(use_cutmix) and lam != 1.0]))
    else:
        (lam, use_cutmix), = record["elem"]
        draws = (lam.copy(), use_cutmix & (lam != 1.0))
    recorded = [box for box, _ in record["boxes"]]

    def fake_draw(count):
        assert count == draws[0].shape[0]
        return draws

    def fake_draw_boxes(lam, height, width):
        assert (height, width) == (HEIGHT, WIDTH) and lam.shape[0] == draws[0].shape[0]
        queue = iter(recorded)
        # Rows without CutMix get a non-empty junk box: the mixer must blank it itself.
        rows = [next(queue) if cut else [1, 4, 2, 9] for cut in draws[1]]
        assert next(queue, None) is None
        return np.array(rows, dtype=np.int32).reshape(-1, 4)

    monkeypatch.setattr(mixer, "_draw", fake_draw)
    monkeypatch.setattr(mixer, "_draw_boxes", fake_draw_boxes)


@pytest.mark.parametrize("mode", ("batch", "pair", "elem"))
@pytest.mark.parametrize("impl", ("triton", "torch"))
def test_transmix_equals_timm(seed, device, monkeypatch, timm_recorder, impl, mode):
    skip_unrunnable(impl, device)
    dtypes = (torch.float32, torch.bfloat16) if mode == "batch" else (torch.float32,)
    kinds = set()
    for name, config in CONFIGS.items():
        for dtype in dtypes:
            mixer = tk.TransMix(NUM_CLASSES, mode=mode, label_smoothing=0.1, patch_size=4, impl=impl, **config)
            for s in SEEDS[:4]:
                x, target = make_batch(dtype)
                timm_images, timm_targets = run_timm(timm_recorder, s, x, target, mode, **config)
                drive_with_timm_draws(monkeypatch, mixer, timm_recorder, mode)
                x, target = x.to(device), target.to(device)
                images, mix = mixer(x, target)
                kinds.add(mix.kind)
                case = f"{name} {dtype} seed {s} ({mix.kind})"
                assert images is x
                assert_equal(f"images {case}", images, timm_images)
                assert_equal(f"targets {case}", mix.targets(), timm_targets)
    assert {"cutmix", "mixup"} <= kinds and ("mixed" in kinds or mode == "batch"), kinds
