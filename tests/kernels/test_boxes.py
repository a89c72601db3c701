"""sample_boxes: timm's rand_bbox / rand_bbox_minmax, vectorised, from explicit uniform draws.

The box positions come from ``draw_box_randoms`` (uniform float64 draws from a torch.Generator).
Against timm the test feeds those same draws to timm's own functions by replacing
``np.random.randint(low, high)`` with ``low + int(u * (high - low))``: the integer our code
derives from u. Boxes and lam must then agree exactly, for timm's float64 per-batch lam and for
its float32 per-element lam. There is one vectorised path (every impl but "reference" runs it) and
the per-sample reference twin.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import timm.data.mixup as timm_mixup
from hypothesis import given, settings, strategies as st

import transmix_kernels as tk
from conftest import assert_equal
from transmix_kernels import reference
from transmix_kernels._dispatch import TRITON_INTERPRET
from transmix_kernels.reference import draw_box_randoms

SIZES = {"13x17": (13, 17), "9x31": (9, 31), "224x224": (224, 224), "2x5": (2, 5)}
LAM_DTYPES = {"lam-f64": torch.float64, "lam-f32": torch.float32}
MINMAX = {"alpha": None, "minmax-0.2-0.8": (0.2, 0.8)}


def make_lam(batch: int, dtype: torch.dtype) -> torch.Tensor:
    """Random lam plus the edge values: no box (1), full side (0), a tiny box (0.999)."""
    lam = torch.rand(batch, dtype=torch.float64)
    lam[:3] = torch.tensor([0.0, 1.0, 0.999], dtype=torch.float64)
    return lam.to(dtype)


def generator(seed: int, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def timm_boxes(monkeypatch, lam, height, width, draws, *, minmax, correct_lam):
    """timm's cutmix_bbox_and_lam per sample, its integer draws taken from our uniform draws."""
    queue: list[float] = []
    calls: list[tuple[int, int]] = []

    def randint(low, high=None, size=None):
        assert size is None and high is not None
        u = queue.pop(0)
        calls.append((low, high))
        return np.int64(low + int(u * (high - low)))

    monkeypatch.setattr(timm_mixup.np.random, "randint", randint)
    rows, lams = [], []
    for b in range(lam.shape[0]):
        queue[:] = [float(u) for u in draws[:, b]]
        # timm's elem mode hands rand_bbox a np.float32 lam, its batch mode a Python float.
        lam_b = np.float32(lam[b].item()) if lam.dtype == torch.float32 else float(lam[b])
        (y0, y1, x0, x1), lam_out = timm_mixup.cutmix_bbox_and_lam(
            (3, height, width), lam_b, ratio_minmax=minmax, correct_lam=correct_lam
        )
        assert not queue, "timm drew a different number of integers than we drew uniforms"
        rows.append([int(y0), int(y1), int(x0), int(x1)])
        lams.append(np.float32(lam_out))
    monkeypatch.undo()
    return torch.tensor(rows, dtype=torch.int32).view(-1, 4), torch.from_numpy(np.array(lams, dtype=np.float32)), calls


@pytest.mark.parametrize("minmax", MINMAX.values(), ids=MINMAX.keys())
@pytest.mark.parametrize("lam_dtype", LAM_DTYPES.values(), ids=LAM_DTYPES.keys())
@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_vectorised_path_matches_reference(seed, device, size, lam_dtype, minmax):
    height, width = size
    lam = make_lam(37, lam_dtype).to(device)
    for correct_lam in (True, False):
        want_boxes, want_lam = reference.sample_boxes(
            lam, height, width, minmax=minmax, correct_lam=correct_lam, generator=generator(seed, device)
        )
        boxes, lam_area = tk.sample_boxes(
            lam, height, width, minmax=minmax, correct_lam=correct_lam, generator=generator(seed, device), impl="torch"
        )
        assert boxes.device == lam.device
        assert boxes.dtype == torch.int32 and boxes.shape == (37, 4)
        assert_equal(f"boxes[correct_lam={correct_lam}]", boxes, want_boxes)
        assert_equal(f"lam_area[correct_lam={correct_lam}]", lam_area, want_lam)


def test_every_impl_but_reference_runs_the_one_vectorised_path(seed, monkeypatch):
    """sample_boxes has no Triton kernel: "auto", "torch" and "triton" all run _boxes_torch (as its
    docstring says), "reference" the per-sample twin."""
    declared = sys.modules["transmix_kernels.boxes"].BOXES.kernels
    ran: list[str] = []
    vectorised, twin = declared["torch"], declared["reference"]
    assert twin is reference.sample_boxes

    def spy_vectorised(*args, **kwargs):
        ran.append("vectorised")
        return vectorised(*args, **kwargs)

    def spy_twin(*args, **kwargs):
        ran.append("reference")
        return twin(*args, **kwargs)

    monkeypatch.setitem(declared, "torch", spy_vectorised)
    monkeypatch.setitem(declared, "reference", spy_twin)
    impls = ("auto", "torch", "reference") + (("triton",) if TRITON_INTERPRET else ())
    for impl in impls:
        tk.sample_boxes(torch.rand(5), 13, 17, impl=impl)
    assert ran == ["reference" if impl == "reference" else "vectorised" for impl in impls]


@pytest.mark.parametrize("minmax", MINMAX.values(), ids=MINMAX.keys())
@pytest.mark.parametrize("lam_dtype", LAM_DTYPES.values(), ids=LAM_DTYPES.keys())
@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_matches_timm_rand_bbox(monkeypatch, seed, size, lam_dtype, minmax):
    height, width = size
    lam = make_lam(41, lam_dtype)
    draws = draw_box_randoms(41, torch.device("cpu"), minmax is not None, generator(seed))
    for correct_lam in (True, False):
        boxes, lam_area = tk.sample_boxes(
            lam, height, width, minmax=minmax, correct_lam=correct_lam, generator=generator(seed)
        )
        want_boxes, want_lam, calls = timm_boxes(
            monkeypatch, lam, height, width, draws, minmax=minmax, correct_lam=correct_lam
        )
        assert_equal(f"boxes vs timm (correct_lam={correct_lam})", boxes, want_boxes)
        assert_equal(f"lam_area vs timm (correct_lam={correct_lam})", lam_area, want_lam)
        if minmax is None:  # centres over the whole image, as timm's randint(0, H) / randint(0, W)
            assert set(calls) == {(0, height), (0, width)}


@pytest.mark.parametrize("lam_dtype", LAM_DTYPES.values(), ids=LAM_DTYPES.keys())
def test_lam_area_is_visible_share(seed, lam_dtype):
    height, width = 29, 23
    lam = make_lam(64, lam_dtype)
    boxes, lam_area = tk.sample_boxes(lam, height, width, correct_lam=True)
    b = boxes.double()
    area = (b[:, 1] - b[:, 0]) * (b[:, 3] - b[:, 2])
    assert_equal("lam_area (correct_lam)", lam_area, (1.0 - area / (height * width)).float())
    assert lam_area[1] == 1.0 and bool((boxes[1, 0] == boxes[1, 1]) | (boxes[1, 2] == boxes[1, 3]))  # lam = 1
    _, lam_raw = tk.sample_boxes(lam, height, width, correct_lam=False)
    assert_equal("lam_area (no correct_lam)", lam_raw, lam.float())
    # Unclipped boxes have timm's side lengths int(size * sqrt(1 - lam)).
    ratio = torch.sqrt(1 - lam)
    inside = (boxes[:, 0] > 0) & (boxes[:, 1] < height) & (boxes[:, 2] > 0) & (boxes[:, 3] < width)
    assert bool(inside.any())
    assert_equal("unclipped heights", (boxes[:, 1] - boxes[:, 0])[inside].long(), (height * ratio).long()[inside])
    assert_equal("unclipped widths", (boxes[:, 3] - boxes[:, 2])[inside].long(), (width * ratio).long()[inside])


@pytest.mark.parametrize("minmax", [(0.2, 0.8), (0.05, 0.3), (0.0, 1.0)], ids=["0.2-0.8", "0.05-0.3", "0-1"])
def test_minmax_sizes_in_range_and_inside(seed, minmax):
    height, width = 61, 47
    lam = torch.rand(400)
    boxes, lam_area = tk.sample_boxes(lam, height, width, minmax=minmax, correct_lam=False)
    heights, widths = boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]
    # timm's randint(int(H * lo), int(H * hi)): upper end excluded.
    assert int(heights.min()) >= int(height * minmax[0]) and int(heights.max()) < int(height * minmax[1])
    assert int(widths.min()) >= int(width * minmax[0]) and int(widths.max()) < int(width * minmax[1])
    assert int(boxes[:, 0].min()) >= 0 and int(boxes[:, 1].max()) <= height
    assert int(boxes[:, 2].min()) >= 0 and int(boxes[:, 3].max()) <= width
    # Both ends of the ranges get used: sizes and positions are spread, not stuck.
    assert int(heights.max()) - int(heights.min()) > (int(height * minmax[1]) - int(height * minmax[0])) // 2
    assert int(boxes[:, 0].max()) > int(boxes[:, 0].min())
    # minmax always corrects lam by area, as timm.
    area = (heights * widths).double()
    assert_equal("lam_area (minmax)", lam_area, (1.0 - area / (height * width)).float())


def test_generator_determinism(seed):
    lam = torch.rand(16, dtype=torch.float64)
    a = tk.sample_boxes(lam, 31, 19, generator=generator(7))
    b = tk.sample_boxes(lam, 31, 19, generator=generator(7))
    c = tk.sample_boxes(lam, 31, 19, generator=generator(8))
    assert_equal("same seed boxes", a[0], b[0])
    assert not torch.equal(a[0], c[0])


def test_empty_batch():
    boxes, lam_area = tk.sample_boxes(torch.empty(0), 13, 17)
    assert boxes.shape == (0, 4) and lam_area.shape == (0,)


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(1, 48),
    width=st.integers(1, 48),
    lam=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6),
    lam_f64=st.booleans(),
    minmax=st.one_of(st.none(), st.tuples(st.floats(0.0, 0.5), st.floats(0.5, 1.0))),
    draw_seed=st.integers(0, 2**31 - 1),
)
def test_boxes_always_valid(height, width, lam, lam_f64, minmax, draw_seed):
    if minmax is not None and (
        int(height * minmax[0]) >= int(height * minmax[1]) or int(width * minmax[0]) >= int(width * minmax[1])
    ):
        minmax = None  # an empty size range is a ValueError (tests/kernels/test_validation.py)
    lam_t = torch.tensor(lam, dtype=torch.float64 if lam_f64 else torch.float32)
    boxes, lam_area = tk.sample_boxes(lam_t, height, width, minmax=minmax, generator=generator(draw_seed))
    y0, y1, x0, x1 = boxes.long().unbind(1)
    assert bool(((0 <= y0) & (y0 <= y1) & (y1 <= height)).all()), boxes
    assert bool(((0 <= x0) & (x0 <= x1) & (x1 <= width)).all()), boxes
    area = ((y1 - y0) * (x1 - x0)).double()
    assert_equal("lam_area", lam_area, (1.0 - area / (height * width)).float())
    assert bool(((lam_area >= 0) & (lam_area <= 1)).all())


@pytest.mark.parametrize("lam_dtype", [np.float32, np.float64], ids=["lam-f32", "lam-f64"])
@pytest.mark.parametrize("minmax", [None, (0.2, 0.8)], ids=["rand_bbox", "minmax"])
def test_box_corners_numpy_equals_torch(lam_dtype, minmax):
    """TransMix draws boxes on the host with NumPy; the arithmetic must be the torch path's, bit for bit
    (NumPy keeps float32 for float32 lam, as torch does)."""
    from transmix_kernels.boxes import box_corners

    rng = np.random.default_rng(7)
    lam = rng.random(257).astype(lam_dtype)
    draws = rng.random((4 if minmax else 2, 257))
    for height, width in [(13, 17), (224, 224), (31, 9)]:
        got = box_corners(lam, height, width, minmax, draws, sqrt=np.sqrt,
                          to_int=lambda a: a.astype(np.int64), clip=np.clip)
        want = box_corners(torch.from_numpy(lam), height, width, minmax, torch.from_numpy(draws),
                           sqrt=torch.sqrt, to_int=lambda t: t.long(), clip=torch.clamp)
        for name, g, w in zip(("y0", "y1", "x0", "x1"), got, want):
            assert np.array_equal(g, w.numpy()), f"{name} differs for {height}x{width}"
