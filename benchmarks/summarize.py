"""Summarise one or more ``--benchmark-json`` runs of the suite as markdown.

    python benchmarks/summarize.py run1.json [run2.json ...]

Per case (benchmark group) and provider: the median across runs of the provider's median time
in each run, with the min-max of those per-run medians; and the ratio provider / ours taken
within each run (side by side, same run), as the median of the per-run ratios with their
min-max. One run gives that run's figures (no spread). Peak CUDA memory and first-call time
are shown when a run recorded them (medians across runs).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict

from conftest import BASELINES, PROVIDER_KINDS  # the same denominators and labels as the live table

__all__ = ["load_runs", "per_run_medians", "summarize", "main"]


def provider_of(bench: dict) -> str:
    params = bench.get("params") or {}
    return str(bench.get("extra_info", {}).get("provider") or params.get("provider", bench["name"]))


def load_runs(paths: list[str]) -> list[dict]:
    runs = []
    for path in paths:
        with open(path) as handle:
            runs.append(json.load(handle))
    return runs


def per_run_medians(run: dict) -> dict[str, dict[str, dict]]:
    """{group: {provider: {"median": s, "extra": extra_info}}} for one run."""
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in run["benchmarks"]:
        groups[bench["group"] or bench["name"]][provider_of(bench)] = {
            "median": bench["stats"]["median"], "extra": bench.get("extra_info", {}),
        }
    return groups


def spread(values: list[float], fmt: str) -> str:
    """'median [min-max]' of values (just the value for one run)."""
    middle = fmt.format(statistics.median(values))
    if len(values) == 1:
        return middle
    return f"{middle} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def extras(rows: list[dict]) -> str:
    """Peak memory / first-call time, median across runs, where recorded."""
    cells = []
    for key, label, fmt in (("peak_mib", "peak", "{:.1f} MiB"), ("peak_extra_mib", "extra", "{:.1f} MiB"),
                            ("first_call_s", "first call", "{:.1f} s")):
        values = [row["extra"][key] for row in rows if key in row["extra"]]
        if values:
            cells.append(f"{label} {fmt.format(statistics.median(values))}")
    return "; ".join(cells)


def group_lines(group: str, runs: list[dict[str, dict[str, dict]]]) -> list[str]:
    rows: dict[str, list[dict]] = defaultdict(list)
    ratios: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        row = run.get(group, {})
        base = next((row[name]["median"] for name in BASELINES if name in row), None)
        for provider, entry in row.items():
            rows[provider].append(entry)
            if base:
                ratios[provider].append(entry["median"] / base)
    lines = []
    order = sorted(rows, key=lambda p: statistics.median(e["median"] for e in rows[p]))
    for provider in order:
        times = [entry["median"] * 1e3 for entry in rows[provider]]
        ratio = spread(ratios[provider], "{:.2f}x") if ratios[provider] else "n/a"
        kind = PROVIDER_KINDS.get(provider, "?")
        lines.append(
            f"| {group} | {provider} | {kind} | {len(times)} | {spread(times, '{:.3f}')} | {ratio} | {extras(rows[provider])} |"
        )
    return lines


def machine_lines(runs: list[dict]) -> list[str]:
    lines = []
    for index, run in enumerate(runs, 1):
        machine, commit = run.get("machine_info", {}), run.get("commit_info", {})
        cpu = machine.get("cpu", {})
        lines.append(
            f"- run {index}: {run.get('datetime', '?')}, commit {str(commit.get('id', '?'))[:7]}"
            f"{' (dirty tree)' if commit.get('dirty') else ''}, {machine.get('node', '?')}, "
            f"{cpu.get('brand_raw', '?')} ({cpu.get('count', '?')} CPUs), Python {machine.get('python_version', '?')}"
        )
    return lines


def summarize(runs: list[dict]) -> list[str]:
    medians = [per_run_medians(run) for run in runs]
    groups = sorted({group for run in medians for group in run})
    lines = [f"{len(runs)} run(s) of the suite:", *machine_lines(runs), ""]
    lines.append(
        "Times: median over runs of each run's median, [min-max over runs]. Ratio: provider / ours "
        "within each run, median [min-max] over runs (ours = the first of "
        f"{', '.join(BASELINES)} present in the case)."
    )
    lines += ["", "| case | provider | kind | runs | ms | x ours | memory, compile |",
              "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for group in groups:
        lines += group_lines(group, medians)
    return lines


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__)
        return 2
    print("\n".join(summarize(load_runs(paths))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
