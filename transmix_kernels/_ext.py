"""Optional import of the compiled extension ``transmix_kernels._C`` (xformers ``_cpp_lib.py`` style).

The package works without the extension. This module tries the import once, on first use (never
at package import), keeps the error instead of raising it, and reports what the binary was built
with::

    from transmix_kernels import _ext
    _ext.extension()        # the module, or None
    _ext.extension_error()  # why it is None (the ImportError/OSError), or None
    _ext.build_info()       # a dict for ``python -m transmix_kernels.info``

Fallback policy, the same for every op with a compiled kernel (the CPU CutMix paste, attention
rollout on CPU and CUDA): with ``impl="auto"``, where the extension cannot run the op (not
built, failed to load, built without CUDA, or built from sources that lack the op), the op runs
its PyTorch path, which gives the same results, and :func:`warn_fallback` issues one
``RuntimeWarning`` naming the reason, the op and how to build the extension. The warning is shown
once per process for each reason, not once per call. An explicit ``impl="torch"`` never warns.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from types import ModuleType

import torch

__all__ = [
    "BUILD_HINT",
    "build_info",
    "built_with_cuda",
    "extension",
    "extension_error",
    "has_kernel",
    "supports",
    "unavailable_reason",
    "warn_fallback",
]

BUILD_HINT = (
    "build it with `pip install --no-build-isolation .` (or `python setup.py build_ext --inplace`); "
    "`python -m transmix_kernels.info` shows what was built"
)


@dataclasses.dataclass(frozen=True)
class _Loaded:
    module: ModuleType | None
    error: BaseException | None


_LOADED: _Loaded | None = None


def _load() -> _Loaded:
    global _LOADED
    if _LOADED is None:
        try:
            from . import _C  # type: ignore[attr-defined]
        except (ImportError, OSError) as error:  # missing, or built against another torch
            _LOADED = _Loaded(None, error)
        else:
            _LOADED = _Loaded(_C, None)
    return _LOADED


def extension() -> ModuleType | None:
    """The compiled module, or None when it is missing or failed to load."""
    return _load().module


def extension_error() -> BaseException | None:
    """The error the import raised, or None when the extension loaded."""
    return _load().error


def built_with_cuda() -> bool:
    """Whether the loaded extension has its CUDA kernels (False when it is missing)."""
    module = extension()
    return bool(module is not None and module.build_info()["built_with_cuda"])


def supports(device: torch.device) -> bool:
    """Whether the extension can run on tensors of this device."""
    if extension() is None:
        return False
    return device.type == "cpu" or (device.type == "cuda" and built_with_cuda())


def has_kernel(name: str, device: torch.device) -> bool:
    """Whether the extension is loaded, runs on tensors of this device and has the function ``name``."""
    module = _load().module
    return module is not None and hasattr(module, name) and supports(device)


def unavailable_reason(device: torch.device, name: str | None = None) -> str:
    """Why :func:`supports` (or :func:`has_kernel` for ``name``) is False for this device."""
    error = extension_error()
    if error is not None:
        return f"transmix_kernels._C could not be imported ({type(error).__name__}: {error})"
    if device.type == "cuda" and not built_with_cuda():
        return "transmix_kernels._C was built without CUDA (no CUDA toolkit at build time)"
    if not supports(device):
        return f"transmix_kernels._C has no kernels for {device.type} tensors"
    return f"transmix_kernels._C has no function {name} (built from older sources)"


# Reasons already warned about: the fallback warns once per process and reason, not per call.
_FALLBACK_WARNED: set[str] = set()


def _caller_stacklevel() -> int:
    """stacklevel of the first frame outside this package and torch (a torch.library op adds a
    varying number of torch frames), so the warning names the user's line."""
    inside = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def warn_fallback(op: str, name: str, device: torch.device) -> None:
    """The policy of the module docstring: one RuntimeWarning per reason that ``op`` (whose
    compiled function is ``name``) cannot use the extension on ``device``."""
    reason = unavailable_reason(device, name)
    if reason in _FALLBACK_WARNED:
        return
    _FALLBACK_WARNED.add(reason)
    warnings.warn(
        f"{reason}; {op} falls back to its PyTorch path (same results, slower), as does every op with a "
        f"compiled kernel. To get the compiled kernels, {BUILD_HINT}. This warning is shown once.",
        RuntimeWarning,
        stacklevel=_caller_stacklevel(),
    )


def build_info() -> dict[str, object]:
    """What the extension was built with, or why it is missing; keys are prefixed ``extension``."""
    module = extension()
    if module is None:
        error = extension_error()
        return {
            "extension": f"missing ({type(error).__name__}: {error})",
            "extension fallback": "PyTorch paths, with one warning (CPU paste: index_copy of box rows; "
            "attention_rollout: vectorised vector-matrix chain)",
        }
    built = dict(module.build_info())
    return {
        "extension": "available",
        "extension built_with_cuda": built["built_with_cuda"],
        "extension cuda_version": built["cuda_version"],
        "extension torch_version": built["torch_version"],
        "extension matches running torch": torch.__version__.split("+")[0] == built["torch_version"],
        "extension openmp": built["openmp"],
        "extension compiler": built["compiler"],
    }

