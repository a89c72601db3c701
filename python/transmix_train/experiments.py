"""``transmix-experiment``: the paper's comparison tables, re-run on your data with several seeds.

    transmix-experiment table2                              # embedded shapes, CPU scale, 3 seeds
    transmix-experiment table2 --data digits --seeds 3 --budget-minutes 30
    transmix-experiment my_grid.yaml --config my_trainer.yaml --train-args "--epochs 100"

A grid (``table1``, ``table2``, ``table3``, ``distill`` in ``python/configs/grids``, or a YAML
file of the same form) names cells; each cell is one ``transmix-train`` run per seed, started
as a subprocess with its own ``--output``. Each run's folder is named by a hash of its resolved
trainer config, so a finished run (``result.json``) is never run again, a killed one continues
from its ``last.pth``, and grids that share a cell (Table 3's +CutMix is Table 2's CutMix)
share its runs when they write to the same ``--output``. Runs go seed by seed (every cell's
seed 0, then seed 1, ...), so a budget that runs out leaves every cell with as many seeds as
possible; a run is not started when the mean time of the runs so far says it would not fit.

Grid YAML::

    title: Supplementary Table 2 ...           # the table's heading
    config: cpu_scale.yaml                     # trainer config (relative: python/configs/grids)
    args: [--epochs, "8"]                      # flags of every run
    reference: CutMix                          # the cell the others are compared with
    prerequisites:                             # trained once per data set (seed 0) before the cells
      extractor: {config: cpu_scale_cnn.yaml, args: [--model, resnet18, --mix, none]}
    cells:
      - {name: CutMix, args: [--mix, cutmix], paper: 79.8}
      - {name: Attentive-CutMix, args: [--mix, attentive_cutmix, --attentive-checkpoint, "{extractor}"],
         paper: 77.5, extra_params: extractor}  # {name} -> the prerequisite's last.pth

Outputs in ``--output``: ``<grid>.md`` (mean and std of the final-epoch val top-1 over seeds,
the difference to the reference with its standard error, parameters, images/s, wall time per
run), ``<grid>.png`` (bars with std error bars and the seeds as dots), ``<grid>.json``, and
``runs/<cell>-<hash>/`` with each run's ``metrics.csv``, ``config.yaml``, ``train.log`` and
``result.json``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

__all__ = [
    "BUILTIN_GRIDS",
    "Cell",
    "Grid",
    "RunSpec",
    "build_parser",
    "grid_dir",
    "load_grid",
    "main",
    "plan_runs",
    "run_grid",
    "summarise",
    "write_outputs",
]

BUILTIN_GRIDS = ("table1", "table2", "table3", "distill")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def grid_dir() -> Path:
    """``python/configs/grids`` (installed as ``transmix_train.configs/grids``)."""
    from importlib import resources

    return Path(str(resources.files("transmix_train.configs").joinpath("grids")))


@dataclass
class Cell:
    """One row of a table: a name, the trainer flags that make it, the paper's number if any."""

    name: str
    args: list[str]
    config: Optional[str] = None
    paper: Optional[float] = None
    extra_params: Optional[str] = None  # a prerequisite whose parameters the method adds


@dataclass
class Grid:
    """A named set of cells with shared flags (see the module docstring for the YAML form)."""

    name: str
    title: str
    config: str
    args: list[str]
    cells: list[Cell]
    reference: Optional[str] = None
    prerequisites: dict[str, Cell] = field(default_factory=dict)
    notes: str = ""


def _resolve_config(name: Optional[str], base: Path) -> Optional[str]:
    if name is None:
        return None
    path = Path(name)
    return str(path if path.is_absolute() or path.exists() else base / path)


def _cell(entry: Any, where: str, base: Path, default_config: Optional[str]) -> Cell:
    if not isinstance(entry, dict) or "name" not in entry:
        raise ValueError(f"{where}: expected a mapping with 'name' and 'args', got {entry!r}")
    unknown = set(entry) - {"name", "args", "config", "paper", "extra_params"}
    if unknown:
        raise ValueError(f"{where} {entry['name']!r}: unknown keys {sorted(unknown)}")
    args = [str(a) for a in entry.get("args") or []]
    return Cell(str(entry["name"]), args, _resolve_config(entry.get("config"), base) or default_config,
                entry.get("paper"), entry.get("extra_params"))


def load_grid(name_or_path: str) -> Grid:
    """A built-in grid by name or a YAML grid file; a ``ValueError`` naming what is wrong."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = grid_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ValueError(f"grid {name_or_path!r}: not a file and not one of {', '.join(BUILTIN_GRIDS)}")
    if not path.is_file():
        raise ValueError(f"grid {name_or_path!r}: no such file")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not data.get("cells"):
        raise ValueError(f"grid {path}: expected a mapping with a non-empty 'cells' list")
    base = path.parent
    config = _resolve_config(data.get("config"), base)
    cells = [_cell(entry, f"grid {path}: cell", base, config) for entry in data["cells"]]
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise ValueError(f"grid {path}: cell names must be unique, got {names}")
    prerequisites = {key: _cell({"name": key, **value}, f"grid {path}: prerequisite", base, config)
                     for key, value in (data.get("prerequisites") or {}).items()}
    reference = data.get("reference")
    if reference is not None and reference not in names:
        raise ValueError(f"grid {path}: reference {reference!r} is not a cell ({', '.join(names)})")
    grid_args = [str(a) for a in data.get("args") or []]
    for cell in cells:
        missing = _needs(cell, grid_args) - set(prerequisites)
        if missing:
            raise ValueError(f"grid {path}: cell {cell.name!r} names unknown prerequisites {sorted(missing)}")
    return Grid(path.stem, str(data.get("title") or path.stem), config or "", grid_args, cells, reference,
                prerequisites, str(data.get("notes") or ""))


@dataclass
class RunSpec:
    """One ``transmix-train`` run: its cell, seed, folder and flags (placeholders filled in)."""

    cell: Cell
    seed: int
    output: Path
    argv: list[str]

    @property
    def done(self) -> bool:
        return (self.output / "result.json").is_file()


def _argv(cell: Cell, grid: Grid, seed: int, data: Optional[str], extra: Sequence[str],
          fill: dict[str, str], config: Optional[str]) -> list[str]:
    argv = ["--config", config or cell.config or grid.config, *grid.args, *cell.args]
    if data:
        argv += ["--data", data]
    argv += [*extra, "--seed", str(seed)]
    return [_PLACEHOLDER.sub(lambda m: fill[m.group(1)], a) for a in argv]


def _run_id(cell: Cell, argv: list[str]) -> str:
    """``<slug>-<hash>``: the hash of the resolved trainer config (what the run computes)."""
    from .config import build_parser as build_trainer_parser, config_dict, parse_args

    try:
        values = config_dict(parse_args(argv))
    except SystemExit:  # the trainer's parser printed what is wrong
        raise ValueError(f"cell {cell.name!r}: transmix-train rejects its flags {shlex.join(argv)}") from None
    # Only what differs from the trainer's defaults: a flag added to the trainer later (with a
    # default that keeps old behaviour) leaves the ids, and so the finished runs, valid.
    defaults = config_dict(build_trainer_parser().parse_args([]))
    values = {k: v for k, v in values.items() if v != defaults.get(k)}
    for key in ("output", "resume", "eval_only", "stop_after_epochs", "config", "log_interval"):
        values.pop(key, None)
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9]+", "-", cell.name.lower()).strip("-")
    return f"{slug}-{digest}"


def _run_folder(runs_dir: Path, run_id: str) -> Path:
    """The folder of a run: an existing one with the same config hash (a cell of another grid
    named differently, e.g. Table 1's "d = 6 (last)" is Table 2's "TransMix"), else a new name."""
    digest = run_id.rsplit("-", 1)[-1]
    existing = sorted(runs_dir.glob(f"*-{digest}")) if runs_dir.is_dir() else []
    return existing[0] if existing else runs_dir / run_id


def plan_runs(grid: Grid, output: Path, seeds: int, data: Optional[str] = None, extra: Sequence[str] = (),
              config: Optional[str] = None) -> tuple[dict[str, RunSpec], list[RunSpec]]:
    """(prerequisite runs by name, cell runs seed by seed); folders named by config hash."""
    runs_dir = output / "runs"
    prerequisites: dict[str, RunSpec] = {}
    for key, cell in grid.prerequisites.items():
        # Prerequisites keep their own config: --config is for the cells' model (a CNN is not a ViT).
        argv = _argv(cell, Grid(key, key, cell.config or grid.config, [], []), 0, data, extra, {}, None)
        prerequisites[key] = RunSpec(cell, 0, _run_folder(runs_dir, _run_id(cell, argv)), argv)
    # Hash with the prerequisite's id, run with its path (the id does not depend on where output is).
    ids = {key: f"prerequisite:{spec.output.name}" for key, spec in prerequisites.items()}
    paths = {key: str(spec.output / "last.pth") for key, spec in prerequisites.items()}
    runs = []
    for seed in range(seeds):
        for cell in grid.cells:
            identity = _argv(cell, grid, seed, data, extra, ids, config)
            runs.append(RunSpec(cell, seed, _run_folder(runs_dir, _run_id(cell, identity)),
                                _argv(cell, grid, seed, data, extra, paths, config)))
    return prerequisites, runs


def _parameters(checkpoint: Path) -> int:
    """Trainable-parameter count of a transmix-train checkpoint (BatchNorm statistics excluded)."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    skip = ("running_mean", "running_var", "num_batches_tracked")
    return sum(t.numel() for k, t in state.items() if not k.endswith(skip))


def _read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _commit() -> Optional[str]:
    """The checkout's git commit (provenance of a result), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _finish(spec: RunSpec, wall_s: float) -> dict[str, Any]:
    """result.json of a finished run: final and best top-1, throughput, parameters, wall time."""
    rows = _read_metrics(spec.output / "metrics.csv")
    top1 = [float(r["val_top1"]) for r in rows]
    result = {
        "cell": spec.cell.name, "seed": spec.seed, "epochs": len(rows), "top1": top1[-1], "best_top1": max(top1),
        "images_per_s": sum(float(r["images_per_s"]) for r in rows) / len(rows),
        "train_s": sum(float(r["seconds"]) for r in rows), "wall_s": wall_s,
        "params": _parameters(spec.output / "last.pth"), "argv": spec.argv, "commit": _commit(),
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


def _execute(spec: RunSpec, timeout: Optional[float], threads: Optional[int], log) -> Optional[dict[str, Any]]:
    """Run (or continue) one ``transmix-train``; its result, or None when it failed, ran out of time
    or runs in another process."""
    if not _claim(spec.output):
        log(f"  {spec.output.name}: running in another process, skipped")
        return None
    try:
        return _train(spec, timeout, threads, log)
    finally:
        (spec.output / "runner.lock").unlink(missing_ok=True)


def _train(spec: RunSpec, timeout: Optional[float], threads: Optional[int], log) -> Optional[dict[str, Any]]:
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

    def admit(self, log) -> bool:
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


def _needs(cell: Cell, grid_args: Sequence[str]) -> set[str]:
    """The prerequisites a cell's runs need (placeholders in its flags, the grid's, its extra_params)."""
    names = {m for a in [*grid_args, *cell.args] for m in _PLACEHOLDER.findall(a)}
    return names | ({cell.extra_params} if cell.extra_params else set())


def run_grid(grid: Grid, output: Path, *, seeds: int = 3, data: Optional[str] = None, extra: Sequence[str] = (),
             config: Optional[str] = None, budget_s: Optional[float] = None, jobs: int = 1,
             threads: Optional[int] = None, log=print) -> dict[str, Any]:
    """Run what is missing within ``budget_s`` seconds (``jobs`` runs side by side, ``threads`` each),
    then write the table and plot; returns the summary."""
    prerequisites, runs = plan_runs(grid, output, seeds, data, extra, config)
    budget = _Budget(budget_s)

    def attempt(spec: RunSpec) -> None:
        if not spec.done and budget.admit(log):
            budget.record(_execute(spec, budget.left(), threads, log))

    for spec in prerequisites.values():  # the cells read their checkpoints: first, one at a time
        attempt(spec)
    ready = {key for key, spec in prerequisites.items() if spec.done}
    pending = [spec for spec in runs if not spec.done and _needs(spec.cell, grid.args) <= ready]
    if len(pending) < sum(not spec.done for spec in runs):
        log(f"prerequisites not ready ({', '.join(sorted(set(prerequisites) - ready))}): their cells are skipped")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(attempt, pending))  # in order: seed 0 of every cell first
    summary = summarise(grid, prerequisites, runs, seeds)
    write_outputs(grid, summary, output)
    return summary


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return mean, std


def _result(spec: RunSpec) -> Optional[dict[str, Any]]:
    return json.loads((spec.output / "result.json").read_text()) if spec.done else None


def summarise(grid: Grid, prerequisites: dict[str, RunSpec], runs: list[RunSpec], seeds: int) -> dict[str, Any]:
    """Per cell: top-1 mean/std over the finished seeds, the difference to the reference, costs."""
    extras = {key: _result(spec) for key, spec in prerequisites.items()}
    rows = []
    for cell in grid.cells:
        results = [r for r in (_result(s) for s in runs if s.cell is cell) if r is not None]
        row: dict[str, Any] = {"name": cell.name, "paper": cell.paper, "n": len(results), "seeds": seeds,
                               "top1": [r["top1"] for r in results], "args": cell.args}
        if results:
            row["mean"], row["std"] = _mean_std(row["top1"])
            row["images_per_s"] = sum(r["images_per_s"] for r in results) / len(results)
            row["wall_s"] = sum(r["wall_s"] for r in results) / len(results)
            extra = extras.get(cell.extra_params) if cell.extra_params else None
            row["params"] = results[0]["params"] + (extra["params"] if extra else 0)
            row["extra_params"] = extra["params"] if extra else 0
        rows.append(row)
    reference = next((r for r in rows if r["name"] == grid.reference and r["n"]), None)
    for row in rows:
        if reference is not None and row["n"] and row is not reference:
            row["delta"] = row["mean"] - reference["mean"]
            variance = sum(r["std"] ** 2 / r["n"] for r in (row, reference) if r["n"] > 1)
            row["delta_se"] = math.sqrt(variance) if row["n"] > 1 and reference["n"] > 1 else float("nan")
    return {"grid": grid.name, "title": grid.title, "reference": grid.reference, "notes": grid.notes, "rows": rows,
            "prerequisites": {k: v for k, v in extras.items() if v is not None}}


def _fmt(value: Optional[float], spec: str = ".2f") -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _table(summary: dict[str, Any]) -> list[str]:
    lines = ["| method | top-1 % (mean ± std) | seeds | Δ vs " + str(summary["reference"] or "-") +
             " (± s.e.) | per seed | params (M) | img/s | wall s/run | paper (ImageNet) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in summary["rows"]:
        if not row["n"]:
            lines.append(f"| {row['name']} | not run | 0/{row['seeds']} | | | | | | {_fmt(row['paper'], '.1f')} |")
            continue
        delta = ""
        if "delta" in row:
            beyond = row["delta_se"] > 0 and abs(row["delta"]) > 2 * row["delta_se"]
            delta = f"{row['delta']:+.2f}" + (f" ± {row['delta_se']:.2f}" if row["delta_se"] == row["delta_se"] else "")
            delta += " (> 2 s.e.)" if beyond else ""
        params = f"{row['params'] / 1e6:.3f}" + (f" (+{row['extra_params'] / 1e6:.2f})" if row["extra_params"] else "")
        lines.append(f"| {row['name']} | {row['mean']:.2f}{' ± ' + _fmt(row['std']) if row['n'] > 1 else ''} | {row['n']}/{row['seeds']} | {delta} | "
                     f"{', '.join(f'{v:.1f}' for v in row['top1'])} | {params} | {row['images_per_s']:.0f} | "
                     f"{row['wall_s']:.0f} | {_fmt(row['paper'], '.1f')} |")
    return lines


def _plot(summary: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["rows"] if r["n"]]
    fig, ax = plt.subplots(figsize=(1.3 * max(len(rows), 3) + 1, 3.6))
    xs = range(len(rows))
    ax.bar(xs, [r["mean"] for r in rows], yerr=[0 if math.isnan(r["std"]) else r["std"] for r in rows],
           capsize=4, color="#9ab", edgecolor="#345")
    for x, row in zip(xs, rows):
        ax.scatter([x] * row["n"], row["top1"], color="#222", s=10, zorder=3)
    ax.set_xticks(list(xs), [r["name"] for r in rows], rotation=20, ha="right", fontsize=8)
    low = min(min(r["top1"]) for r in rows) if rows else 0
    ax.set_ylim(max(0, low - 5), None)
    ax.set_ylabel("val top-1 % (mean ± std, dots: seeds)")
    ax.set_title(summary["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_outputs(grid: Grid, summary: dict[str, Any], output: Path) -> None:
    """``<grid>.md``, ``<grid>.json`` and (when a run finished) ``<grid>.png`` in ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    lines = [f"# {summary['title']}", ""]
    if summary["notes"]:
        lines += [summary["notes"].strip(), ""]
    lines += _table(summary)
    for key, result in summary["prerequisites"].items():
        lines += ["", f"Prerequisite `{key}` (trained once, seed 0): top-1 {result['top1']:.2f}, "
                      f"{result['params'] / 1e6:.2f}M parameters, {result['wall_s']:.0f} s."]
    lines += ["", "Top-1: val top-1 after the last epoch (no selection on val). s.e.: standard error of the "
                  "difference of means; '> 2 s.e.' marks a difference larger than twice it. Raw runs: `runs/`."]
    (output / f"{grid.name}.md").write_text("\n".join(lines) + "\n")
    (output / f"{grid.name}.json").write_text(json.dumps(summary, indent=1))
    if any(r["n"] for r in summary["rows"]):
        _plot(summary, output / f"{grid.name}.png")


def build_parser() -> argparse.ArgumentParser:
    """The ``transmix-experiment`` command line."""
    parser = argparse.ArgumentParser(prog="transmix-experiment", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("grid", help=f"{' | '.join(BUILTIN_GRIDS)} or a grid YAML file")
    parser.add_argument("--data", default=None, help="transmix-train --data of every run (default: the grid's, shapes)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per cell (0 .. N-1)")
    parser.add_argument("--config", default=None, help="trainer config of the cells (default: the grid's)")
    parser.add_argument("--train-args", default="", help="extra transmix-train flags of every run, one string")
    parser.add_argument("--budget-minutes", type=float, default=None, help="stop starting runs after this much time")
    parser.add_argument("--output", default=None, help="folder of the tables and runs (default experiments/<data>)")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (OMP_NUM_THREADS; default: torch's choice)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point of ``transmix-experiment``."""
    args = build_parser().parse_args(argv)
    if args.seeds < 1:
        sys.exit(f"transmix-experiment: error: --seeds must be >= 1, got {args.seeds}")
    for name in ("jobs", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            sys.exit(f"transmix-experiment: error: --{name} must be >= 1, got {getattr(args, name)}")
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        sys.exit(f"transmix-experiment: error: --budget-minutes must be > 0, got {args.budget_minutes}")
    try:
        grid = load_grid(args.grid)
        output = Path(args.output or f"experiments/{args.data or 'shapes'}")
        summary = run_grid(grid, output, seeds=args.seeds, data=args.data, extra=shlex.split(args.train_args),
                           config=args.config, budget_s=args.budget_minutes * 60 if args.budget_minutes else None,
                           jobs=args.jobs, threads=args.threads,
                           log=lambda text: print(text, flush=True))
    except ValueError as error:
        sys.exit(f"transmix-experiment: error: {error}")
    done = sum(r["n"] for r in summary["rows"])
    print(f"{grid.name}: {done} of {len(grid.cells) * args.seeds} runs finished; table {output / (grid.name + '.md')}")


if __name__ == "__main__":
    main()
