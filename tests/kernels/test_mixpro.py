"""tk.MixPro: MaskMix's grid masks and images, the area label, PAL, seeding and argument checks.

The PAL test re-derives the official rule (fistyee/MixPro main.py / utils.py) inside the test on a
tiny timm ViT: the class attention is recomputed by hand from the last block's qkv weights, the
token mask from the cell mask by repetition, and the label from the formulas, in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import tiny_models

import transmix_kernels as tk
from conftest import assert_close, assert_equal

ATOL = 1e-5
MASKMIX_ONLY = dict(maskmix_prob=1.0)


def last_block_class_attention(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, a): a = the class token's softmax attention to the patch tokens in the last block,
    heads averaged, float64, recomputed from the block's input and its qkv weights (timm ViT)."""
    attn_module = model.blocks[-1].attn
    seen = {}
    handle = attn_module.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0].detach()))
    with torch.no_grad():
        logits = model(images)
    handle.remove()
    x = seen["x"].double()
    batch, tokens, dim = x.shape
    heads = attn_module.num_heads
    qkv = torch.nn.functional.linear(x, attn_module.qkv.weight.double(),
                                     None if attn_module.qkv.bias is None else attn_module.qkv.bias.double())
    q, k, _ = qkv.reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    q, k = attn_module.q_norm(q.float()).double(), attn_module.k_norm(k.float()).double()
    probs = torch.softmax(q @ k.transpose(-2, -1) * (dim // heads) ** -0.5, dim=-1)
    prefix = model.num_prefix_tokens
    return logits, probs[:, :, 0, prefix:].mean(1)


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, dtype=torch.float64)
    out[torch.arange(labels.shape[0]), labels] = 1 - smoothing + off
    return out


def expected_pixels(x_orig: torch.Tensor, cells: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """Each pixel from the partner where its cell is pasted (cells repeated by hand)."""
    _, _, height, width = x_orig.shape
    gh, gw = cells.shape[1:]
    pixel = cells.repeat_interleave(height // gh, 1).repeat_interleave(width // gw, 2).unsqueeze(1)
    return torch.where(pixel, x_orig[partner], x_orig)


def test_maskmix_masks_images_and_area_label(seed):
    batch, height, width, patch, cell, classes = 6, 24, 36, 4, 12, 7
    mixer = tk.MixPro(classes, mask_size=cell, patch_size=patch, seed=3, **MASKMIX_ONLY)
    for _ in range(5):
        x = torch.randn(batch, 3, height, width)
        x_orig, target = x.clone(), torch.randint(0, classes, (batch,))
        images, mix = mixer(x, target)
        assert images is x and mix.kind == "cutmix"
        gh, gw = height // cell, width // cell
        assert mix.mask.dtype == torch.bool and mix.mask.shape == (batch, gh, gw)
        own = (~mix.mask).flatten(1).sum(1)
        assert bool((own == own[0]).all()), "one ratio per batch: every sample keeps as many own cells"
        assert bool((mix.lam >= 0).all() and (mix.lam <= 1).all())
        assert_equal("lam_area = own share of cells", mix.lam_area, own.float() / (gh * gw))
        assert sorted(mix.partner.tolist()) == list(range(batch)), "pairing='random' is a permutation"
        assert_equal("pasted pixels", images, expected_pixels(x_orig, mix.mask, mix.partner))
        # Patch-aligned: each cell is whole tokens, the token mask constant inside each cell.
        th, tw = height // patch, width // patch
        per_token = mix.mask.repeat_interleave(th // gh, 1).repeat_interleave(tw // gw, 2).flatten(1).float()
        assert mix.token_grid == (th, tw)
        assert_equal("token mask", mix.token_mask, per_token)
        assert_equal("mask_for on a finer grid", mix.mask_for((th * 2, tw * 2)),
                     mix.mask.repeat_interleave(th * 2 // gh, 1).repeat_interleave(tw * 2 // gw, 2).flatten(1).float())
        lam = mix.lam_area.double().view(-1, 1)
        y_partner = smoothed_one_hot(target[mix.partner], classes, 0.1)
        want = lam * smoothed_one_hot(target, classes, 0.1) + (1 - lam) * y_partner
        assert_close("area targets", mix.area_targets(), want, atol=1e-6)
        assert_close("rows sum to 1", mix.targets().double().sum(1), torch.ones(batch, dtype=torch.float64), atol=1e-6)


def test_own_cell_count_is_ceil_of_the_beta_ratio(seed):
    """Official utils.py::MaskMix: ceil(N * r) own cells, r ~ Beta(alpha, alpha) from the generator."""
    mixer = tk.MixPro(5, mask_size=4, seed=11, mask_alpha=0.7, **MASKMIX_ONLY)
    twin = np.random.default_rng(11)
    for _ in range(4):
        _, mix = mixer(torch.randn(4, 3, 16, 20), torch.arange(4))
        ratio = twin.beta(0.7, 0.7)
        twin.permuted(np.tile(np.arange(20), (4, 1)), axis=1)  # the per-sample cell orders
        twin.permutation(4)  # the partner
        assert int((~mix.mask[0]).sum()) == math.ceil(20 * ratio)


def test_pal_rederived_on_a_tiny_vit(seed):
    """PAL from the official formulas, by hand: lam_attn over own tokens, alpha = cos(area label,
    softmax(logits)), lam = alpha * lam_attn + (1 - alpha) * lam_area, hard-label targets."""
    model = tiny_models.vit(img=48)  # patch 8: 6 x 6 tokens
    classes = 5
    mixer = tk.MixPro(classes, mask_size=16, patch_size=8, seed=7, **MASKMIX_ONLY)
    with tk.ClassAttentionProbe(model) as probe:
        for _ in range(3):
            images, target = torch.randn(4, 3, 48, 48), torch.randint(0, classes, (4,))
            images, mix = mixer(images, target)
            logits, attn = last_block_class_attention(model, images)  # the probe saw this forward too
            own = (~mix.mask).repeat_interleave(2, 1).repeat_interleave(2, 2).flatten(1).double()
            lam_attn = (attn * own).sum(1) / attn.sum(1)
            lam_area = own.mean(1)
            y_own = smoothed_one_hot(target, classes, 0.1)
            y_partner = smoothed_one_hot(target[mix.partner], classes, 0.1)
            area_label = lam_area[:, None] * y_own + (1 - lam_area[:, None]) * y_partner
            probs = torch.softmax(logits.double(), -1)
            alpha = (area_label * probs).sum(1) / (area_label.norm(dim=1) * probs.norm(dim=1))
            lam = alpha * lam_attn + (1 - alpha) * lam_area
            hard = lam[:, None] * smoothed_one_hot(target, classes, 0.0) + \
                (1 - lam[:, None]) * smoothed_one_hot(target[mix.partner], classes, 0.0)
            assert_close("alpha", mix.progressive_factor(logits), alpha, atol=ATOL)
            assert_close("lambdas(probe)", mix.lambdas(probe, logits=logits), lam, atol=ATOL)
            assert_close("targets(probe)", mix.targets(probe, logits=logits), hard, atol=ATOL)
            assert_close("targets(attention tensor)", mix.targets(attn.float(), logits=logits), hard, atol=ATOL)
            assert_close("rows sum to 1", mix.targets(probe, logits=logits).double().sum(1),
                         torch.ones(4, dtype=torch.float64), atol=1e-6)
            assert not torch.allclose(lam.float(), mix.lam_area), "attention must move the label"


def test_pal_smoothing_and_non_maskmix_batches_keep_area(seed):
    x, target = torch.randn(4, 3, 16, 16), torch.arange(4)
    attn, logits = torch.softmax(torch.randn(4, 16), -1), torch.randn(4, 5)
    smooth = tk.MixPro(5, mask_size=8, patch_size=4, seed=1, pal_smoothing=0.1, **MASKMIX_ONLY)
    _, mix = smooth(x.clone(), target)
    want = tk.mix_targets(target, mix.lambdas(attn, logits=logits), 5, partner=mix.partner, smoothing=0.1)
    assert_equal("pal_smoothing", mix.targets(attn, logits=logits), want)
    # maskmix_prob 0: timm's Mixup / CutMix branch; its batches keep the area label under PAL.
    timm_only = tk.MixPro(5, mask_size=8, patch_size=4, seed=1, maskmix_prob=0.0, mixup_alpha=0.0)
    for _ in range(3):
        _, mix = timm_only(x.clone(), target)
        assert mix.mask is None and mix.kind == "cutmix" and mix.boxes.shape == (4, 4)
        assert_equal("area label", mix.targets(attn, logits=logits), mix.area_targets())


def draws(mixer, calls: int = 3, batch: int = 6) -> list:
    """(images, lam, partner, area targets) of ``calls`` calls on fixed batches (shared with TokenMix's tests)."""
    out = []
    for call in range(calls):
        x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(call))
        images, mix = mixer(x, torch.arange(batch) % 5)
        out.append((images, mix.lam, mix.partner, mix.targets()))
    return out


def assert_same_draws(name: str, a: list, b: list) -> None:
    for call, (x, y) in enumerate(zip(a, b)):
        for what, t_a, t_b in zip(("images", "lam", "partner", "targets"), x, y):
            assert_equal(f"{name}: call {call} {what}", t_a, t_b)


def check_seeding(make) -> None:
    """Same seed, same draws; a shared generator is the stream drawn from; state_dict resumes the draws.
    ``make(**kw)`` builds the mixer (shared with TokenMix's tests)."""
    assert_same_draws("same seed", draws(make(seed=5)), draws(make(seed=5)))
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(draws(make(seed=5)), draws(make(seed=6))))
    shared = np.random.default_rng(5)
    mixer = make(generator=shared)
    assert mixer.rng is shared
    assert_same_draws("generator vs seed", draws(mixer), draws(make(seed=5)))
    mixer = make(seed=9)
    draws(mixer, calls=2)
    state = mixer.state_dict()
    expected = draws(mixer)
    resumed = make(seed=10)
    resumed.load_state_dict(state)
    assert_same_draws("after load_state_dict", draws(resumed), expected)
    with pytest.raises(ValueError, match=f"state must be a {type(mixer).__name__}.state_dict"):
        resumed.load_state_dict({"rng": 1})
    with pytest.raises(ValueError, match="seed or generator, not both"):
        make(seed=1, generator=shared)


def test_seed_generator_and_state_dict(seed):
    check_seeding(lambda **kw: tk.MixPro(5, mask_size=4, patch_size=4, **kw))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(mask_size=6, patch_size=4), ValueError, "mask_size .* must be a multiple of patch_size"),
    (dict(mask_size=None), ValueError, "mask_size must be a positive int"),
    (dict(mask_size=0), ValueError, "mask_size must be a positive int"),
    (dict(mask_size=4, mask_alpha=0.0), ValueError, "mask_alpha must be > 0"),
    (dict(mask_size=4, maskmix_prob=1.5), ValueError, r"maskmix_prob must be in \[0.0, 1.0\]"),
    (dict(mask_size=4, pal_smoothing="a"), TypeError, "pal_smoothing must be a number"),
    (dict(mask_size=4, pairing="shift"), ValueError, "pairing must be one of"),
    (dict(mask_size=4, impl="cuda"), ValueError, "impl must be one of"),
    (dict(mask_size=4, maskmix_prob=0.5, mixup_alpha=0.0, cutmix_alpha=0.0), ValueError, "nothing to mix"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        tk.MixPro(5, **kwargs)


def test_bad_calls_leave_images_untouched(seed):
    mixer = tk.MixPro(5, mask_size=8, patch_size=4, seed=0, **MASKMIX_ONLY)
    x = torch.randn(4, 3, 16, 16)
    x_orig = x.clone()
    with pytest.raises(ValueError, match="mask_size .* must divide the 16x20 images"):
        mixer(torch.randn(4, 3, 16, 20), torch.arange(4))
    with pytest.raises(TypeError, match="target must have dtype"):
        mixer(x, torch.arange(4).int())
    with pytest.raises(ValueError, match=r"target must hold values in \[0, 5\)"):
        mixer(x, torch.arange(4) + 3)
    with pytest.raises(TypeError, match="images must have dtype"):
        mixer(x.double(), torch.arange(4))
    assert_equal("images untouched", x, x_orig)
    _, mix = mixer(x, torch.arange(4))
    attn = torch.softmax(torch.randn(4, 16), -1)
    with pytest.raises(ValueError, match="logits is required with attention"):
        mix.targets(attn)
    with pytest.raises(ValueError, match=r"logits must have shape \(4, 5\)"):
        mix.targets(attn, logits=torch.randn(4, 6))
    with pytest.raises(ValueError, match="attention has batch size 3"):
        mix.targets(attn[:3], logits=torch.randn(4, 5))


def test_disabled_and_flip_pairing(seed):
    x = torch.randn(4, 3, 16, 16)
    mixer = tk.MixPro(5, mask_size=8, patch_size=4, seed=0, pairing="flip", **MASKMIX_ONLY)
    _, mix = mixer(x.clone(), torch.arange(4))
    assert mix.partner.tolist() == [3, 2, 1, 0]
    mixer.mixup_enabled = False
    images, mix = mixer(x.clone(), torch.arange(4))
    assert mix.kind == "none" and torch.equal(images, x)
    assert_equal("unmixed", mix.targets(torch.softmax(torch.randn(4, 16), -1), logits=torch.randn(4, 5)),
                 tk.mix_targets(torch.arange(4), torch.ones(4), 5))
