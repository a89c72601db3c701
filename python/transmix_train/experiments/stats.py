"""Statistics of a grid: per cell, the mean and std of the final top-1 over the finished seeds, the
difference to the reference cell paired by seed with its 95 % confidence interval (Student's t on
the per-seed differences), whether the paired runs drew the same mixing (their ``mix_digest``),
and the costs (parameters, images/s, wall time), read from each run's ``result.json``. A result
made by other code than this process's is refused, never paired."""

from __future__ import annotations

import json
import math
from typing import Any, Optional

from .grid import Grid
from .planning import RunSpec
from .version import code_version

__all__ = ["summarise"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return mean, std


def _result(spec: RunSpec) -> Optional[dict[str, Any]]:
    if not spec.done:
        return None
    result = json.loads((spec.output / "result.json").read_text())
    source = (result.get("code") or {}).get("source")
    if source != code_version()["source"]:
        raise ValueError(f"{spec.output}: made by other code (source {str(source)[:8]}, this code "
                         f"{code_version()['source'][:8]}): it is not paired with this code's runs; move it away")
    return result


def _t_quantile(dof: int) -> float:
    """The 97.5 % quantile of Student's t with ``dof`` degrees of freedom (two-sided 95 %)."""
    from scipy.stats import t  # scipy comes with scikit-learn, in the train extra

    return float(t.ppf(0.975, dof))


def _paired(row: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """The per-seed differences to the reference: mean, 95 % CI, and how many drew the same mixing."""
    mine, theirs = row["by_seed"], reference["by_seed"]
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return {}
    diffs = [mine[s]["top1"] - theirs[s]["top1"] for s in seeds]
    mean, std = _mean_std(diffs)
    half = _t_quantile(len(diffs) - 1) * std / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    digests = [(mine[s].get("mix_digest") or {}).get("sha256") for s in seeds]
    references = [(theirs[s].get("mix_digest") or {}).get("sha256") for s in seeds]
    known = [(a, b) for a, b in zip(digests, references) if a and b]
    return {"delta": mean, "delta_ci": (mean - half, mean + half), "paired_seeds": seeds,
            "same_draws": sum(a == b for a, b in known), "draws_known": len(known)}


def summarise(grid: Grid, prerequisites: dict[str, RunSpec], runs: list[RunSpec], seeds: int) -> dict[str, Any]:
    """Per cell: top-1 mean/std over the finished seeds, the difference to the reference, costs."""
    extras = {key: _result(spec) for key, spec in prerequisites.items()}
    rows = []
    for cell in grid.cells:
        results = [r for r in (_result(s) for s in runs if s.cell is cell) if r is not None]
        row: dict[str, Any] = {"name": cell.name, "paper": cell.paper, "n": len(results), "seeds": seeds,
                               "top1": [r["top1"] for r in results], "args": cell.args,
                               "by_seed": {r["seed"]: r for r in results}}
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
            row.update(_paired(row, reference))
    for row in rows:
        row["by_seed"] = {str(seed): {"top1": r["top1"], "mix_digest": r.get("mix_digest")}
                          for seed, r in row["by_seed"].items()}
    return {"grid": grid.name, "title": grid.title, "reference": grid.reference, "notes": grid.notes, "rows": rows,
            "prerequisites": {k: v for k, v in extras.items() if v is not None}, "code": code_version()}
