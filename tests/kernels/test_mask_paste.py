"""mask_paste: cell mask read + partner gather + paste + token mask, against reference.mask_paste.

Pasting only moves data, so pixels must agree bitwise with the reference, and in place must equal
out of place for every partner map. A CutMix box on cell edges written as a cell mask must give
cutmix_paste's pixels and token mask. Bad input raises before any backend runs. Every test of
results runs with torch.empty NaN-poisoned, so an element no kernel wrote fails.
"""

from __future__ import annotations

import sys

import pytest
import torch

import transmix_kernels as tk
from conftest import assert_equal
from test_cutmix_paste import DTYPES, IMPLS, LAYOUTS, assert_layout, make_images, partners, skip_unrunnable
# The bad-input check of the other ops: the right exception, every input as it was.
from test_validation import test_bad_input as raises_and_leaves_inputs
from transmix_kernels import reference
from transmix_kernels.mask_paste import MASK_PASTE, MASK_PASTE_INPLACE

dispatch_module = sys.modules["transmix_kernels._dispatch"]

MASK_DTYPES = (torch.bool, torch.uint8, torch.float32, torch.float16)
# (B, C, H, W), (gh, gw) cells, token grid: odd, non-square, non-power-of-2; cells of 2x3 tokens
# (3x2-pixel patches), of one token, of no token grid, and of one pixel.
SHAPES = [
    ((3, 3, 30, 42), (5, 7), (10, 21)),
    ((5, 2, 30, 42), (10, 14), (10, 14)),
    ((4, 3, 9, 20), (3, 4), None),
    ((3, 1, 6, 10), (6, 10), (6, 10)),
]


def _rand(low: int, high: int) -> int:
    """Uniform int in [low, high]."""
    return int(torch.randint(low, high + 1, ()))


def cell_masks(batch: int, gh: int, gw: int, first_kind: int = 0, dtype=torch.bool) -> torch.Tensor:
    """(B, gh, gw) masks cycling through empty, full, random (about half the cells), one cell and
    all cells but one."""

    def one_cell(value: bool) -> torch.Tensor:
        m = torch.full((gh, gw), not value)
        m[_rand(0, gh - 1), _rand(0, gw - 1)] = value
        return m

    kinds = [
        lambda: torch.zeros(gh, gw, dtype=torch.bool),
        lambda: torch.ones(gh, gw, dtype=torch.bool),
        lambda: torch.rand(gh, gw) < 0.5,
        lambda: one_cell(True),
        lambda: one_cell(False),
    ]
    return torch.stack([kinds[(first_kind + b) % len(kinds)]() for b in range(batch)]).to(dtype)


def cell_boxes(batch: int, gh: int, gw: int) -> torch.Tensor:
    """(B, 4) boxes ``[y0, y1, x0, x1]`` in cells: the full grid, an empty one, then random ones."""
    rows = []
    for b in range(batch):
        y0, y1 = sorted((_rand(0, gh), _rand(0, gh)))
        x0, x1 = sorted((_rand(0, gw), _rand(0, gw)))
        rows.append([[0, gh, 0, gw], [y0, y0, x0, x1], [y0, y1, x0, x1]][min(b, 2)])
    return torch.tensor(rows)


def box_cells(boxes: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """(B, gh, gw) bool: the cells inside each box (boxes in cells)."""
    return reference.box_pixel_mask(boxes, boxes.shape[0], gh, gw)[:, 0]


def check_paste(case, x, mask, partner, token_grid, impl, layout):
    """Out of place and in place against the reference: pixels and token mask bit for bit."""
    x_before = x.clone()
    want, want_mask = reference.mask_paste(x, mask, partner, token_grid=token_grid)
    mixed, token_mask = tk.mask_paste(x, mask, partner, token_grid=token_grid, impl=impl)
    assert_equal(f"mixed {case}", mixed, want)
    if token_grid is None:
        assert token_mask is None and want_mask is None, case
    else:
        assert_equal(f"token_mask {case}", token_mask, want_mask)
    assert_equal(f"input untouched {case}", x, x_before)
    assert mixed.data_ptr() != x.data_ptr()
    assert_layout(f"mixed {case}", mixed, layout if layout != "strided" else "contiguous")
    if layout == "strided":
        return  # in place needs a dense tensor (test_bad_input)
    y = x.clone()
    storage = y.data_ptr()
    mixed_in, token_mask_in = tk.mask_paste(y, mask, partner, token_grid=token_grid, inplace=True, impl=impl)
    assert mixed_in is y and y.data_ptr() == storage
    assert_equal(f"inplace == out of place {case}", y, mixed)
    if token_grid is not None:
        assert_equal(f"inplace token_mask {case}", token_mask_in, want_mask)
    assert_layout(f"inplace {case}", y, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference(seed, device, poison_empty, impl, dtype, layout):
    skip_unrunnable(impl, device)
    for i, (shape, (gh, gw), grid) in enumerate(SHAPES):
        batch = shape[0]
        for j, (pname, partner) in enumerate(partners(batch, device).items()):
            mask_dtype = MASK_DTYPES[(i + j) % len(MASK_DTYPES)]
            mask = cell_masks(batch, gh, gw, first_kind=i + j, dtype=mask_dtype).to(device)
            x = make_images(shape, dtype, layout, device)
            check_paste(f"{shape}/{gh}x{gw}/{pname}/{mask_dtype}", x, mask, partner, grid, impl, layout)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_and_full_masks(seed, device, poison_empty, impl):
    """No cell pasted: the images themselves and a zero token mask; every cell: the partners."""
    skip_unrunnable(impl, device)
    x = make_images((5, 3, 30, 42), torch.bfloat16, "channels_last", device)
    partner = torch.randperm(5).to(device)
    for fill, want in ((0, x), (1, x[partner])):
        mask = torch.full((5, 5, 7), fill, dtype=torch.uint8, device=device)
        mixed, token_mask = tk.mask_paste(x, mask, partner, token_grid=(10, 14), impl=impl)
        assert_equal(f"mixed, mask of {fill}s", mixed, want)
        assert_equal(f"token_mask, mask of {fill}s", token_mask, torch.full((5, 140), float(fill), device=device))
        y = x.clone()
        tk.mask_paste(y, mask, partner, inplace=True, impl=impl)
        assert_equal(f"inplace, mask of {fill}s", y, want)


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("impl", IMPLS)
def test_box_as_cells_matches_cutmix_paste(seed, device, poison_empty, impl, layout):
    """A box on cell edges as a cell mask: cutmix_paste's pixels and token mask, bit for bit."""
    skip_unrunnable(impl, device)
    for (batch, channels, height, width), (gh, gw), grid in SHAPES:
        cell_h, cell_w = height // gh, width // gw
        cells = cell_boxes(batch, gh, gw)
        boxes = (cells * torch.tensor([cell_h, cell_h, cell_w, cell_w])).to(device)
        mask = box_cells(cells, gh, gw).to(device)
        for pname, partner in partners(batch, device).items():
            case = f"{batch}x{height}x{width}/{gh}x{gw}/{pname}"
            x = make_images((batch, channels, height, width), torch.float16, layout, device)
            want, want_mask = tk.cutmix_paste(x, boxes, partner, token_grid=grid, impl=impl)
            mixed, token_mask = tk.mask_paste(x, mask, partner, token_grid=grid, impl=impl)
            assert_equal(f"mixed {case}", mixed, want)
            assert_equal(f"mixed vs reference.cutmix_paste {case}", mixed, reference.cutmix_paste(x, boxes, partner)[0])
            if grid is not None:
                assert_equal(f"token_mask {case}", token_mask, want_mask)
            y = x.clone()
            _, token_mask_in = tk.mask_paste(y, mask, partner, token_grid=grid, inplace=True, impl=impl)
            assert_equal(f"inplace {case}", y, want)


@pytest.mark.parametrize("impl", IMPLS)
def test_token_mask_as_cells(seed, device, poison_empty, impl):
    """A (B, N) token mask viewed as (B, th, tw) cells gives itself back as the token mask, and
    each patch of pixels follows its token."""
    skip_unrunnable(impl, device)
    batch, height, width, th, tw = 3, 30, 42, 10, 14
    token_mask = (torch.rand(batch, th * tw) < 0.4).float().to(device)
    x = torch.randn(batch, 2, height, width).to(device)
    mixed, got = tk.mask_paste(x, token_mask.view(batch, th, tw), token_grid=(th, tw), impl=impl)
    assert_equal("token_mask round trip", got, token_mask)
    patch_pixels = token_mask.view(batch, 1, th, 1, tw, 1).expand(batch, 1, th, 3, tw, 3)
    patch_pixels = patch_pixels.reshape(batch, 1, height, width)
    assert_equal("mixed", mixed, torch.where(patch_pixels.bool(), x.flip(0), x))


@pytest.mark.parametrize("impl", ("torch", "triton"))
def test_random_masks_every_partner_map(seed, device, poison_empty, impl):
    """Random cell grids, cell sizes and masks under every kind of partner map: in place equals
    the reference bit for bit."""
    skip_unrunnable(impl, device)
    gen = torch.Generator().manual_seed(5)
    for trial in range(6 if impl == "triton" else 30):
        batch, gh, gw, cell_h, cell_w = (int(torch.randint(lo, hi, (1,), generator=gen))
                                         for lo, hi in ((2, 8), (1, 6), (1, 6), (1, 5), (1, 5)))
        mask = (torch.rand(batch, gh, gw, generator=gen) < 0.5).to(device)
        for pname, partner in partners(batch, device).items():
            x = make_images((batch, 3, gh * cell_h, gw * cell_w), torch.float32, "contiguous", device)
            want, _ = reference.mask_paste(x, mask, partner)
            got, _ = tk.mask_paste(x.clone(), mask, partner, inplace=True, impl=impl)
            assert_equal(f"trial {trial} {pname} {batch}x{gh * cell_h}x{gw * cell_w} cells {gh}x{gw}", got, want)


@pytest.mark.parametrize("impl", IMPLS)
def test_tiny_batches(seed, device, poison_empty, impl):
    skip_unrunnable(impl, device)
    one = torch.randn(1, 3, 6, 9).to(device)  # a batch of one is its own partner
    mixed, token_mask = tk.mask_paste(one, torch.ones(1, 2, 3, dtype=torch.bool, device=device), impl=impl)
    assert_equal("B=1", mixed, one)
    assert token_mask is None
    empty, empty_mask = tk.mask_paste(torch.randn(0, 3, 6, 9, device=device),
                                      torch.zeros(0, 2, 3, dtype=torch.bool, device=device),
                                      token_grid=(2, 3), impl=impl)
    assert empty.shape == (0, 3, 6, 9) and empty_mask.shape == (0, 6)
    nothing = torch.randn(0, 3, 6, 9, device=device)
    _, empty_mask = tk.mask_paste(nothing, torch.zeros(0, 2, 3, device=device), token_grid=(2, 3), inplace=True,
                                  impl=impl)
    assert empty_mask.shape == (0, 6)


def test_auto_runs_triton_on_cuda_and_torch_on_cpu(monkeypatch, seed, device):
    ran = []
    for op, kind in ((MASK_PASTE, "out"), (MASK_PASTE_INPLACE, "in")):
        for name, kernel in dict(op.kernels).items():
            def spy(*args, _name=name, _kernel=kernel, _kind=kind, **kwargs):
                ran.append(f"{_kind}:{_name}")
                return _kernel(*args, **kwargs)
            monkeypatch.setitem(op.kernels, name, spy)
    x = torch.randn(2, 3, 4, 6, device=device)
    mask = torch.ones(2, 2, 3, dtype=torch.bool, device=device)
    tk.mask_paste(x, mask)
    tk.mask_paste(x, mask, inplace=True)
    want = "triton" if device.type == "cuda" else "torch"
    assert ran == [f"out:{want}", f"in:{want}"]


# ---------------------------------------------------------------- bad input

B, C, H, W = 4, 3, 30, 42


@pytest.fixture
def inputs(seed):
    """Valid inputs: a 5x7 grid of 6x6-pixel cells; each case spoils one of them."""
    return {
        "images": torch.randn(B, C, H, W),
        "mask": (torch.rand(B, 5, 7) < 0.5).float(),
        "partner": torch.randperm(B),
    }


@pytest.fixture
def no_work(monkeypatch):
    """Tripwires on every backend: a check that runs after work started fails the test."""

    def tripwire(*args, **kwargs):
        raise AssertionError("work started before the inputs were validated")

    for op in (MASK_PASTE, MASK_PASTE_INPLACE):
        for backend in op.kernels:
            monkeypatch.setitem(op.kernels, backend, tripwire)


def paste(t, **kw):
    args = {"images": t["images"], "mask": t["mask"], "partner": t["partner"], **kw}
    return tk.mask_paste(args.pop("images"), args.pop("mask"), args.pop("partner"), **args)


def mask_with(t, index, value):
    mask = t["mask"].clone()
    mask[index] = value
    return mask


def case(call, exc, match, id):
    return pytest.param(call, exc, match, id=id)


CASES = [
    case(lambda t: paste(t, images=t["images"][0]), ValueError, r"images must have 4 dimensions", "images-rank"),
    case(lambda t: paste(t, images=t["images"].double()), TypeError, r"images must have dtype", "images-f64"),
    case(lambda t: paste(t, images=t["images"].numpy()), TypeError, r"images must be a torch.Tensor", "images-numpy"),
    case(lambda t: paste(t, mask=t["mask"].flatten(1)), ValueError, r"mask must have 3 dimensions", "mask-rank"),
    case(lambda t: paste(t, mask=t["mask"].long()), TypeError, r"mask must have dtype", "mask-int64"),
    case(lambda t: paste(t, mask=t["mask"].numpy()), TypeError, r"mask must be a torch.Tensor", "mask-numpy"),
    case(lambda t: paste(t, mask=t["mask"].to("meta")), ValueError, r"mask must be on cpu", "mask-device"),
    case(lambda t: paste(t, mask=t["mask"][:3]), ValueError, r"mask must have batch size 4", "mask-batch"),
    case(lambda t: paste(t, mask=mask_with(t, (2, 4, 6), 2.0)), ValueError,
         r"mask must hold only 0 and 1 .* got 2.0 at index \(2, 4, 6\)", "mask-two"),
    case(lambda t: paste(t, mask=mask_with(t, (1, 0, 3), -1.0)), ValueError, r"mask must hold only 0 and 1",
         "mask-negative"),
    case(lambda t: paste(t, mask=mask_with(t, (0, 2, 2), 0.5)), ValueError, r"got 0.5 at index \(0, 2, 2\)",
         "mask-half"),
    case(lambda t: paste(t, mask=mask_with(t, (3, 1, 1), float("nan"))), ValueError, r"got nan", "mask-nan"),
    case(lambda t: paste(t, mask=mask_with(t, (3, 1, 1), 1.0).to(torch.uint8) * 3), ValueError,
         r"mask must hold only 0 and 1", "mask-uint8-three"),
    case(lambda t: paste(t, mask=torch.zeros(B, 4, 7)), ValueError,
         r"mask's 4x7 cell grid must split the 30x42 image into equal cells", "grid-rows-not-dividing"),
    case(lambda t: paste(t, mask=torch.zeros(B, 5, 8)), ValueError, r"cell grid must split", "grid-cols-not-dividing"),
    case(lambda t: paste(t, mask=torch.zeros(B, 0, 7)), ValueError, r"cell grid must split", "grid-empty"),
    case(lambda t: paste(t, mask=torch.zeros(B, 60, 7)), ValueError, r"cell grid must split", "grid-larger-than-image"),
    case(lambda t: paste(t, token_grid=(4, 7)), ValueError, r"token_grid \(4, 7\) must split the 30x42 image",
         "tokens-not-dividing"),
    case(lambda t: paste(t, token_grid=(3, 7)), ValueError,
         r"cell \(6x6 pixels\) is not a multiple of the patch \(10x6 pixels\)", "cell-not-patch-aligned-rows"),
    case(lambda t: paste(t, token_grid=(15, 3)), ValueError, r"is not a multiple of the patch",
         "cell-not-patch-aligned-cols"),
    case(lambda t: paste(t, mask=torch.zeros(B, 10, 14), token_grid=(5, 7)), ValueError,
         r"is not a multiple of the patch", "cell-smaller-than-patch"),
    case(lambda t: paste(t, token_grid=(0, 7)), ValueError, r"token_grid must hold positive ints", "tokens-zero"),
    case(lambda t: paste(t, token_grid=5), ValueError, r"token_grid must be a \(gh, gw\) pair", "tokens-int"),
    case(lambda t: paste(t, partner=torch.tensor([0, 1, 2, B])), ValueError, r"partner must hold values in \[0, 4\)",
         "partner-high"),
    case(lambda t: paste(t, partner=t["partner"][:3]), ValueError, r"partner must have shape \(4,\)", "partner-length"),
    case(lambda t: paste(t, partner=t["partner"].int()), TypeError, r"partner must have dtype", "partner-int32"),
    case(lambda t: paste(t, partner=t["partner"].to("meta")), ValueError, r"partner must be on cpu", "partner-device"),
    case(lambda t: paste(t, inplace=1), TypeError, r"inplace must be a bool", "inplace-type"),
    case(lambda t: paste(t, images=t["images"][..., ::2], mask=t["mask"][..., :3], inplace=True), ValueError,
         r"inplace=True needs images contiguous", "inplace-strided"),
    case(lambda t: paste(t, impl="cuda"), ValueError, r"impl must be one of", "impl"),
]


@pytest.mark.parametrize("call, exc, match", CASES)
def test_bad_input(inputs, no_work, call, exc, match):
    raises_and_leaves_inputs(inputs, no_work, call, exc, match)


def test_triton_on_cpu_without_interpreter(monkeypatch, inputs, no_work):
    monkeypatch.setattr(dispatch_module, "TRITON_INTERPRET", False)
    with pytest.raises(RuntimeError, match=r"impl='triton' got CPU tensors"):
        paste(inputs, impl="triton", inplace=True)


@pytest.mark.parametrize("inplace", (False, True))
def test_tripwires_are_armed(inputs, no_work, inplace):
    """The no_work fixture really catches work: valid input reaches a tripwire."""
    with pytest.raises(AssertionError, match="work started"):
        paste(inputs, inplace=inplace, token_grid=(15, 21))
