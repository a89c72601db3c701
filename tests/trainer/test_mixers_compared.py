"""The compared mixers (SaliencyMix, Attentive-CutMix, Puzzle-Mix): the contract all three share.

Each must: keep lam in [0, 1]; give target rows that sum to 1 and put lam on the own label;
paste exactly the partner's pixels where its mask/box says, with lam = 1 - pasted share;
repeat itself under the same seed; refuse bad input with an error naming the argument, before
touching the images. Method-specific behaviour is in test_mixers_methods.py.
"""

from __future__ import annotations

import pytest
import timm
import torch

import transmix_kernels as tk
from transmix_train.mixers.attentive import AttentiveCutMix, CellScorer
from transmix_train.mixers.base import PairMixState, cells_to_pixels
from transmix_train.mixers.puzzle import PuzzleMix
from transmix_train.mixers.saliency import SaliencyMix
from transmix_train.shapes import make_shapes

K = 10


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=28, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                             num_classes=K).eval()


def tiny_scorer() -> CellScorer:
    torch.manual_seed(0)
    return CellScorer(timm.create_model("resnet10t", num_classes=K))


_MODELS: dict = {}


def make_mixer(method: str, seed: int = 0, **kwargs):
    """One mixer per method; models are built once per test session (they are never trained)."""
    kwargs.setdefault("mixup_alpha", 0.0)  # the method's own paste on every batch
    if method == "saliencymix":
        return SaliencyMix(K, seed=seed, **kwargs)
    if method == "attentive_cutmix":
        scorer = _MODELS.setdefault("scorer", tiny_scorer())
        return AttentiveCutMix(K, scorer, seed=seed, **kwargs)
    model = _MODELS.setdefault("vit", tiny_vit())
    return PuzzleMix(K, model, seed=seed, **kwargs)


METHODS = ("saliencymix", "attentive_cutmix", "puzzlemix")


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    # 28 px: a multiple of Attentive-CutMix's 7x7 grid, so its cells are whole 4x4 tiles.
    images, labels = make_shapes(8, 28, seed=3)
    return images, labels


def pasted_mask(state: PairMixState, shape) -> torch.Tensor:
    """(B, 1, H, W) bool: where the state says the partner's pixels are."""
    if state.mask is not None:
        return state.mask
    batch, _, height, width = shape
    ys, xs = torch.arange(height).view(1, -1, 1), torch.arange(width).view(1, 1, -1)
    y0, y1, x0, x1 = (state.boxes[:, i].view(-1, 1, 1) for i in range(4))
    return ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)).unsqueeze(1)


@pytest.mark.parametrize("method", METHODS)
def test_paste_lam_and_targets_agree(method, batch):
    images, labels = batch
    mixed, state = make_mixer(method)(images.clone(), labels)
    assert state.kind == method
    mask = pasted_mask(state, images.shape)
    expected = torch.where(mask, images[state.partner], images)
    assert torch.equal(mixed, expected), f"{method}: pixels differ from the partner paste its mask/box describes"
    share = mask.flatten(1).float().mean(1)
    assert torch.allclose(state.lam, 1 - share, atol=1e-6), f"{method}: lam {state.lam} vs 1 - pasted {1 - share}"
    assert bool(((state.lam >= 0) & (state.lam <= 1)).all())
    assert bool((share > 0).any()), f"{method}: nothing was pasted"
    targets = state.targets(None)
    assert targets.shape == (8, K)
    torch.testing.assert_close(targets.sum(1), torch.ones(8), rtol=0, atol=1e-6)
    off = 0.1 / K
    own = targets.gather(1, labels[:, None]).squeeze(1)
    same = labels == labels[state.partner]
    expected_own = torch.where(same, torch.full_like(own, 1 - 0.1 + off), state.lam * (1 - 0.1) + off)
    torch.testing.assert_close(own, expected_own, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_output(method, batch):
    images, labels = batch
    first, state1 = make_mixer(method, seed=7, mixup_alpha=0.8)(images.clone(), labels)
    second, state2 = make_mixer(method, seed=7, mixup_alpha=0.8)(images.clone(), labels)
    assert torch.equal(first, second)
    assert torch.equal(state1.targets(None), state2.targets(None))


@pytest.mark.parametrize("method", METHODS)
def test_switch_none_and_mixup(method, batch):
    images, labels = batch
    same, state = make_mixer(method, prob=0.0)(images.clone(), labels)
    assert state.kind == "none" and torch.equal(same, images)
    torch.testing.assert_close(state.targets(None).max(1).values, torch.full((8,), 0.9 + 0.1 / K))
    _, state = make_mixer(method, mixup_alpha=0.8, switch_prob=0.0)(images.clone(), labels)
    assert state.kind == "mixup"  # tk.TransMix's Mixup branch, as timm's switch


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad, error, message", [
    (lambda x, y: (x[:7], y[:7]), ValueError, "images must hold an even batch"),
    (lambda x, y: (x[0], y), ValueError, "images must have 4 dimensions"),
    (lambda x, y: (x.double(), y), TypeError, "images must have dtype"),
    (lambda x, y: (x, y.int()), TypeError, "target must have dtype"),
    (lambda x, y: (x, y[:4]), ValueError, "target must have batch size 8"),
    (lambda x, y: (x, y + K), ValueError, "target must hold values in"),
], ids=["odd-batch", "3d-images", "float64-images", "int32-target", "short-target", "label-out-of-range"])
def test_bad_input_is_named_and_leaves_images(method, bad, error, message, batch):
    images, labels = bad(batch[0].clone(), batch[1])
    before = images.clone()
    with pytest.raises(error, match=message):
        make_mixer(method)(images, labels)
    assert torch.equal(images, before)


@pytest.mark.parametrize("method", METHODS)
def test_bad_input_is_refused_as_tk_transmix_refuses_it(method, batch):
    """The same wrong images/target: the same exception type and message as the library's mixer."""
    images, labels = batch
    for bad_images, bad_labels in ((images.double(), labels), (images, labels.int()), (images.numpy(), labels),
                                   (images, labels + K)):
        raised = []
        for mixer in (tk.TransMix(K), make_mixer(method)):
            with pytest.raises((TypeError, ValueError)) as info:
                mixer(bad_images, bad_labels)
            raised.append((info.type, str(info.value)))
        assert raised[0] == raised[1]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kwargs, error, name", [
    ({"switch_prob": 1.5}, ValueError, "switch_prob"), ({"prob": -0.1}, ValueError, "prob"),
    ({"mixup_alpha": -1.0}, ValueError, "mixup_alpha"), ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
    ({"prob": "1"}, TypeError, "prob must be a number"), ({"mixup_alpha": None}, TypeError, "mixup_alpha"),
    ({"label_smoothing": "0.1"}, TypeError, "label_smoothing must be a number"),
], ids=["switch_prob", "prob", "mixup_alpha", "smoothing", "prob-type", "mixup_alpha-type", "smoothing-type"])
def test_bad_settings_are_named(method, kwargs, error, name):
    with pytest.raises(error, match=name):
        make_mixer(method, **kwargs)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name, value", [
    ("label_smoothing", 1.0), ("label_smoothing", 0.0), ("label_smoothing", 1.0 + 1e-9), ("label_smoothing", -0.1),
    ("label_smoothing", "0.1"), ("label_smoothing", True), ("prob", 1), ("switch_prob", None),
    ("mixup_alpha", float("inf")), ("mixup_alpha", "0.8"),
])
def test_settings_follow_tk_transmix(method, name, value):
    """One rule for the library's TransMix and the compared mixers: the same values pass, the same
    values fail with the same exception type and message (label_smoothing 1.0 included)."""
    outcomes = []
    for build in (lambda: tk.TransMix(K, **{name: value}), lambda: make_mixer(method, **{name: value})):
        try:
            build()
            outcomes.append(None)
        except (TypeError, ValueError) as error:
            outcomes.append((type(error), str(error)))
    assert outcomes[0] == outcomes[1]


def test_cells_to_pixels_tiles_whole_cells():
    cells = torch.zeros(1, 7, 7, dtype=torch.bool)
    cells[0, 2, 5] = True
    pixels = cells_to_pixels(cells, 28, 28)[0, 0]
    assert pixels.sum() == 16 and bool(pixels[8:12, 20:24].all())
