"""Launch settings of the Triton kernels: block sizes and warps (Liger's calculate_settings rule)."""

from __future__ import annotations

__all__ = ["block_size", "num_warps_for"]


def block_size(n: int, cap: int = 4096) -> int:
    """Next power of two of a row length, capped (Liger's calculate_settings rule)."""
    return max(16, min(cap, 1 << max(0, (int(n) - 1).bit_length())))


def num_warps_for(block: int) -> int:
    """Warps for a tile of ``block`` elements (Liger's steps)."""
    if block >= 4096:
        return 16
    if block >= 2048:
        return 8
    return 4
