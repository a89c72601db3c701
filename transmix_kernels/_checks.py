"""Input checks of the ops: every one raises before any work, names the argument and says what
was expected, so a caller's tensors are never touched by a call that fails.

TypeError for a wrong type, ValueError for a wrong value. The trainer's mixers use the same
checks, so the library and the trainer word their errors alike.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = [
    "FLOAT_DTYPES",
    "check_batch",
    "check_index_range",
    "check_non_negative",
    "check_num_prefix_tokens",
    "check_partner",
    "check_positive_int",
    "check_range",
    "check_scale",
    "check_tensor",
    "check_unit_interval",
    "flipped_partner",
    "is_dense",
    "is_int",
    "is_number",
]


def is_int(value) -> bool:
    """A Python int that is not a bool (bool subclasses int; True is never meant as 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A Python int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(name: str, value) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_scale(scale) -> float:
    """The attention's logit scale: a positive finite Python number."""
    if not is_number(scale) or not (0.0 < float(scale) < float("inf")):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return float(scale)


def check_num_prefix_tokens(value, n_tokens: int, what: str) -> int:
    """Tokens in front of the patches: an int in [0, N), so at least one patch token is left."""
    if not is_int(value):
        raise TypeError(f"num_prefix_tokens must be an int, got {type(value).__name__}")
    if not 0 <= value < n_tokens:
        raise ValueError(
            f"num_prefix_tokens must be in [0, N) = [0, {n_tokens}) so at least one patch token is left "
            f"({what} has N = {n_tokens} tokens), got {value}"
        )
    return value


def is_dense(images: torch.Tensor) -> bool:
    """Contiguous or channels_last: every element has its own address (no aliasing strides)."""
    return images.is_contiguous() or images.is_contiguous(memory_format=torch.channels_last)


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
    """Size ``batch`` in dimension ``dim`` (the batch of the tensor named ``like``)."""
    if value.shape[dim] != batch:
        raise ValueError(
            f"{name} must have batch size {batch} in dimension {dim} (like {like}), got shape {tuple(value.shape)}"
        )


def check_range(name: str, value: float, low: float, high: float) -> float:
    """Closed-interval check of a Python number."""
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (low <= float(value) <= high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return float(value)


def check_non_negative(name: str, value: float) -> float:
    """A finite Python number >= 0 (a Beta alpha): TypeError for a non-number, ValueError otherwise."""
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (0.0 <= float(value) < float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _host_bounds(value: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a non-empty tensor as Python numbers, NaN if it holds one. CPU tensors are
    read through NumPy (a few microseconds; a PyTorch reduction costs several times that), others
    with one aminmax and one host sync."""
    if value.device.type == "cpu" and value.dtype in (torch.int64, torch.float32, torch.float64):
        array = value.detach().numpy()
        return array.min().item(), array.max().item()
    return tuple(torch.aminmax(value.detach()).tolist())  # type: ignore[return-value]


def check_index_range(name: str, value: torch.Tensor, low: int, high: int) -> None:
    """All elements in [low, high); checked before any kernel runs."""
    if value.numel() == 0:
        return
    if torch.compiler.is_compiling():
        # Traced values are symbolic: branching on them breaks a fullgraph trace, so the graph
        # asserts them at run time instead.
        # (Message functions may not close over variables under some torch versions' dynamo.)
        lo, hi = (int(bound) for bound in torch.aminmax(value.detach()))
        torch._check(lo >= low, lambda: "an index argument is below its valid range")
        torch._check(hi < high, lambda: "an index argument is above its valid range")
        return
    if value.device.type == "cpu" and value.dtype == torch.int64 and low == 0:
        # One pass: a negative value reads as a huge unsigned one.
        if int(value.detach().numpy().view(np.uint64).max()) < high:
            return
    lo, hi = _host_bounds(value)
    if lo < low or hi >= high:
        raise ValueError(f"{name} must hold values in [{low}, {high}), got values in [{lo}, {hi}]")


def check_unit_interval(name: str, value: torch.Tensor) -> None:
    """All elements finite and in [0, 1] (mixing weights); checked before any kernel runs."""
    if value.numel() == 0:
        return
    if torch.compiler.is_compiling():
        # Float values cannot be guarded on in a trace: the compiled graph asserts them instead.
        lo, hi = torch.aminmax(value.detach())
        torch._assert_async(torch.logical_and(lo >= 0, hi <= 1), "a mixing weight is outside [0, 1]")
        return
    lo, hi = _host_bounds(value)
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
    if device.type == "cpu" and not torch.compiler.is_compiling():  # a fraction of torch.arange's cost
        return torch.from_numpy(np.arange(batch - 1, -1, -1, dtype=np.int64))
    return torch.arange(batch - 1, -1, -1, device=device, dtype=torch.int64)
