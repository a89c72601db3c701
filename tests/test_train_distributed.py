"""transmix-train under torchrun: 2 gloo processes on the CPU train one model, only rank 0 writes,
and the val metrics are reduced over both ranks' shards (each image counted once)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

from train_tiny import read_metrics, TINY  # noqa: E402
from transmix_train.build import rank_seed  # noqa: E402
from transmix_train.checkpoint import read_checkpoint  # noqa: E402
from transmix_train.main import main  # noqa: E402

TRAIN_PY = Path(__file__).resolve().parents[1] / "python" / "train.py"


def test_each_rank_mixes_with_its_own_seed():
    assert len({rank_seed(0, rank) for rank in range(8)}) == 8
    assert rank_seed(3, 1) == rank_seed(3, 1)


def test_torchrun_two_gloo_processes(tmp_path, capsys):
    output = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
        str(TRAIN_PY), *TINY, "--epochs", "1", "--limit-val-batches", "none", "--output", str(output),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es) on cpu" in result.stdout
    rows = read_metrics(output)
    assert [row["epoch"] for row in rows] == ["0"], "a rank other than 0 wrote metrics"
    checkpoint = read_checkpoint(output / "last.pth")
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2
    assert checkpoint["rng"][0]["mixer"] != checkpoint["rng"][1]["mixer"], "both ranks drew the same mixes"

    # One process evaluating the same weights on the whole val split gives the reduced figure.
    capsys.readouterr()
    main(["--eval-only", "--resume", str(output / "last.pth"), "--limit-val-batches", "none"])
    out = capsys.readouterr().out
    assert f"val top-1 {float(rows[0]['val_top1']):.2f} top-5 {float(rows[0]['val_top5']):.2f}" in out
    assert "(359 images)" in out
