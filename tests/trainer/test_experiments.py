"""transmix-experiment: grids load and fail clearly, runs are shared and resumed, tables add up.

One test trains for real (two cells, one seed, a few images, subprocesses of transmix-train);
the rest check the planning and the statistics without training.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

import transmix_train.experiments as experiments
import transmix_train.experiments.planning as planning
from transmix_train.experiments import load_grid, main, plan_runs, run_grid, summarise
from transmix_train.experiments.version import code_version, source_digest

TINY_CONFIG = {
    "data": "shapes", "img_size": 16, "train_size": 16, "val_size": 8, "model": "deit_tiny_patch16_224",
    "model_kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "batch_size": 8, "epochs": 1, "warmup_epochs": 0, "device": "cpu", "workers": 0, "aa": "none",
    "hflip": 0.0, "crop_pct": 1.0, "log_interval": 10,
}


def write_grid(folder: Path, cells: list[dict], **extra) -> Path:
    (folder / "tiny.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    grid = {"title": "tiny", "config": "tiny.yaml", "reference": cells[0]["name"], "cells": cells, **extra}
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_two_cells_run_then_resume_without_rerunning(tmp_path):
    grid = load_grid(str(write_grid(tmp_path, [{"name": "CutMix", "args": ["--mix", "cutmix"]},
                                              {"name": "TransMix", "args": ["--mix", "transmix"]}])))
    out, lines = tmp_path / "out", []
    summary = run_grid(grid, out, seeds=1, jobs=2, threads=1, budget_s=300, log=lines.append)
    assert [row["n"] for row in summary["rows"]] == [1, 1], lines
    table = (out / "grid.md").read_text()
    assert "| CutMix |" in table and "| TransMix |" in table and (out / "grid.png").stat().st_size > 0
    # TransMix relabels CutMix's draws: the paired runs drew the same boxes, partners and lambdas.
    transmix = summary["rows"][1]
    assert (transmix["same_draws"], transmix["draws_known"]) == (1, 1), transmix
    results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]
    assert all(r["code"] == code_version() and r["mix_digest"]["steps"] == 2 for r in results), results
    folders = sorted(p for p in (out / "runs").iterdir())
    assert len(folders) == 2 and all((f / "metrics.csv").is_file() and (f / "result.json").is_file() for f in folders)

    # A run killed after its checkpoint (no result.json) continues from last.pth; the other is kept.
    killed = folders[1]
    (killed / "result.json").unlink()
    lines.clear()
    run_grid(grid, out, seeds=1, threads=1, budget_s=300, log=lines.append)
    started = [line for line in lines if line.startswith("run ")]
    assert len(started) == 1 and killed.name in started[0] and "--resume" in started[0], lines
    assert (killed / "result.json").is_file()

    lines.clear()
    again = run_grid(grid, out, seeds=1, threads=1, budget_s=300, log=lines.append)
    assert not [line for line in lines if line.startswith("run ")], "a finished grid ran again"
    assert [row["top1"] for row in again["rows"]] == [row["top1"] for row in summary["rows"]]


def test_budget_stops_before_a_run(tmp_path):
    grid = load_grid(str(write_grid(tmp_path, [{"name": "a", "args": ["--mix", "none"]}])))
    lines = []
    summary = run_grid(grid, tmp_path / "out", seeds=1, budget_s=0.0, log=lines.append)
    assert summary["rows"][0]["n"] == 0 and any("budget" in line for line in lines)
    assert "not run" in (tmp_path / "out" / "grid.md").read_text()
    assert not (tmp_path / "out" / "grid.png").exists()


def test_builtin_grids_share_runs_and_fill_prerequisites(tmp_path):
    out = tmp_path / "shapes"
    ids = {}
    for name in ("table1", "table2", "table3"):
        _, runs = plan_runs(load_grid(name), out, 1)
        ids[name] = {spec.cell.name: spec.output.name.rsplit("-", 2)[1] for spec in runs}  # the config hash
    assert ids["table1"]["d = 6 (last)"] == ids["table2"]["TransMix"] == ids["table3"]["+ TransMix"]
    assert ids["table2"]["CutMix"] == ids["table3"]["+ CutMix"]
    assert ids["table2"]["Baseline (Mixup)"] == ids["table3"]["+ Mixup"]
    assert len(set(ids["table1"].values())) == 5
    prerequisites, runs = plan_runs(load_grid("table2"), out, 2, data="digits")
    attentive = [spec for spec in runs if spec.cell.name == "Attentive-CutMix"]
    assert attentive[0].argv[attentive[0].argv.index("--attentive-checkpoint") + 1] == \
        str(prerequisites["extractor"].output / "last.pth")
    assert "--data" in attentive[0].argv and [s.seed for s in attentive] == [0, 1]


@pytest.mark.parametrize("grid, message", [
    ({"cells": []}, "non-empty 'cells'"),
    ({"cells": [{"name": "a", "args": [], "colour": 1}]}, "unknown keys"),
    ({"cells": [{"name": "a"}, {"name": "a"}]}, "unique"),
    ({"cells": [{"name": "a"}], "reference": "b"}, "reference 'b'"),
    ({"cells": [{"name": "a", "args": ["--teacher", "{teacher}"]}]}, "unknown prerequisites"),
], ids=["no-cells", "unknown-key", "duplicate", "reference", "prerequisite"])
def test_bad_grids_are_named(tmp_path, grid, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(grid))
    with pytest.raises(ValueError, match=message):
        load_grid(str(path))


def test_unknown_grid_and_bad_flags_exit_with_a_message(capsys):
    with pytest.raises(SystemExit, match="table9"):
        main(["table9"])
    with pytest.raises(SystemExit, match="--seeds"):
        main(["table2", "--seeds", "0"])


@pytest.mark.parametrize("args, reason", [
    (["--mixx", "cutmix"], "unrecognized arguments: --mixx"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
], ids=["unknown-flag", "invalid-value"])
def test_a_cell_the_trainer_rejects_is_named_with_the_reason(tmp_path, capsys, args, reason):
    grid = load_grid(str(write_grid(tmp_path, [{"name": "bad cell", "args": args}])))
    with pytest.raises(ValueError) as error:
        plan_runs(grid, tmp_path / "out", 1)
    assert "cell 'bad cell'" in str(error.value) and reason in str(error.value)
    assert capsys.readouterr().err == "", "the trainer's parser printed instead of raising"


def _fake_results(tmp_path, top1: dict, digests: dict | None = None, code: dict | None = None):
    grid = load_grid(str(write_grid(tmp_path, [{"name": name, "args": ["--mix", mix]} for name, mix in
                                               (("ref", "cutmix"), ("new", "mixup"))])))
    prerequisites, runs = plan_runs(grid, tmp_path / "out", 3)
    for spec in runs:
        spec.output.mkdir(parents=True)
        digest = {"steps": 20, "sha256": digests[spec.cell.name][spec.seed]} if digests else None
        result = {"seed": spec.seed, "top1": top1[spec.cell.name][spec.seed], "images_per_s": 100.0, "wall_s": 10.0,
                  "params": 1000, "code": code or code_version(), "mix_digest": digest}
        (spec.output / "result.json").write_text(json.dumps(result))
    return grid, prerequisites, runs


def test_summary_statistics_pair_by_seed(tmp_path):
    top1 = {"ref": [50.0, 52.0, 54.0], "new": [60.0, 61.0, 62.0]}
    digests = {"ref": ["a", "b", "c"], "new": ["a", "b", "x"]}
    grid, prerequisites, runs = _fake_results(tmp_path, top1, digests)
    rows = {row["name"]: row for row in summarise(grid, prerequisites, runs, 3)["rows"]}
    assert rows["ref"]["mean"] == 52.0 and rows["ref"]["std"] == 2.0 and rows["new"]["std"] == 1.0
    # Per-seed differences 10, 9, 8: mean 9, std 1, t(0.975, 2) = 4.302653 -> half-width 4.302653 / sqrt(3).
    assert rows["new"]["delta"] == 9.0 and rows["new"]["paired_seeds"] == [0, 1, 2]
    low, high = rows["new"]["delta_ci"]
    assert math.isclose(high - 9.0, 4.302653 / math.sqrt(3), rel_tol=1e-6) and math.isclose(9.0 - low, high - 9.0)
    assert (rows["new"]["same_draws"], rows["new"]["draws_known"]) == (2, 3)
    assert "delta" not in rows["ref"]
    table = (tmp_path / "grid.md")
    experiments.write_outputs(grid, summarise(grid, prerequisites, runs, 3), tmp_path)
    assert "| +9.00 [+6.52, +11.48] (n=3) | 2/3 |" in table.read_text()


def test_a_result_of_other_code_is_refused(tmp_path):
    other = {**code_version(), "source": "0" * 64}
    grid, prerequisites, runs = _fake_results(tmp_path, {"ref": [1.0] * 3, "new": [2.0] * 3}, code=other)
    with pytest.raises(ValueError, match="made by other code"):
        summarise(grid, prerequisites, runs, 3)


def test_runs_of_other_code_are_not_reused(tmp_path, monkeypatch):
    grid, _, runs = _fake_results(tmp_path, {"ref": [1.0] * 3, "new": [2.0] * 3})
    assert all(spec.done and spec.output.name.endswith(source_digest()[:8]) for spec in runs)
    monkeypatch.setattr(planning, "code_version", lambda: {**code_version(), "source": "f" * 64})
    _, again = plan_runs(grid, tmp_path / "out", 3)
    assert not any(spec.done for spec in again), "a run made by other code was reused"
    assert {spec.output for spec in again}.isdisjoint(spec.output for spec in runs)


def test_source_digest_follows_the_code(tmp_path, monkeypatch):
    import transmix_train.experiments.version as version

    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "a.py").write_text("x = 1\n")
    (root / "sub" / "b.yaml").write_text("lr: 1\n")
    (root / "notes.md").write_text("not code\n")
    monkeypatch.setattr(version, "_source_roots", lambda: [root])
    digests = []
    for change in (None, ("notes.md", "edited\n"), ("sub/b.yaml", "lr: 2\n")):
        if change:
            (root / change[0]).write_text(change[1])
        version.source_digest.cache_clear()
        digests.append(version.source_digest())
    version.source_digest.cache_clear()
    assert digests[0] == digests[1] != digests[2]


def test_a_run_held_by_another_process_is_skipped(tmp_path):
    grid = load_grid(str(write_grid(tmp_path, [{"name": "a", "args": ["--mix", "none"]}])))
    _, runs = plan_runs(grid, tmp_path / "out", 1)
    runs[0].output.mkdir(parents=True)
    (runs[0].output / "runner.lock").write_text(str(os.getppid()))  # a live process
    lines = []
    summary = run_grid(grid, tmp_path / "out", seeds=1, log=lines.append)
    assert summary["rows"][0]["n"] == 0 and any("another process" in line for line in lines), lines
    assert not (runs[0].output / "metrics.csv").exists()


def test_the_package_is_the_command():
    """transmix-experiment (the console script) and ``python -m transmix_train.experiments`` both
    reach the package's main (its modules: grid, planning, runner, stats, report, plot, cli)."""
    script = entry_points(group="console_scripts")["transmix-experiment"]
    assert script.value == "transmix_train.experiments:main" and script.load() is experiments.main
    done = subprocess.run([sys.executable, "-m", "transmix_train.experiments", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: transmix-experiment"), done.stderr


def test_a_grid_stops_when_the_code_changes_under_it(tmp_path, monkeypatch):
    import transmix_train.experiments.version as version

    root = tmp_path / "pkg"
    root.mkdir()
    (root / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(version, "_source_roots", lambda: [root])
    version.source_digest.cache_clear()
    try:
        version.check_unchanged()  # planned and current agree
        (root / "a.py").write_text("x = 2\n")
        with pytest.raises(RuntimeError, match="the source changed since the grid was planned"):
            version.check_unchanged()
    finally:
        version.source_digest.cache_clear()
