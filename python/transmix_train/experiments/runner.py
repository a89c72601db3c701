"""The runner: each planned run as a ``transmix-train`` subprocess, within a wall-clock budget.

A run takes a lock file in its folder (two ``transmix-experiment`` calls on one ``--output``
never train the same run at once), continues from its ``last.pth`` when one is there, and on
success leaves ``result.json`` (final and best top-1, throughput, parameters, wall time, code
version, the digest of the first mixing draws). Runs go seed by seed, ``jobs`` side by side; a
run is not started when the mean wall time of the runs so far says it would not fit in the
budget left.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .grid import Grid, needed_prerequisites
from .planning import RunSpec, plan_runs
from .report import write_outputs
from .stats import summarise
from .version import check_unchanged, code_version

__all__ = ["run_grid"]

Log = Callable[[str], Any]


def _parameters(checkpoint: Path) -> int:
    """Trainable-parameter count of a transmix-train checkpoint (BatchNorm statistics excluded)."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    skip = ("running_mean", "running_var", "num_batches_tracked")
    return sum(t.numel() for k, t in state.items() if not k.endswith(skip))


def _read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _mix_digest(folder: Path) -> Optional[dict[str, Any]]:
    """The trainer's fingerprint of its first mixing draws (``mix_digest.json``), if it wrote one."""
    path = folder / "mix_digest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _finish(spec: RunSpec, wall_s: float) -> dict[str, Any]:
    """result.json of a finished run: final and best top-1, throughput, parameters, wall time."""
    rows = _read_metrics(spec.output / "metrics.csv")
    top1 = [float(r["val_top1"]) for r in rows]
    result = {
        "cell": spec.cell.name, "seed": spec.seed, "epochs": len(rows), "top1": top1[-1], "best_top1": max(top1),
        "images_per_s": sum(float(r["images_per_s"]) for r in rows) / len(rows),
        "train_s": sum(float(r["seconds"]) for r in rows), "wall_s": wall_s,
        "params": _parameters(spec.output / "last.pth"), "argv": spec.argv, "code": code_version(),
        "mix_digest": _mix_digest(spec.output),
    }
    (spec.output / "result.json").write_text(json.dumps(result, indent=1))
    return result


def _claim(folder: Path) -> bool:
    """Take ``folder/runner.lock`` for this process; False while another live process holds it.

    Two ``transmix-experiment`` calls on one ``--output`` (grids that share cells) then never
    train the same run at once; a lock left by a killed process is taken over.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "runner.lock"
    for _ in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(lock.read_text() or 0), 0)
                return False  # alive
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # stale
                continue
            except PermissionError:
                return False  # alive, another user's
        os.write(handle, str(os.getpid()).encode())
        os.close(handle)
        return True
    return False


def _execute(spec: RunSpec, timeout: Optional[float], threads: Optional[int], log: Log) -> Optional[dict[str, Any]]:
    """Run (or continue) one ``transmix-train``; its result, or None when it failed, ran out of time
    or runs in another process."""
    if not _claim(spec.output):
        log(f"  {spec.output.name}: running in another process, skipped")
        return None
    try:
        return _train(spec, timeout, threads, log)
    finally:
        (spec.output / "runner.lock").unlink(missing_ok=True)


def _train(spec: RunSpec, timeout: Optional[float], threads: Optional[int], log: Log) -> Optional[dict[str, Any]]:
    argv = list(spec.argv)
    if (spec.output / "last.pth").is_file():
        argv += ["--resume", str(spec.output / "last.pth")]  # a killed run continues exactly
    spec.output.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "transmix_train.main", *argv, "--output", str(spec.output)]
    env = dict(os.environ)
    if threads:
        # Small models on a shared CPU: one thread per run and runs side by side beat one run's
        # threads waiting on each other (measured 25x on a loaded 2-core machine for the data set-up).
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log(f"run {spec.output.name} seed {spec.seed}: {shlex.join(command[3:])}")
    start = time.perf_counter()
    with open(spec.output / "runner.log", "a") as out:
        try:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env=env).returncode
        except subprocess.TimeoutExpired:
            log(f"  {spec.output.name}: stopped at the budget after {time.perf_counter() - start:.0f} s "
                "(continues on the next call)")
            return None
    wall = time.perf_counter() - start
    if code != 0:
        log(f"  {spec.output.name}: failed with exit code {code}: see {spec.output / 'runner.log'}")
        return None
    result = _finish(spec, wall)
    log(f"  {spec.output.name} seed {spec.seed}: top-1 {result['top1']:.2f} "
        f"({result['images_per_s']:.0f} img/s, {wall:.0f} s)")
    return result


class _Budget:
    """Wall-clock budget shared by the runs of one call; a run starts only when it should fit."""

    def __init__(self, seconds: Optional[float]) -> None:
        self.seconds, self.start, self.walls, self.lock = seconds, time.perf_counter(), [], threading.Lock()

    def left(self) -> Optional[float]:
        return None if self.seconds is None else self.seconds - (time.perf_counter() - self.start)

    def admit(self, log: Log) -> bool:
        with self.lock:
            left = self.left()
            estimate = sum(self.walls) / len(self.walls) if self.walls else 0.0
            if left is not None and (left <= 0 or estimate > left):
                log(f"budget: {max(left, 0):.0f} s left, a run takes about {estimate:.0f} s: not started")
                return False
            return True

    def record(self, result: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        if result is not None:
            with self.lock:
                self.walls.append(result["wall_s"])
        return result


def run_grid(grid: Grid, output: Path, *, seeds: int = 3, data: Optional[str] = None, extra: Sequence[str] = (),
             config: Optional[str] = None, budget_s: Optional[float] = None, jobs: int = 1,
             threads: Optional[int] = None, log: Log = print) -> dict[str, Any]:
    """Run what is missing within ``budget_s`` seconds (``jobs`` runs side by side, ``threads`` each),
    then write the table and plot; returns the summary."""
    prerequisites, runs = plan_runs(grid, output, seeds, data, extra, config)
    budget = _Budget(budget_s)

    def attempt(spec: RunSpec) -> None:
        if not spec.done and budget.admit(log):
            check_unchanged()  # a run must run the code its folder is named after
            budget.record(_execute(spec, budget.left(), threads, log))

    for spec in prerequisites.values():  # the cells read their checkpoints: first, one at a time
        attempt(spec)
    ready = {key for key, spec in prerequisites.items() if spec.done}
    pending = [spec for spec in runs if not spec.done and needed_prerequisites(spec.cell, grid.args) <= ready]
    if len(pending) < sum(not spec.done for spec in runs):
        log(f"prerequisites not ready ({', '.join(sorted(set(prerequisites) - ready))}): their cells are skipped")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(attempt, pending))  # in order: seed 0 of every cell first
    summary = summarise(grid, prerequisites, runs, seeds)
    write_outputs(grid, summary, output)
    return summary
