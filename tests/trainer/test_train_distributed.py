"""transmix-train under torchrun: 2 gloo processes on the CPU train one model, only rank 0 writes,
and the val metrics are reduced over both ranks' shards (each image counted once)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import sklearn  # noqa: F401  (the train extra: a missing extra fails here, never skips)
import torch
from timm.utils import random_seed

from train_tiny import read_metrics, TINY
from transmix_train.build import rank_seed
from transmix_train.checkpoint import read_checkpoint
from transmix_train.main import main
from transmix_train.model import build_model

TRAIN_PY = Path(__file__).resolve().parents[2] / "python" / "train.py"
# python/train.py as torchrun runs it, with each rank's final weights saved beside the outputs (only
# rank 0 writes checkpoints, so this is the one way to see rank 1's weights).
KEEP_RANK_WEIGHTS = """
import runpy, sys, torch
import transmix_train.main as entry

folder, train = sys.argv[1], entry.run_training

def train_and_keep(run, log):
    best = train(run, log)
    torch.save(run.module.state_dict(), f"{folder}/rank{run.info.rank}.pth")
    return best

entry.run_training = train_and_keep
sys.argv = sys.argv[2:]  # train.py and its flags
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_each_rank_mixes_with_its_own_seed():
    assert len({rank_seed(0, rank) for rank in range(8)}) == 8
    assert rank_seed(3, 1) == rank_seed(3, 1)


def test_torchrun_two_gloo_processes(tmp_path, capsys):
    output = tmp_path / "ddp"
    script = tmp_path / "keep_rank_weights.py"
    script.write_text(KEEP_RANK_WEIGHTS)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
        str(script), str(tmp_path), str(TRAIN_PY),
        *TINY, "--epochs", "1", "--limit-val-batches", "none", "--output", str(output),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es) on cpu" in result.stderr  # the log (stderr)
    rows = read_metrics(output)
    assert [row["epoch"] for row in rows] == ["0"], "a rank other than 0 wrote metrics"
    checkpoint = read_checkpoint(output / "last.pth")
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2
    assert checkpoint["rng"][0]["mixer"] != checkpoint["rng"][1]["mixer"], "both ranks drew the same mixes"
    # Different mixes, one model: DDP's averaged gradients leave both ranks with the same weights,
    # the ones rank 0 saved, and training moved them.
    ranks = [torch.load(tmp_path / f"rank{rank}.pth", map_location="cpu", weights_only=True) for rank in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() == checkpoint["state_dict"].keys()
    for name, weight in ranks[0].items():
        assert torch.equal(weight, ranks[1][name]), f"{name} differs between the ranks"
        assert torch.equal(weight, checkpoint["state_dict"][name]), f"{name} differs from rank 0's checkpoint"
    random_seed(checkpoint["args"]["seed"], 0)  # the run's initial weights, as build_run seeds them
    initial = build_model(argparse.Namespace(**checkpoint["args"]), len(ranks[0]["head.bias"])).state_dict()
    assert any(not torch.equal(initial[name], weight) for name, weight in ranks[0].items()), "no weight moved"

    # One process evaluating the same weights on the whole val split gives the reduced figure.
    capsys.readouterr()
    main(["--eval-only", "--resume", str(output / "last.pth"), "--limit-val-batches", "none"])
    out = capsys.readouterr().err
    assert f"val top-1 {float(rows[0]['val_top1']):.2f} top-5 {float(rows[0]['val_top5']):.2f}" in out
    assert "(359 images)" in out
