"""Run tracking (``--log-tensorboard``, ``--log-wandb``) and the summary line that ends a run.

The trackers must hold exactly the rows of ``metrics.csv``; W&B runs in its offline mode, and its
run file is read back here (a LevelDB-style log of protobuf records, as W&B writes it).
"""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import pytest
import yaml
import wandb  # the track extra: fail loudly when it is missing
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from train_tiny import read_metrics, TINY
from transmix_train.config import parse_args
from transmix_train.main import main
from transmix_train.outputs import METRIC_FIELDS
from transmix_train.tracking import open_trackers, TENSORBOARD_DIR

TWO_EPOCHS = [*TINY, "--epochs", "2", "--warmup-epochs", "1"]
# The columns a tracker gets: every metric with a value (ema_top1 is empty without --model-ema).
LOGGED = [name for name in METRIC_FIELDS if name not in ("epoch", "ema_top1")]


def _columns(rows: list[dict[str, str]]) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv as {column: [(epoch, value), ...]}."""
    return {name: [(int(row["epoch"]), float(row[name])) for row in rows] for name in LOGGED}


def _assert_same(logged: dict[str, list[tuple[int, float]]], rows: list[dict[str, str]]) -> None:
    # metrics.csv keeps 6 significant digits; the trackers keep float32 (TensorBoard) or float64.
    for name, expected in _columns(rows).items():
        got = logged.get(name)
        assert got is not None, f"{name} was not logged"
        assert [epoch for epoch, _ in got] == [epoch for epoch, _ in expected], name
        assert [value for _, value in got] == pytest.approx([value for _, value in expected], rel=1e-5), name


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> Path:
    """Two epochs with --log-tensorboard, stopped after the first and resumed."""
    output = tmp_path_factory.mktemp("tracked") / "run"
    main([*TWO_EPOCHS, "--log-tensorboard", "--output", str(output), "--stop-after-epochs", "1"])
    main(["--resume", str(output / "last.pth")])
    return output


def test_tensorboard_scalars_equal_metrics_csv(resumed_run):
    rows = read_metrics(resumed_run)
    assert [row["epoch"] for row in rows] == ["0", "1"]
    events = EventAccumulator(str(resumed_run / TENSORBOARD_DIR))
    events.Reload()
    assert len(list((resumed_run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2  # one per invocation
    logged = {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert "ema_top1" not in logged
    _assert_same(logged, rows)
    (curves,) = resumed_run.glob("curves.png")  # the curves stay


def test_summary_line_names_final_best_time_and_outputs(resumed_run):
    rows = read_metrics(resumed_run)
    lines = [line for line in (resumed_run / "train.log").read_text().splitlines() if " done: " in line]
    assert len(lines) == 2, "one summary line per invocation"
    match = re.search(r"done: final val top-1 ([\d.]+)% \(epoch (\d+)\), best ([\d.]+)% \(epoch (\d+)\); "
                      r"wall time ([\d.]+) s; checkpoints in (\S+)/ \(([^)]*)\); curves (\S+)$", lines[-1])
    assert match, lines[-1]
    final, final_epoch, best, best_epoch, seconds, folder, checkpoints, curves = match.groups()
    top1 = [float(row["val_top1"]) for row in rows]
    assert (float(final), int(final_epoch)) == (pytest.approx(top1[-1], abs=5e-3), len(rows) - 1)
    # best: the first epoch that reached the highest top-1 (a tie does not replace it)
    assert (float(best), int(best_epoch)) == (pytest.approx(max(top1), abs=5e-3), top1.index(max(top1)))
    assert float(seconds) > 0
    assert Path(folder) == resumed_run and {"last.pth", "best.pth"} <= set(checkpoints.split(", "))
    assert all((resumed_run / name).is_file() for name in checkpoints.split(", "))
    assert Path(curves) == resumed_run / "curves.png" and Path(curves).is_file()


def _wandb_records(run_file: Path) -> list:
    """The protobuf records of a W&B run file: a 7-byte header (":W&B", 0xBEE1, version 0), then
    LevelDB log blocks of 32 KiB whose records are split in full/first/middle/last chunks."""
    data = run_file.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zero fill to the end of the block
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _items(items) -> dict:
    """W&B's key/value items (a key, or a nested key path) as a dict of decoded JSON values."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def test_wandb_offline_run_holds_metrics_and_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    output = tmp_path / "run"
    main([*TWO_EPOCHS, "--log-wandb", "--wandb-project", "transmix-test", "--wandb-tags", "tiny", "ci",
          "--output", str(output)])
    wandb.teardown()  # the W&B service writes the run file on its own: wait until it has finished
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = _wandb_records(run_file)
    history = [_items(record.history.item) for record in records if record.WhichOneof("record_type") == "history"]
    logged: dict[str, list[tuple[int, float]]] = {}
    for row in history:
        for name in LOGGED:
            logged.setdefault(name, []).append((row["epoch"], row[name]))
    _assert_same(logged, read_metrics(output))
    (run,) = [record.run for record in records if record.WhichOneof("record_type") == "run"]
    config = _items(run.config.update)
    # the resolved config: what config.yaml holds (it leaves out only --config itself)
    assert {key: value for key, value in config.items() if key not in ("_wandb", "config")} == \
        yaml.safe_load((output / "config.yaml").read_text())
    assert config["log_wandb"] is True and config["epochs"] == 2
    assert run.project == "transmix-test" and list(run.tags) == ["tiny", "ci"] and run.display_name == "run"
    assert not (output / "wandb").exists()  # WANDB_DIR wins over the output folder


@pytest.mark.parametrize("flag, module, package", [("--log-wandb", "wandb", "wandb"),
                                                   ("--log-tensorboard", "torch.utils.tensorboard", "tensorboard")])
def test_missing_package_stops_at_set_up(tmp_path, monkeypatch, flag, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    output = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, flag, "--output", str(output)])
    message = str(exit_info.value.code)
    assert flag in message and f"the {package} package" in message and "transmix-kernels[track]" in message
    assert not output.exists(), "a missing tracker package left an output folder behind"


def test_only_rank_zero_opens_trackers(tmp_path):
    args = parse_args([*TINY, "--log-tensorboard", "--log-wandb"])
    trackers = open_trackers(args, tmp_path, {}, primary=False, start_epoch=0, log=print)
    assert trackers.tensorboard is None and trackers.wandb_run is None
    trackers.log({"epoch": 0, "train_loss": 1.0})  # a no-op there
    trackers.close()
    assert list(tmp_path.iterdir()) == []
