"""Optional import of the compiled extension ``transmix_kernels._C`` (xformers ``_cpp_lib.py`` style).

The package works without the extension: the ops that have a compiled kernel fall back to their
PyTorch paths and say so once. This module tries the import once, on first use (never at package
import), keeps the error instead of raising it, and reports what the binary was built with::

    from transmix_kernels import _ext
    _ext.extension()        # the module, or None
    _ext.extension_error()  # why it is None (the ImportError/OSError), or None
    _ext.build_info()       # a dict for ``python -m transmix_kernels.info``
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

import torch

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
    module = extension()
    return bool(module is not None and module.build_info()["built_with_cuda"])


def supports(device: torch.device) -> bool:
    """Whether the extension can run on tensors of this device."""
    if extension() is None:
        return False
    return device.type == "cpu" or (device.type == "cuda" and built_with_cuda())


def unavailable_reason(device: torch.device) -> str:
    """Why :func:`supports` is False for this device (for the fallback warning)."""
    error = extension_error()
    if error is not None:
        return f"transmix_kernels._C could not be imported ({type(error).__name__}: {error})"
    if device.type == "cuda":
        return "transmix_kernels._C was built without CUDA (no CUDA toolkit at build time)"
    return f"transmix_kernels._C has no kernels for {device.type} tensors"


def build_info() -> dict[str, object]:
    """What the extension was built with, or why it is missing; keys are prefixed ``extension``."""
    module = extension()
    if module is None:
        error = extension_error()
        return {
            "extension": f"missing ({type(error).__name__}: {error})",
            "extension fallback": "PyTorch paths (attention_rollout: vectorised vector-matrix chain)",
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


__all__ = ["extension", "extension_error", "built_with_cuda", "supports", "build_info"]
