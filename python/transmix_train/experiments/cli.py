"""``transmix-experiment``: the paper's comparison tables, re-run on your data with several seeds.

The command line: parse and check the flags, load the grid, run it (:func:`.runner.run_grid`)
and say where the table is; a bad grid or flag exits with an error naming it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from .grid import BUILTIN_GRIDS, load_grid
from .runner import run_grid

__all__ = ["build_parser", "main"]


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
