"""Statistics of a grid: per cell, the mean and std of the final top-1 over the finished seeds, the
difference to the reference cell with its standard error, and the costs (parameters, images/s,
wall time), read from each run's ``result.json``."""

from __future__ import annotations

import json
import math
from typing import Any, Optional

from .grid import Grid
from .planning import RunSpec

__all__ = ["summarise"]


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
