"""What each compared mixer does that the others do not: where SaliencyMix centres its box, which
cells Attentive-CutMix pastes, what Puzzle-Mix's saliency pass and mask solver compute, and the
trainer's --mix factories for them."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import timm
import torch

from transmix_train.config import parse_args
from transmix_train.mixers.attentive import AttentiveCutMix, CellScorer, load_cell_scorer
from transmix_train.mixers.puzzle import input_saliency, optimise_masks, PuzzleMix
from transmix_train.mixers.saliency import saliency_boxes, saliency_peaks, SaliencyMix
from transmix_train.mixers import create_mixer

K = 10


def spots(positions: list[tuple[int, int]], size: int = 32) -> torch.Tensor:
    """(B, 3, size, size): faint noise with one bright 4x4 square at each (y, x)."""
    generator = torch.Generator().manual_seed(0)
    images = 0.05 * torch.randn(len(positions), 3, size, size, generator=generator)
    for index, (y, x) in enumerate(positions):
        images[index, :, y:y + 4, x:x + 4] = 1.0
    return images


# ---------------------------------------------------------------- SaliencyMix

def test_saliency_peak_lies_on_the_salient_spot():
    positions = [(5, 20), (25, 2), (14, 14), (0, 27)]
    peaks = saliency_peaks(spots(positions))
    for (y, x), (py, px) in zip(positions, peaks):
        assert y - 1 <= py <= y + 4 and x - 1 <= px <= x + 4, f"peak {(py, px)} off the spot at {(y, x)}"


def test_saliency_boxes_use_timm_box_arithmetic_around_the_peak():
    boxes, lam_area = saliency_boxes(np.array([[10, 20], [1, 30]]), 0.75, 32, 32)
    # cut = int(32 * sqrt(0.25)) = 16: [c - 8, c + 8), clipped at the borders.
    assert boxes.tolist() == [[2, 18, 12, 28], [0, 9, 22, 32]]
    np.testing.assert_allclose(lam_area, [1 - 256 / 1024, 1 - 9 * 10 / 1024])


def test_saliencymix_box_is_centred_on_the_partners_peak():
    images = spots([(10, 12), (16, 18), (12, 16), (18, 10)])
    mixer = SaliencyMix(K, mixup_alpha=0.0, seed=1)
    mixer.draw_lam = lambda: 0.75  # 16 px boxes: around these spots none is clipped
    mixed, state = mixer(images.clone(), torch.arange(4))
    partner_peaks = saliency_peaks(images)[state.partner.numpy()]
    boxes = state.boxes.numpy()
    assert (boxes[:, 1] - boxes[:, 0]).tolist() == [16] * 4 and (boxes[:, 3] - boxes[:, 2]).tolist() == [16] * 4
    centres = np.stack([(boxes[:, 0] + boxes[:, 1]) // 2, (boxes[:, 2] + boxes[:, 3]) // 2], axis=1)
    np.testing.assert_array_equal(centres, partner_peaks)
    y0, y1, x0, x1 = boxes[0]
    assert torch.equal(mixed[0, :, y0:y1, x0:x1], images[3, :, y0:y1, x0:x1])


def test_state_dict_resumes_the_draws_mixup_branch_included():
    # Mixup 0.8 and switch 0.5: the saliency paste and the Mixup branch both draw from the one generator.
    images, target = spots([(5, 20), (25, 2), (14, 14), (0, 27)]), torch.arange(4)
    mixer = SaliencyMix(K, mixup_alpha=0.8, seed=1)

    def draws(m, calls=4):
        return [m(images.clone(), target)[1].lam for _ in range(calls)]

    draws(mixer, calls=2)
    state = mixer.state_dict()
    expected = draws(mixer)
    resumed = SaliencyMix(K, mixup_alpha=0.8, seed=2)
    resumed.load_state_dict(state)
    for call, (a, b) in enumerate(zip(draws(resumed), expected)):
        assert torch.equal(a, b), f"call {call}: lam {a} != {b}"


def test_missing_opencv_is_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_cv2(name, *args, **kwargs):
        if name == "cv2":
            raise ImportError("No module named 'cv2'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cv2)
    with pytest.raises(ImportError, match=r"transmix-kernels\[saliency\]"):
        SaliencyMix(K)
    args = parse_args(["--mix", "saliencymix"])
    with pytest.raises(ValueError, match="--mix saliencymix"):
        create_mixer(args, K, None, 0)


# ---------------------------------------------------------------- Attentive-CutMix

class FixedScores(CellScorer):
    """A scorer whose cell scores are given (the pasted cells are then known)."""

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__(timm.create_model("resnet10t", num_classes=K))
        self.scores = scores

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scores


def test_attentive_pastes_the_partners_topk_cells():
    scores = torch.rand(4, 49, generator=torch.Generator().manual_seed(0))
    images, labels = torch.randn(4, 3, 28, 28), torch.arange(4)
    _, state = AttentiveCutMix(K, FixedScores(scores), topk=6, mixup_alpha=0.0)(images, labels)
    cells = state.mask[:, 0, ::4, ::4].reshape(4, 49)
    for row in range(4):
        top = set(scores[3 - row].topk(6).indices.tolist())  # partner of row i is 3 - i
        assert set(cells[row].nonzero().flatten().tolist()) == top
    torch.testing.assert_close(state.lam, torch.full((4,), 1 - 6 / 49))


def test_attentive_settings_are_named():
    scorer = FixedScores(torch.zeros(2, 49))
    with pytest.raises(ValueError, match="topk"):
        AttentiveCutMix(K, scorer, topk=50)
    with pytest.raises(TypeError, match="scorer must be a CellScorer"):
        AttentiveCutMix(K, object())
    with pytest.raises(ValueError, match="topk must be a positive int"):
        AttentiveCutMix(K, scorer, topk=2.0)
    with pytest.raises(ValueError, match="forward_intermediates"):
        CellScorer(torch.nn.Linear(2, 2))


def test_cell_scorer_feature_level_follows_image_size():
    scorer = CellScorer(timm.create_model("resnet10t", num_classes=K))
    assert scorer.reductions[scorer.level_for(224)] == 32  # the paper's 7x7 last stage
    assert scorer.reductions[scorer.level_for(32)] == 8
    assert scorer(torch.randn(2, 3, 32, 32)).shape == (2, 49)


def test_attentive_checkpoint_errors_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--attentive-checkpoint .*no such file"):
        load_cell_scorer(str(tmp_path / "missing.pth"), K)
    with pytest.raises(ValueError, match="--attentive-checkpoint CKPT"):
        create_mixer(parse_args(["--mix", "attentive_cutmix"]), K, None, 0)


# ---------------------------------------------------------------- Puzzle-Mix

def test_input_saliency_is_one_forward_and_leaves_weights_alone():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=1,
                              num_heads=2, num_classes=K)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    saliency = input_saliency(model, torch.randn(4, 3, 16, 16), torch.arange(4))
    assert saliency.shape == (4, 16, 16) and bool((saliency >= 0).all()) and float(saliency.sum()) > 0
    assert len(calls) == 1
    assert all(p.grad is None for p in model.parameters())


def test_mask_solver_follows_saliency_and_share():
    own = torch.zeros(1, 4, 4)
    own[0, :, :2] = 1 / 8  # own image salient on the left
    partner = torch.zeros(1, 4, 4)
    partner[0, :, 2:] = 1 / 8  # the partner on the right
    mask = optimise_masks(own, partner, torch.tensor([0.5]))
    assert mask[0, :, 2:].all() and not mask[0, :, :2].any(), "the partner's salient half is pasted"
    flat = torch.full((3, 4, 4), 1 / 16)
    shares = torch.tensor([0.0, 0.25, 1.0])
    masks = optimise_masks(flat, flat, shares)
    assert masks[0].sum() == 0 and masks[2].all()
    assert 0 < int(masks[1].sum()) < 16


def test_puzzle_settings_are_named():
    model = torch.nn.Linear(2, 2)
    for kwargs, name in (({"grid_sizes": (0,)}, "grid_sizes"), ({"beta": -1.0}, "beta"),
                         ({"iterations": 0}, "iterations")):
        with pytest.raises(ValueError, match=name):
            PuzzleMix(K, model, **kwargs)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        PuzzleMix(K, "not a model")
    with pytest.raises(TypeError, match="eta must be a number"):
        PuzzleMix(K, model, eta="2")


# ---------------------------------------------------------------- the trainer's factories

def test_factories_need_batch_mode():
    args = parse_args(["--mix", "puzzlemix", "--mixup-mode", "elem"])
    with pytest.raises(ValueError, match="--mixup-mode batch"):
        create_mixer(args, K, torch.nn.Linear(2, 2), 0)


_BAD_FLAGS = [(["--mixup-prob", "1.5"], "--mixup-prob"), (["--mixup-switch-prob", "-1"], "--mixup-switch-prob"),
              (["--mixup", "-0.5"], "--mixup"), (["--cutmix", "-1"], "--cutmix"), (["--smoothing", "1.5"], "--smoothing")]


@pytest.mark.parametrize("mix, argv, flag", [
    (mix, argv, flag) for mix in ("transmix", "saliencymix", "attentive_cutmix", "puzzlemix") for argv, flag in _BAD_FLAGS
    if not (mix == "attentive_cutmix" and flag == "--cutmix")  # top-k fixes its lam: no Beta alpha of its own
])
def test_factory_errors_name_the_flag(monkeypatch, mix, argv, flag):
    """Each mixer's bad setting is refused with the flag the user typed, never another flag."""
    import transmix_train.mixers.attentive as attentive

    monkeypatch.setattr(attentive, "load_cell_scorer", lambda path, classes: FixedScores(torch.zeros(2, 49)))
    args = parse_args(["--mix", mix, "--attentive-checkpoint", "unused.pth", *argv])
    with pytest.raises(ValueError) as info:
        create_mixer(args, K, torch.nn.Linear(2, 2), 0)
    assert str(info.value).startswith(f"{flag}: "), str(info.value)


def test_factory_topk_error_names_its_flag(monkeypatch):
    import transmix_train.mixers.attentive as attentive

    monkeypatch.setattr(attentive, "load_cell_scorer", lambda path, classes: FixedScores(torch.zeros(2, 49)))
    args = parse_args(["--mix", "attentive_cutmix", "--attentive-checkpoint", "unused.pth", "--attentive-topk", "50"])
    with pytest.raises(ValueError, match=r"^--attentive-topk: topk must be in \[1, 49\]"):
        create_mixer(args, K, torch.nn.Linear(2, 2), 0)


def test_factory_builds_puzzlemix_from_flags():
    args = parse_args(["--mix", "puzzlemix", "--mixup", "0", "--smoothing", "0.2"])
    mixing = create_mixer(args, K, torch.nn.Linear(2, 2), 0)
    assert isinstance(mixing.mixer, PuzzleMix) and not mixing.uses_attention
    assert mixing.mixer.smoothing == 0.2 and mixing.mixer._mixup is None
