"""Label fidelity and robustness of the trained-scale runs, seed by seed, in one report.

    transmix-experiment trained_digits --seeds 5 --output docs/experiments/trained
    python docs/experiments/trained_evidence.py docs/experiments/trained [--pairs 1000]

For every finished run of the grid (``DIR/runs/*/result.json``) this runs ``transmix-fidelity``
and ``transmix-robustness`` on its ``last.pth`` (into ``fidelity/`` and ``robustness/`` of the run
folder; skipped when their JSON is there), then writes:

- ``DIR/evidence.md``: label fidelity at the end of training (mean absolute error against the true
  visible-object share and flip rate, per label rule, mean and range over seeds, for the models
  each cell trained), its curve during training (``fidelity.csv`` of ``--fidelity-every``), and
  robustness (occlusion and patch shuffling top-1, mean over seeds, and TransMix - CutMix paired
  by seed with a Student-t 95 % interval);
- ``DIR/fidelity_curves.png`` and ``DIR/robustness.png``.

Only runs of one code version are read: the runner refuses to pair others (``result.json``'s
``code``); this script checks the same and stops otherwise.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

RULES = ("area", "attention", "transmix", "mixpro_pal")


def _runs(root: Path) -> list[tuple[Path, dict]]:
    runs = [(p.parent, json.loads(p.read_text())) for p in sorted((root / "runs").glob("*/result.json"))]
    sources = {r["code"]["source"] for _, r in runs}
    if len(sources) > 1:
        sys.exit(f"runs of {len(sources)} code versions under {root}: refusing to mix them ({sorted(sources)})")
    return runs


def _measure(folder: Path, pairs: int) -> tuple[dict, dict]:
    checkpoint = str(folder / "last.pth")
    for command, out in ((["transmix-fidelity", checkpoint, "--pairs", str(pairs)], "fidelity"),
                         (["transmix-robustness", checkpoint], "robustness")):
        if not (folder / out / f"{out}.json").is_file():
            subprocess.run([*command, "--output", str(folder / out)], check=True, stdout=subprocess.DEVNULL)
    return tuple(json.loads((folder / out / f"{out}.json").read_text()) for out in ("fidelity", "robustness"))


def _spread(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    values = [v * scale for v in values]
    return f"{statistics.mean(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def _paired_ci(diffs: list[float]) -> str:
    from scipy.stats import t

    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return f"{mean:+.2f}"
    half = t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"


def _fidelity_table(by_cell: dict[str, list[dict]]) -> list[str]:
    lines = ["| model trained with | seeds | scored pairs | " + " | ".join(f"{r} MAE" for r in RULES) + " | "
             + " | ".join(f"{r} flips %" for r in RULES) + " |",
             "| --- | ---: | ---: |" + " ---: |" * (2 * len(RULES))]
    for cell, results in by_cell.items():
        mae = [_spread([f["rules"][r]["mae"] for f in results]) for r in RULES]
        flips = [_spread([f["rules"][r]["flip_rate"] for f in results], 100.0, 1) for r in RULES]
        lines.append(f"| {cell} | {len(results)} | {results[0]['scored']} of {results[0]['pairs']} | "
                     + " | ".join(mae) + " | " + " | ".join(flips) + " |")
    return lines


def _curves(runs: list[tuple[Path, dict]], png: Path) -> list[str]:
    """Mean MAE per rule and epoch over seeds, for each cell's models; the figure and a short table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for folder, result in runs:
        path = folder / "fidelity.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                for rule in RULES:
                    if row.get(f"{rule}_mae"):
                        series[result["cell"]][rule][int(row["epoch"])].append(float(row[f"{rule}_mae"]))
    cells = [c for c in ("CutMix", "TransMix", "Mixup only", "No mixing") if c in series]
    fig, axes = plt.subplots(1, len(cells), figsize=(4 * len(cells), 3.4), sharey=True, squeeze=False)
    lines = ["| model trained with | epoch | " + " | ".join(f"{r} MAE" for r in RULES) + " |",
             "| --- | ---: |" + " ---: |" * len(RULES)]
    for axis, cell in zip(axes[0], cells):
        for rule in RULES:
            epochs = sorted(series[cell][rule])
            axis.plot([e + 1 for e in epochs], [statistics.mean(series[cell][rule][e]) for e in epochs],
                      marker="o", label=rule)
        axis.set(title=f"trained with {cell}", xlabel="epoch")
        axis.grid(alpha=0.3)
        for epoch in sorted(series[cell][RULES[0]]):
            lines.append(f"| {cell} | {epoch + 1} | "
                         + " | ".join(f"{statistics.mean(series[cell][r][epoch]):.3f}" for r in RULES) + " |")
    axes[0][0].set_ylabel("label MAE vs true share (mean over seeds)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return lines


def _robustness(by_cell: dict[str, dict[int, dict]], png: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(by_cell)
    first = next(iter(by_cell[cells[0]].values()))
    tests = [("occlusion", "drop_ratio", lambda v: f"drop {v:.0%}"), ("shuffle", "grid", lambda v: f"shuffle {v}x{v}")]
    lines = ["| test | " + " | ".join(cells) + " | TransMix - CutMix, paired by seed [95 % CI] |",
             "| --- |" + " ---: |" * (len(cells) + 1)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for axis, (test, key, name) in zip(axes, tests):
        values = [row[key] for row in first[test]]
        for cell in cells:
            means = [statistics.mean(r[test][i]["top1"] for r in by_cell[cell].values()) for i in range(len(values))]
            axis.plot(range(len(values)), means, marker="o", label=cell)
        axis.set_xticks(range(len(values)), [name(v).split(" ")[1] for v in values])
        axis.set(title=test, ylabel="top-1 % (mean over seeds)")
        axis.grid(alpha=0.3)
        for i, value in enumerate(values):
            cells_text = [_spread([r[test][i]["top1"] for r in by_cell[cell].values()], digits=1) for cell in cells]
            paired = ""
            if "TransMix" in by_cell and "CutMix" in by_cell:
                seeds = sorted(set(by_cell["TransMix"]) & set(by_cell["CutMix"]))
                paired = _paired_ci([by_cell["TransMix"][s][test][i]["top1"] - by_cell["CutMix"][s][test][i]["top1"]
                                     for s in seeds])
            lines.append(f"| {name(value)} | " + " | ".join(cells_text) + f" | {paired} |")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="the --output folder of the trained_digits grid")
    parser.add_argument("--pairs", type=int, default=1000, help="pairs scored by transmix-fidelity per run")
    args = parser.parse_args()
    runs = _runs(args.output)
    fidelity: dict[str, list[dict]] = defaultdict(list)
    robustness: dict[str, dict[int, dict]] = defaultdict(dict)
    for folder, result in runs:
        fid, rob = _measure(folder, args.pairs)
        fidelity[result["cell"]].append(fid)
        robustness[result["cell"]][result["seed"]] = rob
    code = runs[0][1]["code"]
    lines = ["# Trained-scale evidence: label fidelity and robustness", "",
             f"{len(runs)} runs of `transmix-experiment trained_digits` (code {code['source'][:8]}, commit "
             f"{code['commit']}{', dirty tree' if code['dirty'] else ''}); each run's raw files are in `runs/`.", "",
             f"## Label fidelity after training ({args.pairs} CutMix pairs of val images per model, "
             "`transmix-fidelity`)", "",
             "MAE: mean |label share of A - true visible-object share of A|; flips: pairs whose label favours "
             "the class with less visible object. Mean [min-max] over seeds.", "",
             *_fidelity_table(fidelity), "",
             "## Label fidelity during training (`--fidelity-every 5`, 512 pairs, mean over seeds)", "",
             "![label error against epoch](fidelity_curves.png)", "",
             *_curves(runs, args.output / "fidelity_curves.png"), "",
             "## Robustness (`transmix-robustness`: random patch occlusion, patch shuffling)", "",
             "Top-1 %, mean [min-max] over seeds.", "",
             "![robustness](robustness.png)", "",
             *_robustness(robustness, args.output / "robustness.png"), ""]
    (args.output / "evidence.md").write_text("\n".join(lines))
    print(f"wrote {args.output / 'evidence.md'}")


if __name__ == "__main__":
    main()
