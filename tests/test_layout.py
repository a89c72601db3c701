"""The two halves of the project stay apart: the kernel library imports nothing of the trainer,
and the kernel tests (tests/kernels) need nothing of it either."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

KERNEL_TESTS = Path(__file__).resolve().parent / "kernels"


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_kernel_tests_do_not_import_the_trainer():
    users = {path.name: sorted(m for m in _imported_modules(path) if m.split(".")[0] == "transmix_train")
             for path in sorted(KERNEL_TESTS.glob("*.py"))}
    assert users and {name: mods for name, mods in users.items() if mods} == {}


def test_the_kernel_library_loads_no_trainer_module():
    code = "import sys, transmix_kernels; print(sorted(m for m in sys.modules if m.startswith('transmix_train')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
