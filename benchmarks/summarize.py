"""Turn a ``--benchmark-json`` file into a short markdown table with ratios to the fused op.

    python benchmarks/summarize.py bench.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

from conftest import BASELINES  # noqa: E402 - the same denominators as the live table


def provider_of(bench: dict) -> str:
    params = bench.get("params") or {}
    return str(params.get("provider", bench["name"]))


def main(path: str) -> int:
    with open(path) as handle:
        data = json.load(handle)
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        groups[bench["group"] or bench["name"]][provider_of(bench)] = bench["stats"]["median"]
    machine = data.get("machine_info", {})
    print(f"machine: {machine.get('node')} {machine.get('cpu', {}).get('brand_raw', '')}")
    print("| case | provider | median ms | x fused op |")
    print("| --- | --- | ---: | ---: |")
    for group in sorted(groups):
        row = groups[group]
        base = next((row[name] for name in BASELINES if name in row), None)
        for provider, median in sorted(row.items(), key=lambda item: item[1]):
            ratio = f"{median / base:.2f}" if base else "n/a"
            print(f"| {group} | {provider} | {median * 1e3:.3f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
