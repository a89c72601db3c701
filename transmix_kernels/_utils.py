"""Shared plumbing of the ops: backend choice, input checks, Triton launch settings.

Every public op takes ``impl="auto" | "triton" | "torch" | "reference"`` and resolves it with
:func:`resolve_impl`. Every check raises *before* any work, names the argument and says what
was expected, so a caller's tensors are never touched by a call that fails.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch

try:  # Triton ships with CUDA builds of torch; a CPU-only torch may lack it.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAS_TRITON = False

# Triton decides at decoration time whether @triton.jit builds an interpreted function, so what
# counts is the environment when this package was imported.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

IMPLS = ("auto", "triton", "torch", "reference")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_impl(impl: str, device: torch.device) -> str:
    """Turn ``impl`` into the backend that runs: "triton", "torch" or "reference".

    auto: Triton on CUDA tensors, the vectorised PyTorch path otherwise.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if (device.type == "cuda" and HAS_TRITON) else "torch"
    if impl == "triton":
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
    return impl


def dispatch_backend(impl: str, device: torch.device, eager: str = "direct") -> str:
    """Like :func:`resolve_impl`, for the ops registered with torch.library.

    "auto" becomes "op" (the registered op, which picks the Triton kernel on CUDA and the CPU
    path otherwise) while torch.compile traces, so the graph holds the op. Run eagerly, "auto"
    skips the op's dispatch cost (tens of microseconds a call) and returns the backend the op
    would run: ``eager="direct"`` gives "triton" / "torch", ``eager="native"`` gives "native"
    (for ops whose CPU path prefers the compiled extension), ``eager="op"`` keeps "op".
    """
    backend = resolve_impl(impl, device)
    if impl != "auto":
        return backend
    if eager == "op" or torch.compiler.is_compiling():
        return "op"
    return "native" if eager == "native" else backend


def check_tensor(
    name: str,
    value,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Type, rank, dtype and device check of one argument; returns it unchanged."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            want = " or ".join(str(d) for d in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on {device} (like the other inputs), got {value.device}")
    return value


def check_batch(name: str, value: torch.Tensor, batch: int, dim: int = 0, like: str = "images") -> None:
    if value.shape[dim] != batch:
        raise ValueError(
            f"{name} must have batch size {batch} in dimension {dim} (like {like}), got shape {tuple(value.shape)}"
        )


def check_range(name: str, value: float, low: float, high: float) -> float:
    """Closed-interval check of a Python number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (low <= float(value) <= high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return float(value)


def check_index_range(name: str, value: torch.Tensor, low: int, high: int) -> None:
    """All elements in [low, high); one host sync, taken before any kernel runs."""
    if value.numel() == 0:
        return
    lo, hi = int(value.min()), int(value.max())
    if torch.compiler.is_compiling():
        # Traced values are symbolic: branching on them breaks a fullgraph trace, so the graph
        # asserts them at run time instead.
        # (Message functions may not close over variables under some torch versions' dynamo.)
        torch._check(lo >= low, lambda: "an index argument is below its valid range")
        torch._check(hi < high, lambda: "an index argument is above its valid range")
        return
    if lo < low or hi >= high:
        raise ValueError(f"{name} must hold values in [{low}, {high}), got values in [{lo}, {hi}]")


def check_unit_interval(name: str, value: torch.Tensor) -> None:
    """All elements finite and in [0, 1] (mixing weights); one host sync, before any kernel runs."""
    if value.numel() == 0:
        return
    lo, hi = value.min(), value.max()
    if torch.compiler.is_compiling():
        # Float values cannot be guarded on in a trace: the compiled graph asserts them instead.
        torch._assert_async(torch.logical_and(lo >= 0, hi <= 1), "a mixing weight is outside [0, 1]")
        return
    lo, hi = float(lo), float(hi)
    if not (0.0 <= lo and hi <= 1.0):  # NaN fails both comparisons
        raise ValueError(f"{name} must hold finite values in [0, 1], got values in [{lo}, {hi}]")


def check_partner(partner, batch: int, device: torch.device) -> torch.Tensor:
    """(B,) int64 indices in [0, B); None means the flipped batch."""
    if partner is None:
        return flipped_partner(batch, device)
    check_tensor("partner", partner, ndim=1, dtypes=(torch.int64,), device=device)
    if partner.shape[0] != batch:
        raise ValueError(f"partner must have shape ({batch},) (one index per sample), got {tuple(partner.shape)}")
    check_index_range("partner", partner, 0, batch)
    return partner


def flipped_partner(batch: int, device: torch.device) -> torch.Tensor:
    """The reference pairing: sample i with B-1-i (an odd batch pairs its middle with itself)."""
    return torch.arange(batch - 1, -1, -1, device=device, dtype=torch.int64)


def draw_box_randoms(
    batch: int, device: torch.device, minmax: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """Uniform [0, 1) float64 draws that place the boxes: (2, B) centres, or (4, B) sizes + corners.

    The fast path and the reference twin consume the same draws, so one generator state gives
    the same boxes in both.
    """
    return torch.rand((4 if minmax else 2, batch), generator=generator, device=device, dtype=torch.float64)


def nearest_scale(size: int, grid: int) -> float:
    """F.interpolate(mode="nearest")'s float32 scale; the token mask must match it bit for bit."""
    return float(torch.tensor(size, dtype=torch.float32) / torch.tensor(grid, dtype=torch.float32))


def block_size(n: int, cap: int = 4096) -> int:
    """Next power of two of a row length, capped (Liger's calculate_settings rule)."""
    return max(16, min(cap, 1 << max(0, (int(n) - 1).bit_length())))


def num_warps_for(block: int) -> int:
    if block >= 4096:
        return 16
    if block >= 2048:
        return 8
    return 4
