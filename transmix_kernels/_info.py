"""What this installation has: versions, backends and how the extension was built."""

from __future__ import annotations

import os
import platform

__all__ = ["info", "main"]


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except Exception as error:  # noqa: BLE001 - report, never fail
        return f"not available ({type(error).__name__}: {error})"
    return getattr(module, "__version__", "unknown")


def info() -> dict[str, object]:
    """A dict of what this installation has: versions, backends, extension build."""
    import torch

    from . import __version__, _dispatch, _ext

    cuda = torch.cuda.is_available()
    report: dict[str, object] = {
        "transmix_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch.version.cuda": torch.version.cuda,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "cuda available": cuda,
        "cuda device": torch.cuda.get_device_name(0) if cuda else None,
        "triton backend": "available" if _dispatch.HAS_TRITON else "missing",
        "triton interpreter (TRITON_INTERPRET=1)": _dispatch.TRITON_INTERPRET,
        "impl='auto' runs": "Triton on CUDA tensors; PyTorch on CPU tensors (the CPU paste uses the "
        "extension's compiled kernel when it is built)",
    }
    report.update(_ext.build_info())
    report["CUDA_HOME"] = os.environ.get("CUDA_HOME")
    report["TORCH_CUDA_ARCH_LIST"] = os.environ.get("TORCH_CUDA_ARCH_LIST")
    return report


def main() -> int:
    """Print the report, one ``key value`` line each; the exit status of the command."""
    for key, value in info().items():
        print(f"{key:<42} {value}")
    return 0

