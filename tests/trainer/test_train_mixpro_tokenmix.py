"""--mix mixpro and --mix tokenmix: the factory wires their flags into tk.MixPro / tk.TokenMix, and
each trains a few steps of the tiny demo from the command-line entry."""

from __future__ import annotations

import math

import pytest
import torch
from train_tiny import TINY, read_metrics

import transmix_kernels as tk
from transmix_train.config import parse_args
from transmix_train.main import main
from transmix_train.mixers import create_mixer


@pytest.fixture(scope="module")
def model():
    import timm

    return timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                             num_classes=10)


def test_flags_reach_the_mixers(model):
    args = parse_args(["--mix", "mixpro", "--mixpro-mask-size", "8", "--mixpro-prob", "1.0",
                       "--mixpro-mask-alpha", "2.0", "--mixpro-pal-smoothing", "0.05"])
    mixing = create_mixer(args, 10, model, seed=0)
    assert mixing.uses_attention and mixing.name == "mixpro"
    mixpro = mixing.mixer.mixpro
    assert (mixpro.mask_size, mixpro.maskmix_prob, mixpro.mask_alpha, mixpro.pal_smoothing) == ((8, 8), 1.0, 2.0, 0.05)
    args = parse_args(["--mix", "tokenmix", "--tokenmix-mask-ratio", "0.25", "--tokenmix-min-tokens", "2",
                       "--transmix-ratio", "0.3"])
    mixing = create_mixer(args, 10, model, seed=0)
    assert mixing.uses_attention and isinstance(mixing.mixer, tk.TokenMix)
    assert (mixing.mixer.mask_ratio, mixing.mixer.min_tokens, mixing.mixer.ratio) == (0.25, 2, 0.3)


@pytest.mark.parametrize("argv, match", [
    (["--mix", "mixpro", "--mixpro-prob", "2"], "--mixpro-prob: maskmix_prob must be in"),
    (["--mix", "mixpro", "--mixpro-mask-size", "0"], "--mixpro-mask-size: mask_size must be a positive int"),
    (["--mix", "tokenmix", "--tokenmix-min-tokens", "-1"], "--tokenmix-min-tokens: min_tokens must be"),
])
def test_bad_flags_name_the_flag(model, argv, match):
    with pytest.raises(ValueError, match=match):
        create_mixer(parse_args(argv), 10, model, seed=0)


def test_mixpro_state_uses_the_logits_of_the_last_forward(model):
    args = parse_args(["--mix", "mixpro", "--mixpro-mask-size", "8", "--mixpro-prob", "1.0"])
    mixer = create_mixer(args, 10, model, seed=0).mixer
    images, target = torch.randn(4, 3, 16, 16), torch.arange(4)
    with tk.ClassAttentionProbe(model) as probe:
        images, state = mixer(images, target)
        with torch.no_grad():
            logits = model(images)
        want = state.state.targets(probe, logits=logits)
        torch.testing.assert_close(state.targets(probe), want, rtol=0, atol=0)
    torch.testing.assert_close(state.targets(None), state.area_targets())


@pytest.mark.parametrize("mix", ["mixpro", "tokenmix"])
def test_trains_from_the_command_line(tmp_path, mix):
    extra = ["--mixpro-mask-size", "8", "--mixpro-prob", "1.0"] if mix == "mixpro" else ["--tokenmix-min-tokens", "2"]
    main([*TINY, "--mix", mix, *extra, "--epochs", "2", "--output", str(tmp_path)])
    rows = read_metrics(tmp_path)
    assert [int(row["epoch"]) for row in rows] == [0, 1]
    assert all(math.isfinite(float(row["train_loss"])) for row in rows)
