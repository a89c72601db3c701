"""Robustness (``transmix-robustness``): val top-1 under random patch drop and patch shuffling.

The image operations are checked on hand-made images; the evaluation on a 1-epoch tiny run,
whose plain val top-1 (recorded in its checkpoint by the trainer) both tests must reproduce
at 0 % dropped and with a 1x1 shuffle grid.
"""

from __future__ import annotations

import json

import pytest
import torch

from train_tiny import TINY
from transmix_train.fidelity import open_checkpoint
from transmix_train.main import main as train_main
from transmix_train.robustness import (check_drop_ratios, default_shuffle_grids, drop_patches, dropped_count,
                                       evaluate_robustness, main, random_orders, shuffle_patches)

SIZE = 16


# ----------------------------------------------------------------------------- the image operations
def test_drop_patches_blackens_exactly_the_first_cells_of_the_order():
    images = torch.randn(2, 3, 8, 8)
    order = torch.tensor([[3, 0, 1, 2], [2, 1, 0, 3]])
    fill = torch.tensor([-1.0, -2.0, -3.0]).view(1, 3, 1, 1)
    dropped = drop_patches(images, order, 1, (2, 2), fill)
    assert torch.equal(dropped[0, :, 4:, 4:], fill[0].expand(3, 4, 4))  # cell 3 = bottom right
    assert torch.equal(dropped[1, :, 4:, :4], fill[0].expand(3, 4, 4))  # cell 2 = bottom left (row-major)
    assert torch.equal(drop_patches(images, order, 0, (2, 2), fill), images)
    assert torch.equal(drop_patches(images, order, 4, (2, 2), fill), fill.expand_as(images))
    # the untouched cells keep their pixels
    assert torch.equal(dropped[0, :, :4, :], images[0, :, :4, :])
    assert torch.equal(dropped[0, :, 4:, :4], images[0, :, 4:, :4])


def test_dropped_count_follows_floor_of_ratio_times_patches():
    assert [dropped_count(k / 10, 196) for k in range(10)] == [k * 196 // 10 for k in range(10)]
    assert [dropped_count(k / 10, 10) for k in range(10)] == list(range(10))  # 0.3 * 10 is 2.999... in floats


def test_shuffle_patches_moves_whole_cells():
    image = torch.arange(16.0).view(1, 1, 4, 4)
    cells = [image[0, 0, :2, :2], image[0, 0, :2, 2:], image[0, 0, 2:, :2], image[0, 0, 2:, 2:]]
    shuffled = shuffle_patches(image, torch.tensor([[3, 2, 1, 0]]), 2)
    assert torch.equal(shuffled[0, 0, :2, :2], cells[3]) and torch.equal(shuffled[0, 0, 2:, 2:], cells[0])
    assert torch.equal(shuffled[0, 0, :2, 2:], cells[2]) and torch.equal(shuffled[0, 0, 2:, :2], cells[1])
    images = torch.randn(3, 3, 8, 8)
    assert torch.equal(shuffle_patches(images, torch.zeros(3, 1, dtype=torch.long), 1), images)
    identity = torch.arange(16).expand(3, 16)
    assert torch.equal(shuffle_patches(images, identity, 4), images)


def test_default_grids_and_seeded_orders():
    assert default_shuffle_grids(224, 224, (14, 14)) == (1, 2, 4, 8, 14)  # the paper's grids at 224 px
    assert default_shuffle_grids(32, 32, (8, 8)) == (1, 2, 4, 8)
    assert torch.equal(random_orders(5, 16, 3, 0), random_orders(5, 16, 3, 0))
    assert not torch.equal(random_orders(5, 16, 3, 0), random_orders(5, 16, 4, 0))
    assert (random_orders(5, 16, 3, 0).sort(1).values == torch.arange(16)).all()


@pytest.mark.parametrize("ratios", [[1.0], [0.5, 1.2], [-0.1], []], ids=["1.0", "above-1", "negative", "none"])
def test_bad_drop_ratios_are_rejected(ratios):
    with pytest.raises(ValueError, match="--drop-ratios"):
        check_drop_ratios(ratios)


# ------------------------------------------------------------------------------ on a trained model
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 1-epoch tiny shapes run whose val pass covers the whole val set (32 images = 2 batches)."""
    output = tmp_path_factory.mktemp("robustness") / "run"
    train_main([*TINY, "--data", "shapes", "--img-size", str(SIZE), "--train-size", "32", "--val-size", "32",
                "--epochs", "1", "--warmup-epochs", "0", "--output", str(output)])
    return output / "last.pth"


def test_no_drop_and_a_1x1_grid_give_the_plain_val_top1(checkpoint):
    recorded = torch.load(checkpoint, weights_only=True, map_location="cpu")["metric"]  # the trainer's val top-1
    opened = open_checkpoint(str(checkpoint))
    result = evaluate_robustness(opened.model, opened.images, drop_ratios=[0.0, 0.5], shuffle_grids=[1, 2],
                                 batch_size=16)
    assert result.images == 32 and result.patch_grid == (4, 4)
    assert result.clean_top1 == pytest.approx(recorded, abs=1e-9)
    assert result.occlusion[0]["top1"] == result.clean_top1 and result.occlusion[0]["patches_dropped"] == 0
    assert result.shuffle[0]["top1"] == result.clean_top1 and result.shuffle[0]["grid"] == 1
    assert result.occlusion[1]["patches_dropped"] == 8


def test_results_are_seeded_and_do_not_depend_on_the_batch_size(checkpoint):
    opened = open_checkpoint(str(checkpoint))
    first = evaluate_robustness(opened.model, opened.images, seed=1, batch_size=16)
    assert first == evaluate_robustness(opened.model, opened.images, seed=1, batch_size=5)
    assert [row["drop_ratio"] for row in first.occlusion] == pytest.approx([k / 10 for k in range(10)])
    assert [row["grid"] for row in first.shuffle] == [1, 2, 4]


def test_command_writes_json_markdown_and_plot(checkpoint, tmp_path, capsys):
    assert main([str(checkpoint), "--output", str(tmp_path / "out"), "--drop-ratios", "0", "0.9",
                 "--shuffle-grids", "1", "4"]) == 0
    written = json.loads((tmp_path / "out" / "robustness.json").read_text())
    assert [row["drop_ratio"] for row in written["occlusion"]] == [0.0, 0.9]
    assert [row["grid"] for row in written["shuffle"]] == [1, 4] and written["data"] == "shapes"
    assert "| 4x4 |" in (tmp_path / "out" / "robustness.md").read_text()
    assert (tmp_path / "out" / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("argv, named", [
    (["{missing}"], "CHECKPOINT"),
    (["{ckpt}", "--drop-ratios", "1.0"], "--drop-ratios"),
    (["{ckpt}", "--drop-ratios", "0.2", "1.5"], "--drop-ratios"),
    (["{ckpt}", "--shuffle-grids", "3"], "--shuffle-grids"),
    (["{ckpt}", "--patch-grid", "0"], "--patch-grid"),
], ids=["no-checkpoint", "ratio-1", "ratio-above-1", "grid-not-dividing", "patch-grid-0"])
def test_bad_input_names_the_argument(checkpoint, tmp_path, capsys, argv, named):
    values = {"missing": str(tmp_path / "nope.pth"), "ckpt": str(checkpoint)}
    with pytest.raises(SystemExit):
        main([arg.format(**values) for arg in argv] + ["--output", str(tmp_path / "out")])
    assert named in capsys.readouterr().err
