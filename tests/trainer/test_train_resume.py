"""Exact resume, atomic checkpoints, the non-finite stop and --eval-only of transmix-train."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import sklearn  # noqa: F401  (the train extra: a missing extra fails here, never skips)

from train_tiny import EXACT_FIELDS, read_metrics, TINY
from transmix_train.checkpoint import read_checkpoint
from transmix_train.main import main

# Everything random on: RandAugment, random erasing, drop path, TransMix in per-element mode
# (one box and one lam per image), EMA; the lr changes every update; two micro-batches per
# update with clipping.
RANDOM_EVERYWHERE = [*TINY, "--reprob", "0.5", "--mixup-mode", "elem", "--model-ema", "--model-ema-decay", "0.9",
                     "--epochs", "2", "--warmup-epochs", "1", "--limit-train-batches", "4", "--grad-accum-steps", "2",
                     "--clip-grad", "1.0"]


def _state(path: Path) -> dict:
    checkpoint = read_checkpoint(path)
    return {"model": checkpoint["state_dict"], "ema": checkpoint["state_dict_ema"]}


def test_stop_and_resume_equals_straight_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    main([*RANDOM_EVERYWHERE, "--output", str(straight)])
    main([*RANDOM_EVERYWHERE, "--output", str(split), "--stop-after-epochs", "1"])
    assert [row["epoch"] for row in read_metrics(split)] == ["0"], "--stop-after-epochs 1 ran another epoch"
    assert read_checkpoint(split / "last.pth")["epoch"] == 0
    main(["--resume", str(split / "last.pth")])  # its saved config, its folder

    rows_straight, rows_split = read_metrics(straight), read_metrics(split)
    assert [{k: r[k] for k in EXACT_FIELDS} for r in rows_split] == [{k: r[k] for k in EXACT_FIELDS}
                                                                       for r in rows_straight]
    final_straight, final_split = _state(straight / "last.pth"), _state(split / "last.pth")
    for part in ("model", "ema"):
        for name, tensor in final_straight[part].items():
            assert torch.equal(tensor, final_split[part][name]), f"{part} {name} differs after resume"


def test_eval_only_prints_the_checkpoint_accuracy(tmp_path, capsys):
    main([*TINY, "--epochs", "1", "--limit-val-batches", "100", "--output", str(tmp_path)])
    row = read_metrics(tmp_path)[-1]
    capsys.readouterr()
    main(["--eval-only", "--resume", str(tmp_path / "best.pth")])
    out = capsys.readouterr().err  # the log: stderr, as timm's setup_default_logging
    assert f"val top-1 {float(row['val_top1']):.2f} top-5 {float(row['val_top5']):.2f}" in out
    assert "(359 images)" in out  # the whole digits val split


_KILLED_WRITE = textwrap.dedent("""
    import os, signal, sys, torch
    from transmix_train.checkpoint import save_checkpoint
    path, mode = sys.argv[1], sys.argv[2]
    save_checkpoint({"state_dict": {"w": torch.zeros(4)}, "epoch": 0}, path)
    real_save = torch.save

    def save_then_die(obj, f, *args, **kwargs):
        f.write(b"PK\\x03\\x04 half a zip")  # some bytes of the new checkpoint reach the file ...
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # ... then the process is killed

    torch.save = save_then_die
    state = {"state_dict": {"w": torch.ones(4)}, "epoch": 1}
    if mode == "atomic":
        save_checkpoint(state, path)
    else:  # what a plain torch.save(state, path) does: the old file is truncated first
        with open(path, "wb") as handle:
            torch.save(state, handle)
""")


@pytest.mark.parametrize("mode", ["atomic", "plain"])
def test_checkpoint_write_killed_midway(tmp_path, mode):
    path = tmp_path / "last.pth"
    result = subprocess.run([sys.executable, "-c", _KILLED_WRITE, str(path), mode], capture_output=True)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    if mode == "plain":  # the control: without the rename the previous checkpoint is lost
        with pytest.raises(ValueError, match="not a readable checkpoint"):
            read_checkpoint(path)
        return
    checkpoint = read_checkpoint(path)
    assert checkpoint["epoch"] == 0 and torch.equal(checkpoint["state_dict"]["w"], torch.zeros(4))
    from timm.models import load_checkpoint

    model = torch.nn.Module()
    model.register_buffer("w", torch.full((4,), 5.0))
    load_checkpoint(model, str(path))  # timm reads it
    assert torch.equal(model.w, torch.zeros(4))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # Epoch 0 trains at the warm-up lr; epoch 1 at an lr that overflows the weights.
    argv = [*TINY, "--epochs", "3", "--warmup-epochs", "1", "--no-sched-on-updates", "--warmup-lr", "1e-4",
            "--lr", "1e38", "--output", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    log = (tmp_path / "train.log").read_text()
    assert "the training loss is nan at epoch 1" in log or "the training loss is inf at epoch 1" in log
    assert read_checkpoint(tmp_path / "last.pth")["epoch"] == 0
    assert [row["epoch"] for row in read_metrics(tmp_path)] == ["0"]
