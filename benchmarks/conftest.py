"""Benchmark plumbing: side-by-side providers per case, and a ratio table at the end.

Run: ``pytest benchmarks/ --benchmark-only`` (add ``--benchmark-json=out.json`` to keep numbers;
``bash benchmarks/run_cpu.sh`` runs the suite several times and summarises across runs). Every
case row names the device; ratios are medians of the provider over the fused op's median,
measured in the same run. Each provider is labelled with the kind of baseline it is
(:data:`PROVIDER_KINDS`), recorded in the JSON's ``extra_info``.
"""

from __future__ import annotations

import os
from collections import defaultdict

import pytest
import torch

_MEDIANS: dict[str, dict[str, float]] = defaultdict(dict)
# The fused op of each benchmark file, in order of preference, as the ratio's denominator.
BASELINES = ("transmix", "fused-triton", "extension", "fused-torch")

OURS = "ours"
SAME_ALGORITHM = "same algorithm, plain PyTorch"
NAIVE = "naive / official approach"
LIBRARY = "library users would otherwise use"
FLOOR = "floor: no attention at all"
# What each provider name stands for, across the benchmark files.
PROVIDER_KINDS = {
    "transmix": OURS,
    "fused-triton": OURS,
    "fused-torch": OURS,
    "cutmix_paste": OURS,  # the box op, against mask_paste in the mask-paste-vs-box groups
    "mixpro": OURS,  # the attention-guided family in the training step (bench_train_step.py)
    "tokenmix": OURS,
    "extension": OURS,
    "transmix-torch-path": SAME_ALGORITHM,
    "torch-vector-chain": SAME_ALGORITHM,
    "row-softmax+transmix_lambda": SAME_ALGORITHM,
    "reference-row": SAME_ALGORITHM,
    "reference-ops": SAME_ALGORITHM,
    "reference": NAIVE,
    "naive-chained-bmm": NAIVE,
    "full-attention+transmix_lambda": NAIVE,
    "full-attention+attention_rollout": NAIVE,
    "reference-full-matrices": NAIVE,
    "naive-last-block": NAIVE,
    "timm": LIBRARY,
    "torchvision": LIBRARY,
    "plain-cutmix": FLOOR,
}


def bench_devices() -> list[str]:
    """Devices to benchmark: BENCH_DEVICES="cpu,cuda" (default: cpu, plus cuda when present)."""
    default = "cpu,cuda" if torch.cuda.is_available() else "cpu"
    return [d for d in os.environ.get("BENCH_DEVICES", default).split(",") if d]


def baseline_of(row: dict[str, float]) -> str | None:
    return next((name for name in BASELINES if name in row), None)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def pytest_configure(config):
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "0")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))


@pytest.fixture
def record(benchmark, request):
    """Yields a callable(group, provider, device) that names this run; medians are collected after it."""
    names = {}

    def name(group: str, provider: str, device: torch.device | str = "cpu") -> None:
        benchmark.group = group
        names["group"], names["provider"] = group, provider
        benchmark.extra_info.update(
            provider=provider, kind=PROVIDER_KINDS.get(provider, "?"), device=device_name(device),
            threads=torch.get_num_threads(),
        )

    yield name
    stats = getattr(benchmark, "stats", None)
    if stats is not None and names:
        _MEDIANS[names["group"]][names["provider"]] = stats.stats.median


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def record_cuda_peak(benchmark, fn, device: torch.device) -> None:
    """On CUDA: run ``fn`` once (warm), then once more and keep its peak memory in extra_info.

    ``peak_extra_mib``: the peak above what was allocated before the call (the op's working set);
    ``peak_mib``: the absolute peak (what a training step needs in all).
    """
    if device.type != "cuda":
        return
    fn()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    benchmark.extra_info.update(peak_mib=peak / 2**20, peak_extra_mib=(peak - base) / 2**20)


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
            cells.append(f"{provider} [{PROVIDER_KINDS.get(provider, '?')}] {median * 1e3:.3f} ms ({ratio})")
        write(f"  {group}: " + "; ".join(cells))
