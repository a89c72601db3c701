"""`tk.info()` and `python -m transmix_kernels.info` report what this installation has."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import transmix_kernels as tk
from transmix_kernels import _ext


def test_info_reports_versions_and_backends():
    report = tk.info()
    assert report["transmix_kernels"] == tk.__version__
    assert report["torch"] == torch.__version__
    assert report["cuda available"] == torch.cuda.is_available()
    # The extension line tells the truth about what was loaded.
    assert (_ext.extension() is None) == (report["extension"] != "available")


def test_info_command_runs():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "transmix_kernels.info"],
        capture_output=True, text=True, env=env, cwd=root, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "transmix_kernels" in done.stdout and "extension" in done.stdout


def test_imports_and_runs_on_cpu_without_triton():
    """A CPU-only install may have no triton: the package imports and its CPU paths work."""
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, transmix_kernels as tk\n"
        "assert not tk._utils.HAS_TRITON\n"
        "x = torch.randn(4, 3, 8, 8); y = torch.randint(0, 5, (4,))\n"
        "images, mix = tk.TransMix(5, mixup_alpha=0.0, patch_size=4, seed=0)(x, y)\n"
        "print(tuple(mix.targets(torch.rand(4, 4).softmax(-1)).shape))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(4, 5)"
