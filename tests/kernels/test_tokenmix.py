"""tk.TokenMix: the block-wise token masks, the pasted images, the teacher and teacher-free labels,
seeding and argument checks.

The label tests re-derive the official rules (Sense-X/TokenMix tokenmix.py) inside the test: the
teacher rule from random activation maps in float64, the teacher-free TransMix rule from the class
attention of a tiny timm ViT recomputed by hand from its last block's qkv weights.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import tiny_models
from test_mixpro import check_seeding, last_block_class_attention, smoothed_one_hot

import transmix_kernels as tk
from conftest import assert_close, assert_equal
from transmix_kernels.tokenmix import block_mask

ATOL = 1e-5
TOKEN_ONLY = dict(mixup_alpha=0.0)


def official_block_mask(rng: np.random.Generator, height: int, width: int, num_masked: int) -> np.ndarray:
    """generate_mask of the official tokenmix.py, line by line, with NumPy draws in its order."""
    mask = np.zeros((height, width), dtype=int)
    log_aspect_ratio = (math.log(0.3), math.log(1 / 0.3))
    mask_count = 0
    while mask_count < num_masked:
        max_mask_patches = min(num_masked - mask_count, width * height)
        delta = 0
        for _attempt in range(10):
            target_area = rng.uniform(1, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                num_masked_here = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked_here <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        mask_count += delta
    return mask.astype(bool)


@pytest.mark.parametrize("grid, num_masked", [((14, 14), 112), ((6, 6), 20), ((5, 9), 30), ((14, 14), 196)])
def test_block_mask_is_the_official_generator(grid, num_masked):
    for seed in range(20):
        mask, blocks = block_mask(np.random.default_rng(seed), grid, num_masked)
        assert_equal(f"seed {seed}", torch.from_numpy(mask), torch.from_numpy(
            official_block_mask(np.random.default_rng(seed), *grid, num_masked)))
        assert mask.sum() <= num_masked
        union = np.zeros(grid, dtype=bool)
        for top, left, h, w in blocks:
            assert 1 <= h < grid[0] and 1 <= w < grid[1], "blocks are smaller than the grid"
            # sides round sqrt(area * aspect) and sqrt(area / aspect), aspect in [0.3, 1/0.3]
            assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 and (h + 0.5) / (w - 0.5 if w > 0.5 else 1e-9) >= 0.3
            assert not union[top:top + h, left:left + w].all(), "each block adds new tokens"
            union[top:top + h, left:left + w] = True
        assert np.array_equal(union, mask), "the mask is the union of its blocks"


def test_masks_have_several_regions():
    """TokenMix partitions the mixed region into several parts (not one box as CutMix)."""
    counts = [len(block_mask(np.random.default_rng(s), (14, 14), 112)[1]) for s in range(50)]
    assert np.mean(counts) > 2 and min(counts) >= 1


def test_images_state_and_area_label(seed):
    batch, classes, patch = 6, 7, 4
    mixer = tk.TokenMix(classes, patch_size=patch, seed=2, min_tokens=3, **TOKEN_ONLY)
    for _ in range(4):
        x = torch.randn(batch, 3, 24, 32)
        x_orig, target = x.clone(), torch.randint(0, classes, (batch,))
        images, mix = mixer(x, target)
        assert images is x and mix.kind == "cutmix" and mix.token_grid == (6, 8)
        assert mix.mask.shape == (batch, 6, 8) and bool((mix.mask == mix.mask[0]).all()), "one mask per batch"
        assert mix.partner.tolist() == list(range(batch - 1, -1, -1))
        masked = int(mix.mask[0].sum())
        assert 0 < masked <= mixer.num_masked((6, 8)) == min(48, int(0.5 * 48) + 3)
        assert_equal("lam_area", mix.lam_area, torch.full((batch,), 1 - masked / 48))
        pixel = mix.mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1)
        assert_equal("pasted tokens", images, torch.where(pixel, x_orig.flip(0), x_orig))
        assert_equal("token mask", mix.token_mask, mix.mask.flatten(1).float())
        lam = mix.lam_area.double()[:, None]
        want = lam * smoothed_one_hot(target, classes, 0.1) + (1 - lam) * smoothed_one_hot(target.flip(0), classes, 0.1)
        assert_close("area targets", mix.targets(), want, atol=1e-6)
        assert bool((mix.lam >= 0).all() and (mix.lam <= 1).all())


def test_teacher_rule_rederived(seed):
    """Official Mixup.__call__: normalised maps, own share outside the mask, partner's inside it,
    targets y1 + y2 with half the smoothing on each."""
    batch, classes, s = 6, 9, 0.1
    mixer = tk.TokenMix(classes, patch_size=4, seed=4, **TOKEN_ONLY)
    target = torch.tensor([0, 3, 3, 8, 1, 3])
    _, mix = mixer(torch.randn(batch, 3, 24, 24), target)
    maps = torch.rand(batch, 12, 12) ** 3  # a 2 x 2 map cell per token
    a = maps.double() / (maps.double().sum((1, 2), keepdim=True) + 1e-8)
    m = torch.from_numpy(np.kron(mix.mask.numpy(), np.ones((1, 2, 2)))).double()
    lam_own = (a * (1 - m)).sum((1, 2))
    lam_partner = (a.flip(0) * m).sum((1, 2))
    off = s / classes
    y1 = torch.full((batch, classes), off / 2, dtype=torch.float64)
    y1[torch.arange(batch), target] = lam_own - s / 2 + off / 2
    y2 = torch.full((batch, classes), off / 2, dtype=torch.float64)
    y2[torch.arange(batch), target.flip(0)] = lam_partner - s / 2 + off / 2
    got = mix.targets(activation_maps=maps)
    assert_close("teacher targets", got, y1 + y2, atol=ATOL)
    assert_close("rows sum to lam_own + lam_partner", got.double().sum(1), lam_own + lam_partner, atol=ATOL)
    assert_close("lambdas", mix.lambdas(activation_maps=maps), lam_own, atol=ATOL)
    # Maps at the token grid itself, and the normalised variant (rows sum to 1).
    normalized = tk.TokenMix(classes, patch_size=4, seed=4, normalize_teacher=True, **TOKEN_ONLY)
    _, mix = normalized(torch.randn(batch, 3, 24, 24), target)
    maps = torch.rand(batch, 6, 6)
    a = maps.double() / maps.double().sum((1, 2), keepdim=True)
    m = mix.mask.double()
    lam_own, lam_partner = (a * (1 - m)).sum((1, 2)), (a.flip(0) * m).sum((1, 2))
    lam = (lam_own / (lam_own + lam_partner))[:, None]
    want = lam * smoothed_one_hot(target, classes, s) + (1 - lam) * smoothed_one_hot(target.flip(0), classes, s)
    got = mix.targets(activation_maps=maps)
    assert_close("normalised teacher targets", got, want, atol=ATOL)
    assert_close("rows sum to 1", got.double().sum(1), torch.ones(batch, dtype=torch.float64), atol=1e-6)


def test_teacher_free_rule_rederived_on_a_tiny_vit(seed):
    """TransMix's rule on the token mask: lam = ratio * lam_area + (1 - ratio) * lam_attn."""
    model = tiny_models.vit(img=48)  # patch 8: 6 x 6 tokens
    classes, ratio = 5, 0.3
    mixer = tk.TokenMix(classes, model=model, seed=8, ratio=ratio, min_tokens=4, **TOKEN_ONLY)
    with tk.ClassAttentionProbe(model) as probe:
        for _ in range(3):
            target = torch.randint(0, classes, (4,))
            images, mix = mixer(torch.randn(4, 3, 48, 48), target)
            _, attn = last_block_class_attention(model, images)
            pasted = mix.mask.flatten(1).double()
            lam_area = 1 - pasted.mean(1)
            lam = ratio * lam_area + (1 - ratio) * (attn * (1 - pasted)).sum(1) / attn.sum(1)
            want = lam[:, None] * smoothed_one_hot(target, classes, 0.1) + \
                (1 - lam[:, None]) * smoothed_one_hot(target.flip(0), classes, 0.1)
            assert_close("targets(probe)", mix.targets(probe), want, atol=ATOL)
            assert_close("targets(attention)", mix.targets(attn.float()), want, atol=ATOL)
            assert_close("lambdas(probe)", mix.lambdas(probe), lam, atol=ATOL)
            assert_close("rows sum to 1", mix.targets(probe).double().sum(1), torch.ones(4, dtype=torch.float64),
                         atol=1e-6)


def test_mixup_and_unmixed_batches_keep_the_area_label(seed):
    mixer = tk.TokenMix(5, patch_size=4, seed=0, switch_prob=0.0)  # every mixed batch is Mixup
    x, target = torch.randn(4, 3, 16, 16), torch.arange(4)
    images, mix = mixer(x.clone(), target)
    assert mix.kind == "mixup" and mix.mask is None
    assert_close("Mixup images", images, x * mix.lam[0] + x.flip(0) * (1 - mix.lam[0]), atol=1e-6)
    attn = torch.softmax(torch.randn(4, 16), -1)
    assert_equal("teacher maps ignored", mix.targets(activation_maps=torch.rand(4, 4, 4)), mix.area_targets())
    assert_equal("attention ignored", mix.targets(attn), mix.area_targets())
    off = tk.TokenMix(5, patch_size=4, seed=0, prob=0.0)
    images, mix = off(x.clone(), target)
    assert mix.kind == "none" and torch.equal(images, x)
    assert_equal("unmixed", mix.targets(attn), tk.mix_targets(target, torch.ones(4), 5))


def test_seed_generator_and_state_dict(seed):
    check_seeding(lambda **kw: tk.TokenMix(5, patch_size=4, min_tokens=2, **kw))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(), ValueError, "TokenMix mixes whole tokens: give patch_size, token_grid or model"),
    (dict(patch_size=(4, 0)), ValueError, "patch_size must be a positive int"),
    (dict(patch_size=4, mask_ratio=1.5), ValueError, r"mask_ratio must be in \[0.0, 1.0\]"),
    (dict(patch_size=4, min_tokens=-1), ValueError, "min_tokens must be an int >= 0"),
    (dict(patch_size=4, min_aspect=0.0), ValueError, "min_aspect must be in"),
    (dict(patch_size=4, mixup_alpha=-1.0), ValueError, "mixup_alpha must be a finite number >= 0"),
    (dict(patch_size=4, ratio=None), TypeError, "ratio must be a number"),
    (dict(patch_size=4, seed=1, generator=np.random.default_rng()), ValueError, "seed or generator, not both"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        tk.TokenMix(5, **kwargs)


def test_bad_calls_and_maps(seed):
    mixer = tk.TokenMix(5, patch_size=4, seed=0, **TOKEN_ONLY)
    x = torch.randn(4, 3, 16, 18)
    x_orig = x.clone()
    with pytest.raises(ValueError, match=r"token grid \(4, 4\) must split the 16x18 images"):
        mixer(x, torch.arange(4))
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        mixer(torch.randn(4, 3, 16, 16), torch.arange(3))
    assert_equal("images untouched", x, x_orig)
    _, mix = mixer(torch.randn(4, 3, 16, 16), torch.arange(4))
    attn = torch.softmax(torch.randn(4, 16), -1)
    with pytest.raises(ValueError, match="not both"):
        mix.targets(attn, activation_maps=torch.rand(4, 4, 4))
    with pytest.raises(ValueError, match=r"activation_maps must be \(B, h, w\) with \(h, w\) a multiple"):
        mix.targets(activation_maps=torch.rand(4, 6, 4))
    with pytest.raises(ValueError, match="activation_maps must have 3 dimensions"):
        mix.targets(activation_maps=torch.rand(4, 16))
    with pytest.raises(ValueError, match="activation_maps must have batch size 4"):
        mix.targets(activation_maps=torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match="activation_maps must be finite and non-negative"):
        mix.targets(activation_maps=torch.rand(4, 4, 4) - 0.5)
    with pytest.raises(TypeError, match="activation_maps must have dtype"):
        mix.targets(activation_maps=torch.ones(4, 4, 4, dtype=torch.int64))
