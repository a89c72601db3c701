"""Backend dispatch of the ops: each op declares its implementations once, one function runs them.

Every public op takes ``impl="auto" | "triton" | "torch" | "reference"``. An op module declares
an :class:`Op`: which implementations exist (a Triton launcher, a kernel of the compiled extension
with the devices its build has it for, the vectorised PyTorch path, the plain reference twin, the
torch.library op) and nothing else. :func:`resolve_backend`, the one resolver of the package, turns
``impl`` and the inputs' device into the name of the backend that runs; :func:`dispatch` runs it.
The idea follows flash-linear-attention's backend registry (``fla/ops/backends``): the op names
its backends, a shared policy picks one per call.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import torch

from . import _ext


def _triton_importable() -> bool:
    """Triton ships with CUDA builds of torch; a CPU-only torch may lack it."""
    try:
        import triton.language  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the install
        return False
    return True


HAS_TRITON = _triton_importable()

# Triton decides at decoration time whether @triton.jit builds an interpreted function, so what
# counts is the environment when this package was imported.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

IMPLS = ("auto", "triton", "torch", "reference")
BACKENDS = ("triton", "extension", "torch", "reference", "op")

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "IMPLS",
    "TRITON_INTERPRET",
    "Extension",
    "Op",
    "auto_backend",
    "dispatch",
    "resolve_backend",
]


@dataclasses.dataclass(frozen=True)
class Extension:
    """An op's kernel in the compiled extension ``transmix_kernels._C``.

    Attributes:
        function: its name in ``_C``, which a build from older sources may lack.
        devices: the device types it runs on ("cpu", and "cuda" where ``_C`` was built with CUDA).
        run: calls it with the op's arguments.
    """

    function: str
    devices: tuple[str, ...]
    run: Callable[..., Any]


@dataclasses.dataclass(frozen=True, eq=False)
class Op:
    """One op's implementations, declared once. Every one takes the op's arguments, so
    ``dispatch(op, backend, *args, **kwargs)`` runs any of them.

    Attributes:
        name: the public op, for messages.
        torch: the vectorised PyTorch path; runs on tensors of every device.
        reference: the plain twin (``transmix_kernels.reference``); runs on every device.
        triton: the Triton launcher, or None where there is no Triton kernel. impl="auto" runs it
            on CUDA tensors; impl="triton" also on CPU tensors under the interpreter.
        extension: the compiled kernel, which impl="auto" runs on its devices when ``_C`` has it.
        registered: the torch.library op, which impl="auto" leaves in a torch.compile graph; on
            CUDA tensors it runs ``triton`` (registered here), elsewhere its body picks the
            kernel with :func:`auto_backend`.
        impls: the impl values it accepts. An op without a Triton kernel that accepts "triton"
            (sample_boxes) runs its PyTorch path for it.
        kernels: backend name (one of :data:`BACKENDS`) -> function, made from the above: what
            :func:`dispatch` looks up (tests wrap its entries to see which backend ran).
    """

    name: str
    torch: Callable[..., Any]
    reference: Callable[..., Any]
    triton: Callable[..., Any] | None = None
    extension: Extension | None = None
    registered: Callable[..., Any] | None = None
    impls: tuple[str, ...] = IMPLS
    kernels: dict[str, Callable[..., Any]] = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        kernels = {
            "triton": self.triton,
            "extension": None if self.extension is None else self.extension.run,
            "torch": self.torch,
            "reference": self.reference,
            "op": self.registered,
        }
        object.__setattr__(self, "kernels", {name: kernel for name, kernel in kernels.items() if kernel is not None})
        if HAS_TRITON and self.registered is not None and self.triton is not None:
            self.registered.register_kernel("cuda")(self.triton)


def resolve_backend(impl: str, device: torch.device, op: Op) -> str:
    """Turn ``impl`` into the backend that runs: one of :data:`BACKENDS`.

    "auto" is "op" (the registered torch.library op) while torch.compile traces, so the graph
    holds the op; run eagerly it is :func:`auto_backend`, the kernel the op would pick, without
    the op's dispatch cost. "triton" is checked against the device; an op without a Triton kernel
    that accepts it (sample_boxes) runs its PyTorch path. "torch" and "reference" are themselves.
    """
    if impl not in op.impls:
        if impl == "triton":
            raise ValueError(f"{op.name} has no Triton kernel (impl='triton'); use impl in {op.impls}")
        raise ValueError(f"impl must be one of {op.impls}, got {impl!r}")
    if impl == "auto":
        if op.registered is not None and torch.compiler.is_compiling():
            return "op"
        return auto_backend(device, op)
    if impl == "triton":
        _check_triton_device(device)
        return "triton" if op.triton is not None else "torch"
    return impl


def auto_backend(device: torch.device, op: Op) -> str:
    """impl="auto" run eagerly (and the body of a registered op): Triton on CUDA tensors, the
    compiled extension where the op has a kernel there, else the PyTorch path. Where the
    extension cannot run, ``_ext.warn_fallback`` warns once per reason."""
    if op.triton is not None and HAS_TRITON and device.type == "cuda":
        return "triton"
    extension = op.extension
    if extension is not None and device.type in extension.devices:
        if _ext.has_kernel(extension.function, device):
            return "extension"
        _ext.warn_fallback(op.name, extension.function, device)
    return "torch"


def dispatch(op: Op, backend: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``op`` on ``backend`` (from :func:`resolve_backend` or :func:`auto_backend`) with
    validated inputs: every public op and every registered op's body runs through here."""
    return op.kernels[backend](*args, **kwargs)


def _check_triton_device(device: torch.device) -> None:
    if not HAS_TRITON:
        raise RuntimeError("impl='triton' needs the triton package, which is not installed")
    if device.type == "cpu" and not TRITON_INTERPRET:
        raise RuntimeError(
            "impl='triton' got CPU tensors: Triton kernels run on CUDA tensors, or on the CPU "
            "only under the interpreter (set TRITON_INTERPRET=1 before importing "
            "transmix_kernels); use impl='torch' or impl='auto' for the CPU path"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"impl='triton' supports CUDA (or interpreted CPU) tensors, got {device}")
