"""The plot of a grid: one bar per finished cell (mean top-1, std error bars), each seed a dot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["plot_summary"]


def plot_summary(summary: dict[str, Any], png: Path) -> None:
    """Write the bars of the summary's finished cells to ``png`` (matplotlib's Agg backend)."""
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
