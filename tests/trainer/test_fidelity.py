"""Label fidelity (``transmix-fidelity``, ``transmix-train --fidelity-every``): the true label share
of a CutMix pair from the data's object masks, and the area / attention / TransMix labels scored
against it.

The true share is checked on hand-made masks whose answer is known; the scores on hand-made
numbers; the measurement on tiny models (16 px, 4 px patches) and a 1-epoch run.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import timm
import torch

import transmix_kernels as tk
from train_tiny import EXACT_FIELDS, read_metrics, TINY
from transmix_train.config import parse_args
from transmix_train.data import DataSettings, InMemoryImages, load_digits_images
from transmix_train.fidelity import (DIGIT_INK_THRESHOLD, LABEL_RULES, main, MaskedImages, measure_fidelity,
                                     object_masks, summarise, true_share, ValImages, write_report)
from transmix_train.main import main as train_main
from transmix_train.shapes import make_shapes

SIZE = 16


def _box(y0, y1, x0, x1):
    return [y0, y1, x0, x1]


# --------------------------------------------------------------------------------------- the data
def test_make_shapes_masks_leave_images_and_labels_bit_identical():
    images, labels = make_shapes(12, 24, seed=4)
    with_masks, same_labels, masks = make_shapes(12, 24, seed=4, return_masks=True)
    assert torch.equal(images, with_masks) and torch.equal(labels, same_labels)
    assert masks.shape == (12, 24, 24) and masks.dtype == torch.bool
    # the object is the one colour of each image: every mask pixel has it, no background pixel does
    for image, mask in zip(images, masks):
        colour = image[:, mask][:, 0]
        assert mask.any() and (image[:, mask] == colour[:, None]).all()
        assert not (image[:, ~mask] == colour[:, None]).all(0).any()


def test_digit_masks_are_the_ink_above_the_threshold():
    pixels, labels = load_digits_images(32)
    val_set = InMemoryImages(pixels[:50], labels[:50])
    masks = object_masks("digits", val_set)
    assert np.array_equal(masks, pixels[:50, :, :, 0] > DIGIT_INK_THRESHOLD)
    assert masks.reshape(50, -1).any(1).all(), "a digit without ink"
    with pytest.raises(ValueError, match="--data synthetic"):
        object_masks("synthetic", val_set)


# ---------------------------------------------------------------------------------- the true share
def test_true_share_known_answers():
    masks = torch.zeros(6, 8, 8, dtype=torch.bool)
    masks[0, 2:4, 2:4] = True  # A0: 4 pixels, all under its box -> share 0 (B's object shows in the box)
    masks[1, 2:4, 2:4] = True  # partner of 0, its object lies inside 0's box
    masks[2, 0:2, 0:2] = True  # A2: box elsewhere, partner's object outside the box -> share 1
    masks[3, 6:8, 6:8] = True
    masks[4, 0:2, 0:4] = True  # A4: 8 pixels, 4 covered; partner 5 shows 2 pixels in the box -> 4 / 6
    masks[5, 0:1, 0:2] = True
    boxes = torch.tensor([_box(0, 8, 0, 8), _box(0, 0, 0, 0), _box(4, 6, 4, 6), _box(0, 0, 0, 0),
                          _box(0, 2, 0, 2), _box(0, 0, 0, 0)])
    partner = torch.tensor([1, 0, 3, 2, 5, 4])
    share = true_share(masks, boxes, partner)
    assert share.dtype == torch.float64
    assert share.tolist()[:5] == [0.0, 1.0, 1.0, 1.0, 4 / 6]


def test_true_share_is_nan_when_no_object_is_visible():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 0:2, 0:2] = True  # A's object entirely covered, B has none
    share = true_share(masks, torch.tensor([_box(0, 4, 0, 4), _box(0, 0, 0, 0)]), torch.tensor([1, 0]))
    # row 1: no object of its own and an empty box (nothing of row 0 pasted): nothing visible either
    assert math.isnan(share[0]) and math.isnan(share[1])
    with pytest.raises(ValueError, match="masks"):
        true_share(masks.float(), torch.zeros(2, 4), torch.tensor([1, 0]))


def test_mixer_pastes_the_partner_where_the_true_share_assumes():
    images = torch.randn(4, 3, SIZE, SIZE)
    mixer = tk.TransMix(10, mixup_alpha=0.0, mode="elem", label_smoothing=0.0, token_grid=(4, 4), seed=3)
    mixed, mix = mixer(images.clone(), torch.arange(4))
    for row, (y0, y1, x0, x1) in enumerate(mix.boxes.tolist()):
        other = int(mix.partner[row])
        assert torch.equal(mixed[row, :, y0:y1, x0:x1], images[other, :, y0:y1, x0:x1])
        outside = torch.ones(SIZE, SIZE, dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        assert torch.equal(mixed[row][:, outside], images[row][:, outside])


# ------------------------------------------------------------------------------------------ scores
def test_scores_by_hand_with_no_object_pairs_counted_apart():
    true = torch.tensor([0.0, 1.0, float("nan"), 0.25], dtype=torch.float64)
    area = torch.tensor([0.3, 0.8, 0.5, 0.75])
    result = summarise(true, {"area": area})
    assert (result.pairs, result.scored, result.no_visible_object) == (4, 3, 1)
    assert result.rules["area"]["mae"] == pytest.approx((0.3 + 0.2 + 0.5) / 3, abs=1e-7)
    assert result.rules["area"]["flip_rate"] == pytest.approx(1 / 3)  # only the last: 0.75 for a true 0.25
    assert result.mean_true_share == pytest.approx(1.25 / 3)


def test_report_with_nothing_scored_writes_nulls(tmp_path):
    result = summarise(torch.full((3,), float("nan"), dtype=torch.float64), {"area": torch.full((3,), 0.5)})
    json_path, md_path = write_report(result, tmp_path / "out", {"data": "shapes", "seed": 0})
    written = json.loads(json_path.read_text())
    assert written["no_visible_object"] == 3 and written["scored"] == 0 and written["rules"]["area"]["mae"] is None
    assert "n/a" in md_path.read_text()


# ------------------------------------------------------------------------------ measured on a model
def _tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_patch16_224", img_size=SIZE, patch_size=4, embed_dim=32, depth=2,
                             num_heads=2, num_classes=10).eval()


def _masked_shapes(count: int, masks=None) -> MaskedImages:
    images, labels, shape_masks = make_shapes(count, SIZE, seed=1, return_masks=True)
    pixels = ((images * 0.3 + 0.35).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    val_set = InMemoryImages(pixels, labels.numpy())
    settings = DataSettings((3, SIZE, SIZE), (0.35,) * 3, (0.3,) * 3, 1.0, "bicubic", True)
    loaded = ValImages.from_settings(val_set, settings, torch.device("cpu"))
    return MaskedImages(loaded, shape_masks.numpy() if masks is None else masks)


def _measure(images: MaskedImages, pairs: int, seed: int):
    model = _tiny_model()
    with tk.ClassAttentionProbe(model) as probe:
        return measure_fidelity(model, probe, images, pairs=pairs, seed=seed, num_classes=10)


def test_measurement_is_deterministic_under_a_seed():
    images = _masked_shapes(40)
    first, again, other = _measure(images, 37, seed=5), _measure(images, 37, seed=5), _measure(images, 37, seed=6)
    assert first.pairs == 37 and first.scored + first.no_visible_object == 37
    assert set(first.rules) == set(LABEL_RULES) == {"area", "attention", "transmix", "mixpro_pal"}
    same = lambda a, b: torch.equal(torch.nan_to_num(a, -1.0), torch.nan_to_num(b, -1.0))  # noqa: E731
    assert same(first.true, again.true) and first.rules == again.rules
    assert not same(first.true, other.true)
    # TransMix's label is the paper's blend of the other two, pair by pair
    blend = 0.5 * first.labels["area"] + 0.5 * first.labels["attention"]
    torch.testing.assert_close(first.labels["transmix"], blend, rtol=0, atol=1e-6)
    # MixPro's PAL blends the same two with a factor in [0, 1]: it lies between them, pair by pair
    low = torch.minimum(first.labels["area"], first.labels["attention"]) - 1e-6
    high = torch.maximum(first.labels["area"], first.labels["attention"]) + 1e-6
    pal = first.labels["mixpro_pal"]
    assert bool(((pal >= low) & (pal <= high)).all()), f"PAL label outside [area, attention]: {pal}"


def test_area_label_is_exact_when_the_object_fills_the_image():
    """With the whole image as the object, the true share is the visible area: CutMix's label error is 0."""
    images = _masked_shapes(20, masks=np.ones((20, SIZE, SIZE), dtype=bool))
    result = _measure(images, 24, seed=2)
    assert result.scored == 24 and result.no_visible_object == 0
    assert result.rules["area"]["mae"] < 1e-6 and result.rules["area"]["flip_rate"] == 0.0


def test_pairs_without_any_visible_object_are_counted_apart():
    masks = np.zeros((20, SIZE, SIZE), dtype=bool)
    masks[:10, :2, :2] = True  # half the images have a 4-pixel object in a corner, half none
    result = _measure(_masked_shapes(20, masks=masks), 40, seed=0)
    assert result.no_visible_object > 0 and result.scored + result.no_visible_object == 40
    assert int(torch.isnan(result.true).sum()) == result.no_visible_object


# ------------------------------------------------------------------------ the command and the flag
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 1-epoch shapes run with --fidelity-every 1, and the same run without it."""
    root = tmp_path_factory.mktemp("fidelity")
    argv = [*TINY, "--data", "shapes", "--img-size", str(SIZE), "--train-size", "32", "--val-size", "32",
            "--epochs", "2", "--warmup-epochs", "0"]
    train_main([*argv, "--output", str(root / "plain")])
    train_main([*argv, "--fidelity-every", "2", "--output", str(root / "run")])
    return root


def test_training_flag_writes_csv_and_curve_without_changing_the_run(tiny_run):
    with open(tiny_run / "run" / "fidelity.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1"]  # every 2nd epoch: epoch index 1
    assert int(rows[0]["pairs"]) == 512 and int(rows[0]["scored"]) + int(rows[0]["no_visible_object"]) == 512
    for name in LABEL_RULES:
        assert 0.0 <= float(rows[0][f"{name}_mae"]) <= 1.0
    assert (tiny_run / "run" / "fidelity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # it draws from no random stream of the run: training is the same with and without it
    plain, measured = read_metrics(tiny_run / "plain"), read_metrics(tiny_run / "run")
    assert [{k: r[k] for k in EXACT_FIELDS} for r in plain] == [{k: r[k] for k in EXACT_FIELDS} for r in measured]


def test_command_writes_json_and_markdown(tiny_run, tmp_path, capsys):
    assert main([str(tiny_run / "run" / "last.pth"), "--pairs", "21", "--seed", "3", "--output",
                 str(tmp_path / "out")]) == 0
    written = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    assert written["pairs"] == 21 and written["seed"] == 3 and written["data"] == "shapes"
    assert set(written["rules"]) == {"area", "attention", "transmix", "mixpro_pal"}
    table = (tmp_path / "out" / "fidelity.md").read_text()
    assert "| area (CutMix) |" in table and "TransMix" in table
    assert "wrote" in capsys.readouterr().out
    # the same seed gives the same numbers; the digits val set can be chosen instead
    assert main([str(tiny_run / "run" / "last.pth"), "--pairs", "21", "--seed", "3", "--output",
                 str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "fidelity.json").read_text())["rules"] == written["rules"]
    assert main([str(tiny_run / "run" / "last.pth"), "--pairs", "8", "--data", "digits", "--output",
                 str(tmp_path / "digits")]) == 0
    assert json.loads((tmp_path / "digits" / "fidelity.json").read_text())["data"] == "digits"


@pytest.mark.parametrize("argv, named", [
    (["{missing}"], "CHECKPOINT"),
    (["{ckpt}", "--pairs", "0"], "--pairs"),
    (["{ckpt}", "--data", "synthetic"], "--data"),
], ids=["no-checkpoint", "pairs-0", "data-without-masks"])
def test_bad_input_names_the_argument(tiny_run, tmp_path, capsys, argv, named):
    values = {"missing": str(tmp_path / "nope.pth"), "ckpt": str(tiny_run / "run" / "last.pth")}
    with pytest.raises(SystemExit):
        main([arg.format(**values) for arg in argv])
    assert named in capsys.readouterr().err


def test_fidelity_every_rejects_a_negative_interval(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--fidelity-every", "-1"])
    assert "--fidelity-every" in capsys.readouterr().err
    assert parse_args(["--fidelity-every", "3"]).fidelity_every == 3
