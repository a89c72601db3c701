"""Planning: each cell and seed of a grid becomes one ``transmix-train`` run with its own folder.

A run's folder is named by a hash of its resolved trainer config (only what differs from the
trainer's defaults) and by the code version (:mod:`.version`), so a finished run is found again by
any grid that asks for the same training with the same code, whatever that grid calls the cell
and wherever its prerequisites were written; runs of other code are never reused.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .grid import PLACEHOLDER, Cell, Grid
from .version import code_version

__all__ = ["RunSpec", "plan_runs"]


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
    return [PLACEHOLDER.sub(lambda m: fill[m.group(1)], a) for a in argv]


def _run_id(cell: Cell, argv: list[str]) -> str:
    """``<slug>-<config hash>-<code>``: the resolved trainer config (what the run computes) and the
    code version that computes it."""
    from ..config import build_parser as build_trainer_parser, config_dict, ConfigError, read_config, validate_config

    try:
        args = read_config(argv)
        validate_config(args)
    except ConfigError as error:
        raise ValueError(f"cell {cell.name!r}: transmix-train rejects its flags {shlex.join(argv)}: {error}") from None
    values = config_dict(args)
    # Only what differs from the trainer's defaults: a flag added to the trainer later (with a
    # default that keeps old behaviour) leaves the ids, and so the finished runs, valid.
    defaults = config_dict(build_trainer_parser().parse_args([]))
    values = {k: v for k, v in values.items() if v != defaults.get(k)}
    for key in ("output", "resume", "eval_only", "stop_after_epochs", "config", "log_interval"):
        values.pop(key, None)
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9]+", "-", cell.name.lower()).strip("-")
    return f"{slug}-{digest}-{code_version()['source'][:8]}"


def _run_folder(runs_dir: Path, run_id: str) -> Path:
    """The folder of a run: an existing one with the same config hash and code (a cell of another
    grid named differently, e.g. Table 1's "d = 6 (last)" is Table 2's "TransMix"), else a new name."""
    digest = "-".join(run_id.rsplit("-", 2)[-2:])
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
