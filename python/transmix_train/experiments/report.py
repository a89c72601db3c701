"""The outputs of a grid: ``<grid>.md`` (the Markdown table), ``<grid>.json`` (the summary) and,
once a run has finished, ``<grid>.png`` (:mod:`.plot`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from .grid import Grid
from .plot import plot_summary

__all__ = ["markdown_table", "write_outputs"]


def _fmt(value: Optional[float], spec: str = ".2f") -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _delta(row: dict[str, Any]) -> str:
    """"+1.20 [+0.35, +2.05] (n=5)": the mean per-seed difference to the reference, its 95 % CI."""
    if "delta" not in row:
        return ""
    low, high = row["delta_ci"]
    interval = f" [{low:+.2f}, {high:+.2f}]" if low == low else ""
    return f"{row['delta']:+.2f}{interval} (n={len(row['paired_seeds'])})"


def _draws(row: dict[str, Any]) -> str:
    """"5/5": paired seeds whose first mixing draws equal the reference's (known digests only)."""
    return f"{row['same_draws']}/{row['draws_known']}" if row.get("draws_known") else ""


def markdown_table(summary: dict[str, Any]) -> list[str]:
    """The table's lines: one row per cell (mean ± std, seeds, Δ, per seed, costs, the paper's number)."""
    lines = ["| method | top-1 % (mean ± std) | seeds | Δ vs " + str(summary["reference"] or "-") +
             " paired by seed [95 % CI] | same draws | per seed | params (M) | img/s | wall s/run | paper (ImageNet) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in summary["rows"]:
        if not row["n"]:
            lines.append(f"| {row['name']} | not run | 0/{row['seeds']} | | | | | | | {_fmt(row['paper'], '.1f')} |")
            continue
        params = f"{row['params'] / 1e6:.3f}" + (f" (+{row['extra_params'] / 1e6:.2f})" if row["extra_params"] else "")
        lines.append(f"| {row['name']} | {row['mean']:.2f}{' ± ' + _fmt(row['std']) if row['n'] > 1 else ''} | {row['n']}/{row['seeds']} | {_delta(row)} | {_draws(row)} | "
                     f"{', '.join(f'{v:.1f}' for v in row['top1'])} | {params} | {row['images_per_s']:.0f} | "
                     f"{row['wall_s']:.0f} | {_fmt(row['paper'], '.1f')} |")
    return lines


def write_outputs(grid: Grid, summary: dict[str, Any], output: Path) -> None:
    """``<grid>.md``, ``<grid>.json`` and (when a run finished) ``<grid>.png`` in ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    lines = [f"# {summary['title']}", ""]
    if summary["notes"]:
        lines += [summary["notes"].strip(), ""]
    lines += markdown_table(summary)
    for key, result in summary["prerequisites"].items():
        lines += ["", f"Prerequisite `{key}` (trained once, seed 0): top-1 {result['top1']:.2f}, "
                      f"{result['params'] / 1e6:.2f}M parameters, {result['wall_s']:.0f} s."]
    lines += ["", "Top-1: val top-1 after the last epoch (no selection on val). Δ: the mean over seeds of "
                  "(this cell's top-1 - the reference's) for the same seed, with Student's t 95 % interval. "
                  "Same draws: paired seeds whose first 20 mixing draws (boxes, partners, lambdas) hash the "
                  "same as the reference's. Every run was made by this code version "
                  f"(source {summary['code']['source'][:8]}, commit {summary['code']['commit']}"
                  f"{', dirty tree' if summary['code']['dirty'] else ''}). Raw runs: `runs/`."]
    (output / f"{grid.name}.md").write_text("\n".join(lines) + "\n")
    (output / f"{grid.name}.json").write_text(json.dumps(summary, indent=1))
    if any(r["n"] for r in summary["rows"]):
        plot_summary(summary, output / f"{grid.name}.png")
