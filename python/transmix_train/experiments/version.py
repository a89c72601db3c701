"""The code version a run is computed with, part of its identity.

Runs are found again by their folder name (config hash) so that a killed grid continues and a
finished run is not trained twice. That must never pair runs made by different code: the folder
name also carries a digest of the source that trains (``transmix_kernels``, ``transmix_train``,
``csrc``: every Python, YAML and C++/CUDA file), so any change to it, committed or not, makes new
folders; a README edit does not. The git commit and whether the tree was dirty are recorded
beside it in ``result.json`` for people; the digest is what decides.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path
from typing import Any, Optional

import transmix_kernels
import transmix_train

__all__ = ["check_unchanged", "code_version", "source_digest"]

_SUFFIXES = (".py", ".yaml", ".cpp", ".cu", ".h")


def _source_roots() -> list[Path]:
    kernels = Path(transmix_kernels.__file__).resolve().parent
    roots = [kernels, Path(transmix_train.__file__).resolve().parent]
    csrc = kernels.parent / "csrc"  # a checkout or an editable install; a wheel has the built extension only
    return roots + ([csrc] if csrc.is_dir() else [])


def _digest_now() -> str:
    digest = hashlib.sha256()
    for root in _source_roots():
        for path in sorted(p for p in root.rglob("*") if p.suffix in _SUFFIXES and "__pycache__" not in p.parts):
            digest.update(f"{root.name}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def source_digest() -> str:
    """SHA-256 (hex) over the relative paths and contents of the source files that train, as this
    process first read them."""
    return _digest_now()


def check_unchanged() -> None:
    """Raise when the source changed since this process first read it: the runs still to start
    would run new code in folders named after the old (a grid is planned once, at its start)."""
    planned, now = source_digest(), _digest_now()
    if now != planned:
        raise RuntimeError(f"the source changed since the grid was planned (code {planned[:8]} -> {now[:8]}): "
                           "stopping; call transmix-experiment again to plan the runs for the new code")


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(transmix_kernels.__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def code_version() -> dict[str, Any]:
    """``{"source": digest, "commit": sha or None, "dirty": bool or None}`` of this process's code."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"source": source_digest(), "commit": commit, "dirty": None if status is None else bool(status)}
