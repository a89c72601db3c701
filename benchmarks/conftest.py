"""Benchmark plumbing: side-by-side providers per case, and a ratio table at the end.

Run: ``pytest benchmarks/ --benchmark-only`` (add ``--benchmark-json=out.json`` to keep numbers).
Every case row names the device; ratios are medians of the provider over the fused op's median,
measured in the same run.
"""

from __future__ import annotations

import os
from collections import defaultdict

import pytest
import torch

_MEDIANS: dict[str, dict[str, float]] = defaultdict(dict)
# The fused op of each benchmark file, in order of preference, as the ratio's denominator.
BASELINES = ("transmix", "fused-triton", "extension", "fused-torch")


def bench_devices() -> list[str]:
    """Devices to benchmark: BENCH_DEVICES="cpu,cuda" (default: cpu, plus cuda when present)."""
    default = "cpu,cuda" if torch.cuda.is_available() else "cpu"
    return [d for d in os.environ.get("BENCH_DEVICES", default).split(",") if d]


def baseline_of(row: dict[str, float]) -> str | None:
    return next((name for name in BASELINES if name in row), None)


def pytest_configure(config):
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "0")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))


@pytest.fixture
def record(benchmark, request):
    """Yields a callable(group, provider) that names this run; medians are collected after it."""
    names = {}

    def name(group: str, provider: str) -> None:
        benchmark.group = group
        names["group"], names["provider"] = group, provider

    yield name
    stats = getattr(benchmark, "stats", None)
    if stats is not None and names:
        _MEDIANS[names["group"]][names["provider"]] = stats.stats.median


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    if not _MEDIANS:
        return
    write = terminalreporter.write_line
    write("")
    write("speed-up of the fused op (median of each provider / median of the fused op, same run):")
    for group in sorted(_MEDIANS):
        row = _MEDIANS[group]
        base = row.get(baseline_of(row) or "")
        cells = []
        for provider, median in sorted(row.items()):
            ratio = f"{median / base:.2f}x" if base else "n/a"
            cells.append(f"{provider} {median * 1e3:.3f} ms ({ratio})")
        write(f"  {group}: " + "; ".join(cells))
