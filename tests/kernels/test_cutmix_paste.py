"""cutmix_paste: partner gather + paste + token mask, against reference.cutmix_paste.

Pasting only moves data, so pixels must agree bitwise with the reference; the token mask must
be exactly F.interpolate(mode="nearest") of the pixel mask, including grids where its float32
scale puts a token on a different pixel than the integer formula floor(i * H / gh) would.
Every test runs with torch.empty NaN-poisoned, so an element no kernel wrote fails.
"""

from __future__ import annotations

import pytest
import torch

import transmix_kernels as tk
from conftest import assert_equal
from transmix_kernels import reference
from transmix_kernels._dispatch import TRITON_INTERPRET

IMPLS = ("triton", "torch", "auto")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = ("contiguous", "channels_last", "strided")
# (B, C, H, W), token grid, first box kind: odd, non-square, non-power-of-2.
SHAPES = [((5, 3, 13, 17), (4, 5), 0), ((4, 2, 9, 31), (3, 7), 5)]


def _rand(low: int, high: int) -> int:
    """Uniform int in [low, high]."""
    return int(torch.randint(low, high + 1, ()))


def edge_boxes(batch: int, height: int, width: int, first_kind: int = 0, dtype=torch.int32) -> torch.Tensor:
    """(B, 4) boxes cycling through the cases that break kernels: full image, empty (zero height or
    zero width), boxes touching each corner (so each edge), and a random interior box."""

    def span(size):
        a, b = sorted((_rand(0, size), _rand(0, size)))
        return [a, b]

    kinds = [
        lambda: [0, height, 0, width],  # full image
        lambda: [_rand(0, height)] * 2 + span(width),  # empty: zero height
        lambda: [0, _rand(1, height), 0, _rand(1, width)],  # top-left corner
        lambda: [_rand(0, height - 1), height, _rand(0, width - 1), width],  # bottom-right corner
        lambda: [0, _rand(1, height), _rand(0, width - 1), width],  # top-right corner
        lambda: [_rand(0, height - 1), height, 0, _rand(1, width)],  # bottom-left corner
        lambda: span(height) + [_rand(0, width)] * 2,  # empty: zero width
        lambda: [_rand(1, height // 2), _rand(height // 2 + 1, height - 1),
                 _rand(1, width // 2), _rand(width // 2 + 1, width - 1)],  # interior
    ]
    rows = [kinds[(first_kind + b) % len(kinds)]() for b in range(batch)]
    return torch.tensor(rows, dtype=dtype)


def random_pairing(batch: int) -> torch.Tensor:
    """A random involution: samples swapped in random pairs (an odd one out keeps itself)."""
    order = torch.randperm(batch)
    partner = torch.arange(batch)
    partner[order[0:batch - 1:2]], partner[order[1:batch:2]] = order[1:batch:2], order[0:batch - 1:2]
    return partner


def partners(batch: int, device) -> dict[str, torch.Tensor | None]:
    repeats = torch.randint(0, batch, (batch,))
    repeats[0] = repeats[1]  # at least one image is the partner of two samples
    return {"flip": None, "pairs": random_pairing(batch).to(device), "perm": torch.randperm(batch).to(device),
            "repeats": repeats.to(device)}


def make_images(shape, dtype, layout, device="cpu") -> torch.Tensor:
    batch, channels, height, width = shape
    if layout == "strided":  # every other column of a wider tensor: neither contiguous nor channels_last
        return torch.randn(batch, channels, height, 2 * width + 1).to(device, dtype)[..., 1::2]
    x = torch.randn(shape).to(device, dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def skip_unrunnable(impl: str, device: torch.device) -> None:
    if impl == "triton" and device.type == "cpu" and not TRITON_INTERPRET:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest only without a GPU)")


def assert_layout(name: str, out: torch.Tensor, layout: str) -> None:
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), f"{name}: lost {layout} layout, strides {out.stride()}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference(seed, device, poison_empty, impl, dtype, layout):
    skip_unrunnable(impl, device)
    for shape, grid, first_kind in SHAPES:
        batch = shape[0]
        boxes = edge_boxes(batch, shape[2], shape[3], first_kind, dtype=torch.int32 if first_kind == 0 else torch.int64)
        boxes = boxes.to(device)
        for pname, partner in partners(batch, device).items():
            x = make_images(shape, dtype, layout, device)
            x_before = x.clone()
            want, want_mask = reference.cutmix_paste(x, boxes, partner, token_grid=grid)
            case = f"{shape}/{pname}"

            mixed, token_mask = tk.cutmix_paste(x, boxes, partner, token_grid=grid, impl=impl)
            assert_equal(f"mixed {case}", mixed, want)
            assert_equal(f"token_mask {case}", token_mask, want_mask)
            assert_equal(f"input untouched {case}", x, x_before)
            assert mixed.data_ptr() != x.data_ptr()
            assert_layout(f"mixed {case}", mixed, layout if layout != "strided" else "contiguous")
            if pname == "flip":  # odd batch: the middle sample is its own partner, so unchanged
                assert batch % 2 == 0 or torch.equal(mixed[batch // 2], x[batch // 2])

            if layout == "strided":
                continue  # in place needs a dense tensor (tests/kernels/test_validation.py)
            y = x.clone()
            storage = y.data_ptr()
            mixed_in, token_mask_in = tk.cutmix_paste(y, boxes, partner, token_grid=grid, inplace=True, impl=impl)
            assert mixed_in is y and y.data_ptr() == storage
            assert_equal(f"inplace == out of place {case}", y, mixed)
            assert_equal(f"inplace token_mask {case}", token_mask_in, want_mask)
            assert_layout(f"inplace {case}", y, layout)


@pytest.mark.parametrize("impl", IMPLS)
def test_one_box_for_the_batch(seed, device, poison_empty, impl):
    skip_unrunnable(impl, device)
    """A (4,) box applies to every sample (timm mode="batch")."""
    height, width = 11, 19
    boxes = [[0, height, 0, width], [4, 4, 2, 9], [0, 5, 0, 7], [6, height, 12, width], [0, 3, 15, width], [2, 9, 3, 14]]
    cases = [("contiguous", torch.float32), ("channels_last", torch.bfloat16), ("contiguous", torch.float16)]
    for i, box in enumerate(boxes):
        layout, dtype = cases[i % len(cases)]
        box = torch.tensor(box, dtype=torch.int64 if i % 2 else torch.int32, device=device)
        for partner in (None, torch.randperm(5).to(device)):
            x = make_images((5, 3, height, width), dtype, layout, device)
            want, want_mask = reference.cutmix_paste(x, box, partner, token_grid=(3, 6))
            # The same box written out per sample gives the same result.
            per_sample, _ = reference.cutmix_paste(x, box.expand(5, 4), partner)
            assert_equal(f"reference (4,) vs (B, 4) box {box.tolist()}", want, per_sample)
            mixed, token_mask = tk.cutmix_paste(x, box, partner, token_grid=(3, 6), impl=impl)
            assert_equal(f"mixed box {box.tolist()}", mixed, want)
            assert_equal(f"token_mask box {box.tolist()}", token_mask, want_mask)
            y = x.clone()
            out, token_mask_in = tk.cutmix_paste(y, box, partner, token_grid=(3, 6), inplace=True, impl=impl)
            assert out is y
            assert_equal(f"inplace box {box.tolist()}", y, want)
            assert_equal(f"inplace token_mask box {box.tolist()}", token_mask_in, want_mask)
            assert_layout("inplace", y, layout)


def _critical_rows(size: int, grid: int) -> list[int]:
    """Pixels where float32 nearest-resize and floor(i * size / grid) pick different rows."""
    scale = float(torch.tensor(size, dtype=torch.float32) / torch.tensor(grid, dtype=torch.float32))
    out = []
    for i in range(grid):
        f32 = min(int(torch.floor(torch.tensor(i, dtype=torch.float32) * scale)), size - 1)
        if f32 != i * size // grid:
            out.append(i * size // grid)
    return out


# (H, W, gh, gw): the first two have float32 scales that differ from the integer formula.
TOKEN_GRIDS = {"62x26-g14x22": (62, 26, 14, 22), "26x62-g22x14": (26, 62, 22, 14), "45x31-g7x10": (45, 31, 7, 10),
               "32x48-g8x12": (32, 48, 8, 12)}


@pytest.mark.parametrize("grid_case", TOKEN_GRIDS.values(), ids=TOKEN_GRIDS.keys())
@pytest.mark.parametrize("impl", IMPLS)
def test_token_mask_nearest_semantics(seed, device, poison_empty, impl, grid_case):
    skip_unrunnable(impl, device)
    height, width, gh, gw = grid_case
    crit_y, crit_x = _critical_rows(height, gh), _critical_rows(width, gw)
    if grid_case[:2] in ((62, 26), (26, 62)):
        assert crit_y and crit_x, "grid no longer exercises the float32-scale case"
    # Boxes whose edges sit exactly on the critical pixels, plus random and edge boxes.
    edges_y = crit_y + [0, height // 3, height]
    edges_x = crit_x + [0, width // 2, width]
    rows = []
    for i in range(12):
        y0, y1 = sorted((edges_y[i % len(edges_y)], edges_y[(i * 5 + 1) % len(edges_y)]))
        x0, x1 = sorted((edges_x[(i * 3) % len(edges_x)], edges_x[(i * 7 + 2) % len(edges_x)]))
        rows.append([y0, y1, x0, x1])
    boxes = torch.cat([torch.tensor(rows, dtype=torch.int32), edge_boxes(6, height, width)]).to(device)
    x = torch.randn(boxes.shape[0], 1, height, width).to(device)
    want_mixed, want = reference.cutmix_paste(x, boxes, token_grid=(gh, gw))
    if crit_y or crit_x:  # the reference really differs from the integer formula here
        py = torch.arange(gh, device=device) * height // gh
        px = torch.arange(gw, device=device) * width // gw
        pixel_mask = reference.box_pixel_mask(boxes, boxes.shape[0], height, width)[:, 0]
        integer_rule = pixel_mask[:, py][:, :, px].flatten(1).float()
        assert not torch.equal(integer_rule, want)
    mixed, token_mask = tk.cutmix_paste(x, boxes, token_grid=(gh, gw), impl=impl)
    assert_equal("token_mask", token_mask, want)
    assert_equal("mixed", mixed, want_mixed)
    _, token_mask_in = tk.cutmix_paste(x.clone(), boxes, token_grid=(gh, gw), inplace=True, impl=impl)
    assert_equal("token_mask (inplace)", token_mask_in, want)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_token_grid_and_tiny_batches(seed, device, poison_empty, impl):
    skip_unrunnable(impl, device)
    x = torch.randn(3, 2, 7, 5).to(device)
    boxes = edge_boxes(3, 7, 5, first_kind=2).to(device)
    mixed, token_mask = tk.cutmix_paste(x, boxes, impl=impl)
    assert token_mask is None
    assert_equal("mixed", mixed, reference.cutmix_paste(x, boxes)[0])
    # A grid as large as the image: one token per pixel, the mask is the pixel mask.
    _, token_mask = tk.cutmix_paste(x, boxes, token_grid=(7, 5), impl=impl)
    assert_equal("pixel grid", token_mask, reference.box_pixel_mask(boxes, 3, 7, 5).flatten(1).float())
    one = torch.randn(1, 3, 6, 9).to(device)  # a batch of one is its own partner
    assert_equal("B=1", tk.cutmix_paste(one, torch.tensor([1, 4, 2, 7], device=device), impl=impl)[0], one)
    empty, empty_mask = tk.cutmix_paste(torch.randn(0, 3, 6, 9, device=device),
                                        torch.zeros(0, 4, dtype=torch.int32, device=device),
                                        token_grid=(2, 3), impl=impl)
    assert empty.shape == (0, 3, 6, 9) and empty_mask.shape == (0, 6)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("impl", IMPLS)
def test_large_timm_like_batch(seed, device, poison_empty, impl, layout):
    skip_unrunnable(impl, device)
    batch, height = 12, 224
    lam = torch.distributions.Beta(1.0, 1.0).sample((batch,))
    boxes, _ = tk.sample_boxes(lam, height, height)
    boxes, partner = boxes.to(device), torch.randperm(batch).to(device)
    x = make_images((batch, 3, height, height), torch.bfloat16, layout, device)
    want, want_mask = reference.cutmix_paste(x, boxes, partner, token_grid=(14, 14))
    mixed, token_mask = tk.cutmix_paste(x, boxes, partner, token_grid=(14, 14), impl=impl)
    assert_equal("mixed", mixed, want)
    assert_equal("token_mask", token_mask, want_mask)
    y = x.clone()
    tk.cutmix_paste(y, boxes, partner, token_grid=(14, 14), inplace=True, impl=impl)
    assert_equal("inplace", y, want)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_random_overlapping_boxes_every_partner_map(seed, layout, dtype):
    """Random sizes and boxes (overlapping, nested, disjoint, empty) under every kind of partner
    map: the in-place paste of impl="auto" (the extension's pair swap or gather/scatter on CPU)
    equals the reference bit for bit."""
    gen = torch.Generator().manual_seed(3)
    for trial in range(40):
        batch, height, width = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((2, 10), (1, 23), (1, 19)))
        ys = torch.randint(0, height + 1, (batch, 2), generator=gen).sort(1).values
        xs = torch.randint(0, width + 1, (batch, 2), generator=gen).sort(1).values
        boxes = torch.cat([ys, xs], 1)
        for pname, partner in partners(batch, "cpu").items():
            x = make_images((batch, 3, height, width), dtype, layout)
            want, _ = reference.cutmix_paste(x, boxes, partner)
            got, _ = tk.cutmix_paste(x.clone(memory_format=torch.preserve_format), boxes, partner, inplace=True)
            assert_equal(f"trial {trial} {pname} {batch}x{height}x{width}", got, want)
