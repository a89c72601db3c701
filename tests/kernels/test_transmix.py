"""tk.TransMix and MixState: mixing in place, the state it reports, and the labels it gives.

The first test re-derives the official TransMix label rule (one box per batch, flipped partner)
inside the test, without calling our code, and compares mix.targets(attn) with it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import transmix_kernels as tk
from conftest import assert_close, assert_equal
from transmix_kernels import reference
from transmix_kernels._dispatch import TRITON_INTERPRET

ATOL = 1e-6
CONFIGS = {  # TransMix keyword arguments per kind of mixing
    "cutmix": dict(mixup_alpha=0.0, cutmix_alpha=1.0),
    "mixup": dict(mixup_alpha=0.8, cutmix_alpha=0.0),
    "both": dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5),
}


def random_attention(batch, heads, n_tokens, device="cpu"):
    return torch.softmax(torch.randn(batch, heads, n_tokens + 1) * 2, -1)[..., 1:].to(device)


def skip_unrunnable(impl: str, device: torch.device) -> None:
    if impl == "triton" and device.type == "cpu" and not TRITON_INTERPRET:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest only without a GPU)")


def official_transmix_targets(x_orig, mixed, box, attn, target, num_classes, grid, smoothing):
    """The official per-batch rule, written out: returns (targets float64, lam_area)."""
    batch, _, height, width = x_orig.shape
    gh, gw = grid
    y0, y1, x0, x1 = box
    rows = torch.arange(height).view(-1, 1)
    cols = torch.arange(width).view(1, -1)
    pixel_mask = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # (H, W)
    # The paste itself: the flipped batch inside the box.
    assert torch.equal(mixed, torch.where(pixel_mask, x_orig.flip(0), x_orig)), "pasted images"
    lam_area = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    # Nearest resize to the token grid: float32 scale size / grid, source = floor(dst * scale).
    scale_h = np.float32(height) / np.float32(gh)
    scale_w = np.float32(width) / np.float32(gw)
    py = [min(int(np.floor(np.float32(i) * scale_h)), height - 1) for i in range(gh)]
    px = [min(int(np.floor(np.float32(j) * scale_w)), width - 1) for j in range(gw)]
    token_mask = pixel_mask[py][:, px].double()  # (gh, gw)
    a = attn.double().mean(1).view(batch, gh, gw)
    w1 = ((1 - token_mask) * a).sum((1, 2))
    w2 = (token_mask * a).sum((1, 2))
    lam = 0.5 * lam_area + 0.5 * w1 / (w1 + w2)
    off = smoothing / num_classes
    y_soft = torch.full((batch, num_classes), off, dtype=torch.float64)
    y_soft[torch.arange(batch), target] = 1 - smoothing + off
    return lam.view(-1, 1) * y_soft + (1 - lam.view(-1, 1)) * y_soft.flip(0), lam_area, y_soft


@pytest.mark.parametrize("batch", (6, 5))
@pytest.mark.parametrize("impl", ("torch", "triton"))
def test_official_per_batch_rule(seed, device, impl, batch):
    skip_unrunnable(impl, device)
    height, width, patch, heads, num_classes, smoothing = 29, 35, 4, 3, 11, 0.1
    grid = (height // patch, width // patch)
    for call_seed in range(3):
        x = torch.randn(batch, 3, height, width)
        x_orig = x.clone()
        target = torch.randint(0, num_classes, (batch,))
        mixer = tk.TransMix(num_classes, mode="batch", mixup_alpha=0.0, cutmix_alpha=1.0, patch_size=patch,
                            label_smoothing=smoothing, seed=call_seed, impl=impl)
        images, mix = mixer(x.to(device), target.to(device))
        box = [int(v) for v in mix.boxes[0]]
        assert bool((mix.boxes == mix.boxes[0]).all()), "one box for the batch"
        attn = random_attention(batch, heads, grid[0] * grid[1])
        want, lam_area, y_soft = official_transmix_targets(x_orig, images.cpu(), box, attn, target, num_classes, grid,
                                                           smoothing)
        assert_close(f"targets(attn) seed {call_seed}", mix.targets(attn.to(device)), want, atol=ATOL)
        area_want = lam_area * y_soft + (1 - lam_area) * y_soft.flip(0)
        assert_close(f"targets() seed {call_seed}", mix.targets(), area_want, atol=ATOL)


def expected_images(x_orig, mix):
    """Rebuild the mixed batch from the state: pastes from the reference, blends by formula."""
    x_orig = x_orig.cpu()
    out, _ = reference.cutmix_paste(x_orig, mix.boxes.cpu(), mix.partner.cpu())  # empty boxes: rows unchanged
    lam, partner = mix.lam.float().cpu(), mix.partner.cpu()
    for r in range(x_orig.shape[0]):
        if not bool(mix.cutmix[r]) and float(lam[r]) < 1.0:
            out[r] = x_orig[r] * lam[r] + x_orig[partner[r]] * (1 - lam[r])
    return out


def check_state(mix, mode, batch, height, width):
    assert mix.partner.dtype == torch.int64 and torch.equal(mix.partner, torch.arange(batch - 1, -1, -1))
    assert mix.boxes.dtype == torch.int32 and mix.boxes.shape == (batch, 4)
    assert mix.cutmix.dtype == torch.bool and mix.cutmix.shape == (batch,)
    assert mix.lam.dtype == (torch.float64 if mode == "batch" else torch.float32) and mix.lam.shape == (batch,)
    assert mix.lam_area.dtype == torch.float32
    b = mix.boxes.long()
    assert bool(((0 <= b[:, 0]) & (b[:, 0] <= b[:, 1]) & (b[:, 1] <= height)).all())
    assert bool(((0 <= b[:, 2]) & (b[:, 2] <= b[:, 3]) & (b[:, 3] <= width)).all())
    area = (b[:, 1] - b[:, 0]) * (b[:, 3] - b[:, 2])
    assert bool((area[~mix.cutmix] == 0).all()), "rows without CutMix must have empty boxes"
    # CutMix rows: lam is the visible share (correct_lam), computed in float64, kept in lam's dtype.
    area_lam = (1.0 - area.double() / (height * width)).to(mix.lam.dtype)
    assert_equal("cutmix lam", mix.lam[mix.cutmix], area_lam[mix.cutmix])
    assert bool(((mix.lam >= 0) & (mix.lam <= 1)).all())
    if mode == "batch":
        assert bool((mix.boxes == mix.boxes[0]).all()) and bool((mix.lam == mix.lam[0]).all())
        assert mix.kind in ("cutmix", "mixup", "none")
    if mode == "pair":
        assert torch.equal(mix.boxes, mix.boxes.flip(0)) and torch.equal(mix.lam, mix.lam.flip(0))
        assert torch.equal(mix.cutmix, mix.cutmix.flip(0))
    blend = ~mix.cutmix & (mix.lam < 1)
    want_kind = ("cutmix" if bool(mix.cutmix.all()) else "mixup" if bool(blend.all())
                 else "none" if not bool((mix.cutmix | blend).any()) else "mixed")
    assert mix.kind == want_kind, (mix.kind, mix.cutmix, mix.lam)


@pytest.mark.parametrize("config", CONFIGS.keys())
@pytest.mark.parametrize("mode", ("batch", "pair", "elem"))
def test_modes_state_images_and_targets(seed, mode, config):
    batch, height, width, num_classes, heads = 6, 13, 17, 10, 2
    grid = (height // 4, width // 4)
    mixer = tk.TransMix(num_classes, mode=mode, patch_size=4, seed=11, **CONFIGS[config])
    kinds = set()
    for _ in range(6):
        x = torch.randn(batch, 3, height, width)
        x_orig = x.clone()
        target = torch.randint(0, num_classes, (batch,))
        images, mix = mixer(x, target)
        kinds.add(mix.kind)
        assert images is x, "TransMix mixes in place and returns the same tensor"
        check_state(mix, mode, batch, height, width)
        assert_close(f"{mix.kind} images", images, expected_images(x_orig, mix), atol=ATOL, rtol=ATOL)
        area = mix.targets()
        assert_equal("targets() == area_targets()", area, mix.area_targets())
        assert_equal("targets() == mix_targets(lam)", area, tk.mix_targets(target, mix.lam, num_classes))
        assert_equal("lambdas()", mix.lambdas(), mix.lam.float())
        assert_close("row sums", area.double().sum(1), torch.ones(batch, dtype=torch.float64), atol=ATOL)

        attn = random_attention(batch, heads, grid[0] * grid[1])
        reweighted = mix.targets(attn)
        assert_close("row sums (attention)", reweighted.double().sum(1), torch.ones(batch, dtype=torch.float64),
                     atol=ATOL)
        rows = mix.cutmix
        assert_equal("rows without CutMix keep the area label", reweighted[~rows], area[~rows])
        if bool(rows.any()):
            assert mix.token_grid == grid
            assert_equal("token_mask", mix.token_mask, reference.cutmix_paste(x_orig, mix.boxes, token_grid=grid)[1])
            lam_t = tk.transmix_lambda(attn, mix.mask_for(grid), mix.lam_area)
            want = tk.mix_targets(target, lam_t, num_classes)
            assert_equal("CutMix rows follow transmix_lambda", reweighted[rows], want[rows])
            assert_equal("lambdas(attn)", mix.lambdas(attn)[rows], lam_t[rows])
            # (Targets can coincide when a row's partner has the same label; the lambdas cannot.)
            assert not torch.equal(lam_t[rows], mix.lam.float()[rows]), "attention must change the CutMix lambdas"
        else:
            assert mix.token_mask is None
    expected_kinds = {"cutmix": {"cutmix"}, "mixup": {"mixup"}}.get(config)
    if expected_kinds is not None:
        assert kinds == expected_kinds
    else:  # both kinds were drawn over the six calls
        assert kinds & {"cutmix", "mixed"} and kinds & {"mixup", "mixed"}, kinds


def test_token_grid_sources_and_mask_for(seed):
    x = torch.randn(4, 3, 13, 17)
    target = torch.arange(4)
    cut = CONFIGS["cutmix"]
    _, mix = tk.TransMix(5, patch_size=(4, 5), seed=0, **cut)(x.clone(), target)
    assert mix.token_grid == (3, 3) and mix.token_mask.shape == (4, 9)
    _, mix_fixed = tk.TransMix(5, token_grid=(5, 6), seed=0, **cut)(x.clone(), target)
    assert mix_fixed.token_grid == (5, 6) and mix_fixed.token_mask.shape == (4, 30)
    _, mix_none = tk.TransMix(5, seed=0, **cut)(x.clone(), target)
    assert mix_none.token_grid is None and mix_none.token_mask is None
    for state in (mix, mix_fixed, mix_none):
        assert_equal("same draws whatever the grid", state.boxes, mix.boxes)
        for grid in ((3, 3), (5, 6), (7, 2), (13, 17)):
            want = reference.cutmix_paste(x, state.boxes, token_grid=grid)[1]
            assert_equal(f"mask_for{grid}", state.mask_for(grid), want)
    assert mix.mask_for((3, 3)) is mix.token_mask  # the mask made by the paste is reused
    with pytest.raises(ValueError, match="token grid"):
        mix_none.targets(random_attention(4, 1, 9))


@pytest.mark.parametrize("mode", ("batch", "elem"))
def test_odd_batch(seed, mode):
    x = torch.randn(5, 2, 9, 11)
    x_orig = x.clone()
    _, mix = tk.TransMix(7, mode=mode, seed=5, patch_size=3, **CONFIGS["cutmix"])(x, torch.arange(5))
    assert int(mix.partner[2]) == 2
    assert_equal("the middle sample is its own partner", x[2], x_orig[2])
    assert_equal("images", x, expected_images(x_orig, mix))
    attn = random_attention(5, 2, 9)
    assert_close("row sums", mix.targets(attn).double().sum(1), torch.ones(5, dtype=torch.float64), atol=ATOL)


def test_pair_mode_needs_even_batch(seed):
    x = torch.randn(5, 2, 9, 11)
    x_orig = x.clone()
    with pytest.raises(ValueError, match="even batch"):
        tk.TransMix(7, mode="pair", seed=5)(x, torch.arange(5))
    assert_equal("images untouched", x, x_orig)


def test_determinism_by_seed(seed):
    x = torch.randn(6, 3, 13, 17)
    target = torch.randint(0, 9, (6,))

    def run(mixer_seed):
        mixer = tk.TransMix(9, mode="elem", seed=mixer_seed, patch_size=4)
        outs = []
        for _ in range(3):
            images, mix = mixer(x.clone(), target)
            outs.append((images, mix.boxes, mix.lam, mix.cutmix))
        return outs

    first, again, other = run(3), run(3), run(4)
    for (a, b) in zip(first, again):
        for t_a, t_b in zip(a, b):
            assert torch.equal(t_a, t_b)
    assert any(not torch.equal(a[0], c[0]) for a, c in zip(first, other))


def _draws(mixer: tk.TransMix, x: torch.Tensor, target: torch.Tensor, calls: int = 3) -> list:
    outs = []
    for _ in range(calls):
        images, mix = mixer(x.clone(), target)
        outs.append((images, mix.boxes, mix.lam))
    return outs


def _assert_same_draws(name: str, a: list, b: list) -> None:
    for call, (x, y) in enumerate(zip(a, b)):
        for what, t_a, t_b in zip(("images", "boxes", "lam"), x, y):
            assert_equal(f"{name}: call {call} {what}", t_a, t_b)


def test_state_dict_resumes_the_draws(seed):
    x, target = torch.randn(6, 3, 13, 17), torch.randint(0, 9, (6,))
    mixer = tk.TransMix(9, mode="elem", seed=seed, patch_size=4)
    _draws(mixer, x, target, calls=2)
    state = mixer.state_dict()
    expected = _draws(mixer, x, target)
    resumed = tk.TransMix(9, mode="elem", seed=seed + 1, patch_size=4)  # another seed: the state decides
    resumed.load_state_dict(state)
    _assert_same_draws("after load_state_dict", _draws(resumed, x, target), expected)
    with pytest.raises(ValueError, match="state must be a TransMix.state_dict"):
        resumed.load_state_dict({"rng": 1})


def test_generator_argument_is_the_stream_drawn_from(seed):
    x, target = torch.randn(6, 3, 13, 17), torch.randint(0, 9, (6,))
    shared = np.random.default_rng(seed)
    mixer = tk.TransMix(9, mode="elem", patch_size=4, generator=shared)
    assert mixer.rng is shared
    _assert_same_draws("generator vs seed", _draws(mixer, x, target),
                       _draws(tk.TransMix(9, mode="elem", patch_size=4, seed=seed), x, target))
    with pytest.raises(ValueError, match="seed or generator, not both"):
        tk.TransMix(9, seed=1, generator=shared)
    with pytest.raises(TypeError, match="generator must be a numpy.random.Generator"):
        tk.TransMix(9, generator=torch.Generator())


def test_disabled_and_zero_prob_leave_images(seed):
    x = torch.randn(4, 3, 9, 10)
    target = torch.arange(4)
    off = tk.TransMix(4, seed=0, prob=0.0, patch_size=3)
    images, mix = off(x.clone(), target)
    assert mix.kind == "none" and torch.equal(images, x) and mix.token_mask is None
    smooth = torch.full((4, 4), 0.1 / 4)
    smooth[torch.arange(4), target] = 1 - 0.1 + 0.1 / 4
    assert_equal("unmixed targets", mix.targets(random_attention(4, 1, 9)), smooth)
    disabled = tk.TransMix(4, seed=0, patch_size=3)
    disabled.mixup_enabled = False
    images, mix = disabled(x.clone(), target)
    assert mix.kind == "none" and torch.equal(images, x)


@pytest.mark.parametrize("mode", ("batch", "pair", "elem"))
def test_layouts_dtypes_and_triton(seed, device, mode):
    """channels_last and bf16 images mix like contiguous fp32 ones; impl='triton' like 'torch'."""
    skip_unrunnable("triton", device)
    target = torch.randint(0, 9, (6,)).to(device)
    attn = random_attention(6, 2, 12, device)
    for config in ("cutmix", "both"):
        kwargs = dict(mode=mode, patch_size=4, seed=21, **CONFIGS[config])
        mixers = {name: tk.TransMix(9, impl="triton" if name == "triton" else "torch", **kwargs)
                  for name in ("base", "channels_last", "triton", "bf16")}
        for _ in range(3):  # several draws: CutMix, Mixup and (elem) mixed batches
            x = torch.randn(6, 3, 13, 17).to(device)
            base_images, base = mixers["base"](x.clone(), target)
            cl = x.clone().contiguous(memory_format=torch.channels_last)
            images, mix = mixers["channels_last"](cl, target)
            assert images is cl and images.is_contiguous(memory_format=torch.channels_last)
            assert_equal(f"channels_last {config} {base.kind}", images, base_images)
            tri_images, tri = mixers["triton"](x.clone(), target)
            assert_equal(f"triton images {config} {base.kind}", tri_images, base_images)
            assert (tri.token_mask is None) == (base.token_mask is None)
            if base.token_mask is not None:
                assert_equal("triton token mask", tri.token_mask, base.token_mask)
            assert_equal("triton targets()", tri.targets(), base.targets())
            assert_close("triton targets(attn)", tri.targets(attn), base.targets(attn), atol=ATOL)
            low = x.clone().to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
            low_orig = low.clone()
            images, mix = mixers["bf16"](low, target)
            assert images.dtype == torch.bfloat16 and images.is_contiguous(memory_format=torch.channels_last)
            assert_equal("bf16 state", mix.boxes, base.boxes)
            if mix.kind == "cutmix":
                assert_equal("bf16 paste", images, reference.cutmix_paste(low_orig, mix.boxes, mix.partner)[0])
            else:  # blends round to bf16
                assert_close(f"bf16 images {mix.kind}", images, expected_images(low_orig, mix), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("grid", [None, (3, 4)], ids=["no-grid", "grid"])
def test_every_backend_pastes_the_same_images(seed, mode, grid):
    """impl="auto" (compiled or native CPU path), "torch" and "reference" mix identically, with or
    without a token grid, and the result is the reference paste of the recorded boxes."""
    images = torch.randn(6, 3, 13, 17)
    labels = torch.randint(0, 7, (6,))
    results = {}
    for impl in ("auto", "torch", "reference"):
        transmix = tk.TransMix(7, mixup_alpha=0.0, cutmix_alpha=1.0, mode=mode, token_grid=grid, seed=5, impl=impl)
        mixed, mix = transmix(images.clone(), labels)
        results[impl] = (mixed, mix)
    mixed, mix = results["reference"]
    expected, _ = tk.reference.cutmix_paste(images, mix.boxes, mix.partner)
    assert not torch.equal(expected, images), "the drawn boxes must move pixels for this test to mean anything"
    for impl, (got, got_mix) in results.items():
        assert torch.equal(got_mix.boxes, mix.boxes), impl
        assert_equal(f"{impl} mixed images", got, expected)
