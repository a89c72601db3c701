"""`tk.info()` and `python -m transmix_kernels.info` report what this installation has."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
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


def _run_python(*args: str, drop_env: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """A fresh interpreter in the repository root, this checkout first on the path."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for name in drop_env:
        env.pop(name, None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=root, timeout=120)


def test_info_command_runs():
    done = _run_python("-W", "error::RuntimeWarning", "-m", "transmix_kernels.info")
    assert done.returncode == 0, done.stderr
    assert "transmix_kernels" in done.stdout and "extension" in done.stdout


IMPORT_ORDERS = {
    "package-then-command": "import transmix_kernels as tk\nimport transmix_kernels.info\n",
    "command-then-package": "import transmix_kernels.info\nimport transmix_kernels as tk\n",
    "from-import": "import transmix_kernels as tk\nfrom transmix_kernels import info as command\nassert command is tk.info\n",
}


@pytest.mark.parametrize("imports", IMPORT_ORDERS.values(), ids=IMPORT_ORDERS.keys())
def test_info_stays_the_function_after_importing_the_command_module(imports):
    """Importing the command module by name must not replace the package attribute tk.info."""
    code = imports + (
        "import inspect\n"
        "assert inspect.isfunction(tk.info), type(tk.info)\n"
        "print(tk.info()['transmix_kernels'] == tk.__version__)\n"
    )
    done = _run_python("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_imports_and_runs_on_cpu_without_triton():
    """A CPU-only install may have no triton: the package imports and its CPU paths work."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, transmix_kernels as tk\n"
        "assert not tk._dispatch.HAS_TRITON\n"
        "x = torch.randn(4, 3, 8, 8); y = torch.randint(0, 5, (4,))\n"
        "images, mix = tk.TransMix(5, mixup_alpha=0.0, patch_size=4, seed=0)(x, y)\n"
        "print(tuple(mix.targets(torch.rand(4, 4).softmax(-1)).shape))\n"
    )
    done = _run_python("-c", code, drop_env=("TRITON_INTERPRET",))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(4, 5)"
