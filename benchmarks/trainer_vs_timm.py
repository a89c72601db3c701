"""``transmix-train`` against timm's own ``train.py``: whole runs, same data, model and recipe, alternating.

    python benchmarks/trainer_vs_timm.py --timm-train PATH/train.py [--rounds 3] [--epochs 15] [--out DIR]

timm's ``train.py`` is not part of the timm wheel: pass the file from a checkout of
pytorch-image-models (the run records which timm it imported). Both trainers get the
trainer's digits split (``export_digits.py``) in two forms, each read by both:

- ``folder``: an ImageFolder of PNG files (``--data-dir`` / ``--data``),
- ``hf``: a Hugging Face dataset of parquet files, held in memory by Arrow (``--dataset hfds/...``),

and the demo's model and recipe (patch-8 DeiT, depth 6, width 128, 32 px, batch 64, AdamW 1e-3,
cosine with 5 warm-up epochs, RandAugment m6, Mixup 0.8 / CutMix 1.0, smoothing 0.1, drop path
0.05, no flips, no random erasing, eval crop 1.0, 2 loader workers, CPU). Each round runs every
(data, trainer) pair once, the trainer order alternating between rounds; the 1-minute load
average is read before and after each run. Wall time is the whole command (start-up, data, every
epoch, evaluation, checkpoints). Writes ``DIR/<data>-<trainer>-r<round>.log`` (each run's output),
``DIR/runs.json`` and ``DIR/summary.md`` (median [min-max] over rounds, and timm / ours per round).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL_KWARGS = ["img_size=32", "patch_size=8", "embed_dim=128", "depth=6", "num_heads=4"]

# The recipe in timm's flag names; the same values reach transmix-train through demo.yaml plus flags.
TIMM_RECIPE = [
    "--model", "deit_tiny_patch16_224", "--model-kwargs", *MODEL_KWARGS, "--input-size", "3", "32", "32",
    "--num-classes", "10", "-b", "64", "--opt", "adamw", "--lr", "1e-3", "--weight-decay", "0.05",
    "--sched", "cosine", "--warmup-epochs", "5", "--warmup-lr", "1e-6", "--min-lr", "1e-5", "--drop-path", "0.05",
    "--aa", "rand-m6-mstd0.5-inc1", "--scale", "0.6", "1.0", "--ratio", "0.8", "1.25", "--hflip", "0",
    "--reprob", "0", "--crop-pct", "1.0", "--interpolation", "bicubic", "--mixup", "0.8", "--cutmix", "1.0",
    "--smoothing", "0.1", "--workers", "2", "--device", "cpu", "--log-interval", "50", "--checkpoint-hist", "1",
]
OURS_RECIPE = ["--workers", "2", "--device", "cpu", "--mean", "0.485", "0.456", "0.406",
               "--std", "0.229", "0.224", "0.225", "--log-interval", "50"]


def _data_flags(trainer: str, form: str, data: dict[str, Path], cache: Path) -> list[str]:
    if form == "folder":
        if trainer == "timm":
            return ["--data-dir", str(data["folder"]), "--train-split", "train", "--val-split", "val"]
        return ["--data", str(data["folder"])]
    return ["--dataset", f"hfds/{data['hf']}", "--data-dir", str(cache), "--train-split", "train",
            "--val-split", "validation"]


def _command(trainer: str, form: str, epochs: int, data: dict, work: Path, name: str, timm_train: Path) -> list[str]:
    flags = _data_flags(trainer, form, data, work / "hf-cache")
    if trainer == "timm":
        return [sys.executable, str(timm_train), *flags, *TIMM_RECIPE, "--epochs", str(epochs),
                "--output", str(work), "--experiment", name]
    return ["transmix-train", *flags, *OURS_RECIPE, "--epochs", str(epochs), "--mix", "transmix",
            "--output", str(work / name)]


def _final_top1(trainer: str, run_dir: Path) -> tuple[float, float]:
    """(final, best) val top-1 from the trainer's own per-epoch file."""
    import csv

    name, column = ("summary.csv", "eval_top1") if trainer == "timm" else ("metrics.csv", "val_top1")
    with open(run_dir / name, newline="") as handle:
        values = [float(row[column]) for row in csv.DictReader(handle)]
    return values[-1], max(values)


def _load() -> float:
    return os.getloadavg()[0]


def run_once(trainer: str, form: str, round_index: int, args, data: dict, work: Path) -> dict:
    name = f"{form}-{trainer}-r{round_index}"
    command = _command(trainer, form, args.epochs, data, work, name, args.timm_train)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    load_before, start = _load(), time.perf_counter()
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    seconds, load_after = time.perf_counter() - start, _load()
    (args.out / f"{name}.log").write_text(f"$ {' '.join(command)}\n{result.stdout}\n--- stderr ---\n{result.stderr}")
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed ({result.returncode}); see {args.out / (name + '.log')}")
    final, best = _final_top1(trainer, work / name)
    row = {"name": name, "trainer": trainer, "data": form, "round": round_index, "seconds": seconds,
           "final_top1": final, "best_top1": best, "load_before": load_before, "load_after": load_after}
    print(json.dumps(row), flush=True)
    return row


def _spread(values: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def summarize(rows: list[dict], meta: dict) -> str:
    lines = [f"# transmix-train vs timm train.py ({meta['date']})", "",
             f"Machine: {meta['machine']}; timm {meta['timm']}, torch {meta['torch']}; commit {meta['commit']}; "
             f"{meta['epochs']} epochs per run, {meta['rounds']} rounds, trainer order alternating.", "",
             "| data | trainer | wall s, median [min-max] | final val top-1 % | load avg (1 min) before-after |",
             "| --- | --- | ---: | ---: | --- |"]
    for form in ("folder", "hf"):
        for trainer in ("timm", "ours"):
            sel = [r for r in rows if r["data"] == form and r["trainer"] == trainer]
            if not sel:
                continue
            loads = f"{min(r['load_before'] for r in sel):.2f}-{max(r['load_after'] for r in sel):.2f}"
            lines.append(f"| {form} | {trainer} | {_spread([r['seconds'] for r in sel])} | "
                         f"{_spread([r['final_top1'] for r in sel], '{:.2f}')} | {loads} |")
    lines += ["", "timm / ours wall time, per round (> 1: ours faster):", ""]
    for form in ("folder", "hf"):
        ratios = []
        for round_index in sorted({r["round"] for r in rows}):
            pair = {r["trainer"]: r["seconds"] for r in rows if r["data"] == form and r["round"] == round_index}
            if len(pair) == 2:
                ratios.append(pair["timm"] / pair["ours"])
        if ratios:
            lines.append(f"- {form}: {_spread(ratios, '{:.2f}x')} ({', '.join(f'{x:.2f}x' for x in ratios)})")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm-train", type=Path, required=True, help="timm's train.py (from a timm checkout)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--data", nargs="+", default=["folder", "hf"], choices=("folder", "hf"))
    parser.add_argument("--out", type=Path, default=Path(f"benchmarks/results/{time.strftime('%Y-%m-%d')}-trainer-vs-timm"))
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.timm_train = args.timm_train.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    import timm
    import torch
    from export_digits import export_folder, export_hf

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True,
                           text=True).stdout.strip()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit.strip() + (" (+changes)" if dirty else ""),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "timm": timm.__version__,
            "torch": torch.__version__, "epochs": args.epochs, "rounds": args.rounds,
            "timm_train": str(args.timm_train)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="trainer-vs-timm-") as tmp:
        work = Path(tmp)
        data = {"folder": export_folder(work / "digits-folder"), "hf": export_hf(work / "digits-hf")}
        for round_index in range(args.rounds):
            order = ("timm", "ours") if round_index % 2 == 0 else ("ours", "timm")
            for form in args.data:
                for trainer in order:
                    rows.append(run_once(trainer, form, round_index, args, data, work))
                    (args.out / "runs.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))
    summary = summarize(rows, meta)
    (args.out / "summary.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
