"""transmix-train's checkpoint saver (a timm ``CheckpointSaver``) and its logging set-up."""

from __future__ import annotations

import logging

import pytest
import torch
from timm.utils import CheckpointSaver

from train_tiny import read_metrics, TINY
from transmix_train.checkpoint import AtomicCheckpointSaver, read_checkpoint
from transmix_train.main import main
from transmix_train.outputs import setup_logging


def _state(epoch: int, value: float) -> dict:
    return {"state_dict": {"w": torch.full((4,), value)}, "epoch": epoch}


def test_an_interrupted_write_leaves_the_previous_checkpoints_whole(tmp_path, monkeypatch):
    saver = AtomicCheckpointSaver(tmp_path, keep=1)
    assert isinstance(saver, CheckpointSaver)
    saver.save_checkpoint(0, 50.0, state=_state(0, 0.0))
    assert sorted(path.name for path in tmp_path.glob("*.pth")) == ["best.pth", "checkpoint-0.pth", "last.pth"]

    def save_half_then_fail(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip")  # some bytes of the new checkpoint reach the disk ...
        handle.flush()
        raise OSError("disk full")  # ... then the write fails

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        saver.save_checkpoint(1, 60.0, state=_state(1, 1.0))  # would have been the new best and the kept one
    monkeypatch.undo()
    for name in ("last.pth", "best.pth", "checkpoint-0.pth"):
        checkpoint = read_checkpoint(tmp_path / name)
        assert checkpoint["epoch"] == 0 and torch.equal(checkpoint["state_dict"]["w"], torch.zeros(4)), name
    assert not (tmp_path / "checkpoint-1.pth").exists()
    assert read_checkpoint(tmp_path / "last.pth")["history"]["pending"] == (0, 50.0)


def test_recovery_keeps_only_the_newest_and_the_epoch_end_removes_it(tmp_path):
    saver = AtomicCheckpointSaver(tmp_path, keep=0)
    for update in (1, 2, 3):
        saver.save_recovery(0, update, state=_state(-1, 0.0))
    assert [path.name for path in tmp_path.glob("recovery-*.pth")] == ["recovery-0-3.pth"]
    saver.save_checkpoint(0, 10.0, state=_state(0, 0.0))
    assert sorted(path.name for path in tmp_path.glob("*.pth")) == ["best.pth", "last.pth"]  # keep 0: no history


def _kept(output) -> dict[str, int]:
    return {path.name: read_checkpoint(path)["epoch"] for path in sorted(output.glob("checkpoint-*.pth"))}


def test_checkpoint_hist_is_the_same_across_a_resume(tmp_path):
    argv = [*TINY, "--epochs", "5", "--checkpoint-hist", "2", "--lr", "3e-3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    main([*argv, "--output", str(straight)])
    main([*argv, "--output", str(split), "--stop-after-epochs", "2"])
    main(["--resume", str(split / "last.pth")])

    top1 = [float(row["val_top1"]) for row in read_metrics(straight)]
    best_two = sorted(sorted(range(5), key=lambda epoch: -top1[epoch])[:2])  # stable: the earlier epoch wins a tie
    assert _kept(straight) == {f"checkpoint-{epoch}.pth": epoch for epoch in best_two}, top1
    assert _kept(split) == _kept(straight)
    assert read_checkpoint(split / "last.pth")["history"] == read_checkpoint(straight / "last.pth")["history"]
    assert read_checkpoint(split / "best.pth")["epoch"] == read_checkpoint(straight / "best.pth")["epoch"]


def test_logging_twice_writes_each_line_once(tmp_path, capsys):
    setup_logging(None, primary=True)
    logger = setup_logging(tmp_path / "train.log", primary=True)
    logger.info("one line")
    logging.getLogger("timm.utils.checkpoint_saver").info("timm's line")
    assert capsys.readouterr().err.splitlines() == ["one line", "timm's line"]
    assert [line.split(" ", 2)[2] for line in (tmp_path / "train.log").read_text().splitlines()] == [
        "one line", "timm's line"]

    setup_logging(None, primary=False)  # another rank: warnings only, no file
    logger.info("rank 1 info")
    logger.warning("rank 1 warning")
    assert capsys.readouterr().err.splitlines() == ["WARNING: rank 1 warning"]
    assert "rank 1" not in (tmp_path / "train.log").read_text()
