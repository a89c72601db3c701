"""--mix: the factory's timm-side mixers (none, mixup, cutmix, transmix) keep TransMix's interface
and mean what the flags say (the compared variants have their own tests)."""

from __future__ import annotations

import pytest
import timm
import torch

from transmix_train.config import MIX_CHOICES, parse_args
from transmix_train.mixers import create_mixer, MIXERS


@pytest.fixture(scope="module")
def model():
    return timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                             num_classes=10)


BASE = ("none", "mixup", "cutmix", "transmix")


def test_choices_are_the_registry():
    assert MIX_CHOICES == tuple(MIXERS)
    assert set(BASE) <= set(MIX_CHOICES)


@pytest.mark.parametrize("name", BASE)
def test_mixer_interface(model, name):
    args = parse_args(["--mix", name, "--smoothing", "0.1"])
    mixing = create_mixer(args, 10, model, seed=0)
    assert mixing.uses_attention == (name == "transmix")
    images = torch.randn(8, 3, 16, 16)
    original = images.clone()
    target = torch.arange(8) % 10
    kinds = set()
    for _ in range(20):
        images.copy_(original)
        mixed, state = mixing.mixer(images, target)
        assert mixed is images  # in place, as timm
        targets = state.targets(None)
        assert targets.shape == (8, 10)
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
        kinds.add(getattr(state, "kind", "none"))
    if name == "none":
        assert torch.equal(images, original)
        assert float(targets.max()) == pytest.approx(0.91)
    elif name == "mixup":
        assert kinds == {"mixup"}
    else:
        assert kinds == {"mixup", "cutmix"}  # timm's switch between the two, prob 0.5 each
