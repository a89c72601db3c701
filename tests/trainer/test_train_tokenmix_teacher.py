"""--mix tokenmix with a teacher: the class activation maps of mixers/teacher.py against a hand
computation on a tiny timm CNN, the official label on the unmixed images, the teachers refused with
a named error, and a 2-step run from the command line with --teacher CKPT (no distillation)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import transmix_kernels as tk
from train_tiny import TINY, read_metrics
from transmix_train.build import build_run
from transmix_train.checkpoint import save_checkpoint
from transmix_train.config import parse_args
from transmix_train.distributed import init_processes
from transmix_train.main import main
from transmix_train.mixers import create_mixer
from transmix_train.mixers.teacher import ClassActivationMaps, TeacherLabelledState, TeacherTokenMix

# timm's tiny test_resnet with stride 8: a 4x4 feature map at 32 px, 2x2 at TINY's 16 px.
TEACHER_KWARGS = {"output_stride": 8}


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10, **TEACHER_KWARGS).eval()
    with torch.no_grad():  # a classifier far from 0, so that the top-5 rule and the clamp both act
        model.fc.weight.mul_(20.0)
    return model.requires_grad_(False)


@pytest.fixture(scope="module")
def student() -> torch.nn.Module:
    return timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                             num_classes=10)


def _hand_scores(teacher: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """scores[b, k, i, j] = sum_c W[k, c] * f[b, c, i, j] + bias[k], by explicit sums."""
    features = teacher.forward_features(images)
    weight, bias = teacher.fc.weight, teacher.fc.bias
    scores = torch.zeros(images.shape[0], weight.shape[0], *features.shape[2:])
    for k in range(weight.shape[0]):
        scores[:, k] = (features * weight[k].view(1, -1, 1, 1)).sum(1) + bias[k]
    return scores


def _hand_own_maps(scores: torch.Tensor, target: torch.Tensor, topk: int) -> torch.Tensor:
    """Own class's score where it ranks in the top-k of its location, else 0; then >= 0."""
    batch, classes, height, width = scores.shape
    out = torch.zeros(batch, height, width)
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                ranked = scores[b, :, i, j].argsort(descending=True)[:topk].tolist()
                value = float(scores[b, target[b], i, j])
                out[b, i, j] = max(value, 0.0) if int(target[b]) in ranked else 0.0
    return out


@torch.no_grad()
def test_scores_are_the_classifier_on_every_location(teacher):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    scores = ClassActivationMaps(teacher).scores(images)
    assert scores.shape == (3, 10, 4, 4) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, _hand_scores(teacher, images), rtol=1e-5, atol=1e-4)
    # average pooling then the linear head: the maps average to the teacher's logits
    torch.testing.assert_close(scores.mean((2, 3)), teacher(images), rtol=1e-5, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("topk", [5, 2, None], ids=["official-top5", "top2", "all"])
def test_own_class_maps_by_hand_on_the_feature_grid(teacher, topk):
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 3, 7, 9])
    maps = ClassActivationMaps(teacher, topk=topk)(images, target, (4, 4))  # feature grid == token grid
    want = _hand_own_maps(_hand_scores(teacher, images), target, topk or 10)
    empty = want.sum((1, 2)) == 0
    want[empty] = 1.0  # ours: an image whose own class is nowhere kept gets a uniform map
    torch.testing.assert_close(maps, want, rtol=1e-5, atol=1e-4)
    assert (maps >= 0).all()
    if topk == 2:
        assert (want == 0).any(), "the top-k rule should have zeroed some locations of this teacher"


@torch.no_grad()
def test_maps_resample_to_the_token_grid_as_roi_align_over_the_whole_map(teacher):
    # 2x2 features (16 px) onto a 4x4 token grid: roi_align over [-0.5, w - 0.5] with one sample per
    # bin is bilinear interpolation with align_corners=False (edges clamped).
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([1, 4])
    maps = ClassActivationMaps(teacher, topk=None)(images, target, (4, 4))
    own = _hand_own_maps(_hand_scores(teacher, images), target, 10)
    want = F.interpolate(own[:, None], scale_factor=2, mode="bilinear", align_corners=False)[:, 0]
    want[want.sum((1, 2)) == 0] = 1.0
    torch.testing.assert_close(maps, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["test_convnext", "test_vit"])
def test_teachers_without_usable_maps_are_refused_by_name(name):
    model = timm.create_model(name, num_classes=10).eval()
    if name == "test_vit":  # patch tokens are TokenLabeling's rule: accepted, on their square grid
        maps = ClassActivationMaps(model, input_size=(3, 32, 32))
        assert maps(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), (4, 4)).shape == (2, 4, 4)
        return
    with pytest.raises(ValueError, match=rf"--teacher-model {name}: --mix tokenmix .* does more than average"):
        ClassActivationMaps(model, flag=f"--teacher-model {name}", input_size=(3, 32, 32))


def test_a_teacher_without_linear_head_is_refused():
    model = timm.create_model("test_resnet", num_classes=0)  # no head: get_classifier() is Identity
    with pytest.raises(ValueError, match=r"--teacher-model test_resnet: .* need a linear classifier .*Identity"):
        ClassActivationMaps(model, flag="--teacher-model test_resnet")


def test_token_batches_are_labelled_by_the_maps_of_the_unmixed_images(teacher, student):
    tokenmix = tk.TokenMix(10, mixup_alpha=0.8, min_tokens=1, model=student, seed=0)
    mixer = TeacherTokenMix(tokenmix, ClassActivationMaps(teacher))
    target = torch.arange(8) % 10
    kinds = set()
    for step in range(8):
        clean = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(step))
        images, state = mixer(clean.clone(), target)
        kinds.add(state.kind)
        if state.mask is None:  # Mixup batch: TokenMix's area targets, no teacher forward
            assert not isinstance(state, TeacherLabelledState)
            torch.testing.assert_close(state.targets(None), state.area_targets())
            continue
        assert isinstance(state, TeacherLabelledState) and not torch.equal(images, clean)
        want_maps = ClassActivationMaps(teacher)(clean, target, (4, 4))
        torch.testing.assert_close(state.activation_maps, want_maps, rtol=0, atol=0)
        want = tk.TokenMixState.targets(state, activation_maps=want_maps)
        torch.testing.assert_close(state.targets(None), want, rtol=0, atol=0)
        own, partner = state.teacher_lambdas(want_maps)
        torch.testing.assert_close(state.targets().sum(1), own + partner, rtol=1e-5, atol=1e-5)
    assert kinds == {"cutmix", "mixup"}
    saved = mixer.state_dict()
    again = TeacherTokenMix(tk.TokenMix(10, min_tokens=1, model=student), ClassActivationMaps(teacher))
    again.load_state_dict(saved)
    assert again.state_dict()["generator"] == saved["generator"]


def _teacher_checkpoint(folder: Path) -> Path:
    """test_resnet (stride 8) for the digits' 10 classes, in transmix-train's checkpoint layout."""
    args = {"model": "test_resnet", "drop": 0.0, "drop_path": 0.0, "model_kwargs": TEACHER_KWARGS}
    model = timm.create_model("test_resnet", num_classes=10, **TEACHER_KWARGS)
    return save_checkpoint({"state_dict": model.state_dict(), "arch": "test_resnet", "args": args, "epoch": 0},
                           folder / "teacher.pth")


def test_tokenmix_trains_with_a_teacher_checkpoint(tmp_path):
    teacher = _teacher_checkpoint(tmp_path)
    argv = [*TINY, "--mix", "tokenmix", "--tokenmix-min-tokens", "1", "--teacher", str(teacher)]
    run = build_run(parse_args([*argv, "--output", str(tmp_path / "built")]), init_processes("cpu", None),
                    lambda message: None)
    assert isinstance(run.mixing.mixer, TeacherTokenMix) and not run.mixing.uses_attention and run.probe is None
    assert run.criterion.kind == "none"  # no --distillation-type: the teacher only labels TokenMix's batches
    main([*argv, "--epochs", "1", "--output", str(tmp_path / "run")])
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 1 and math.isfinite(float(rows[0]["train_loss"]))


def test_an_unused_teacher_is_an_error(tmp_path):
    argv = [*TINY, "--mix", "cutmix", "--teacher", str(_teacher_checkpoint(tmp_path)), "--output", str(tmp_path / "r")]
    with pytest.raises(ValueError, match=r"--teacher: the teacher would be unused: .*--mix tokenmix"):
        build_run(parse_args(argv), init_processes("cpu", None), lambda message: None)


def test_create_mixer_wraps_tokenmix_only(teacher, student):
    args = parse_args(["--mix", "tokenmix", "--tokenmix-min-tokens", "1", "--teacher-model", "test_resnet"])
    mixing = create_mixer(args, 10, student, seed=0, teacher=teacher, input_size=(3, 32, 32))
    assert isinstance(mixing.mixer, TeacherTokenMix) and mixing.name == "tokenmix" and not mixing.uses_attention
    assert mixing.mixer.maps.flag == "--teacher-model test_resnet"
    plain = create_mixer(parse_args(["--mix", "transmix"]), 10, student, seed=0, teacher=teacher)
    assert isinstance(plain.mixer, tk.TransMix)
