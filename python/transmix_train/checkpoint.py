"""Checkpoints in timm's layout, written atomically, with every state an exact resume needs.

Layout (a plain dict that ``timm.models.load_checkpoint`` reads, ``weights_only`` safe)::

    state_dict      model weights (the uncompiled, unwrapped module)
    optimizer       optimizer.state_dict()
    epoch           the last finished epoch, 0-based (with ``version`` 2, as timm's saver:
                    a resume starts at epoch + 1)
    arch            the timm model name
    args            the resolved config as a plain dict (``model_kwargs`` rebuild the model)
    version         2
    metric          val top-1 of that epoch
    state_dict_ema  EMA weights when --model-ema (timm's load_checkpoint prefers them)
    scheduler, scaler, best_metric, best_epoch, world_size
    rng             one entry per rank: Python, NumPy, torch (CPU and CUDA) and TransMix states
    num_updates     optimizer updates so far (the lr schedule's position)
    history         ``--checkpoint-hist``'s kept files and their val top-1
    progress        only in a mid-epoch recovery checkpoint (``recovery-<epoch>-<update>.pth``,
                    ``--recovery-interval``): the epoch under way and how far it got (micro-batches,
                    loss sum, images, seconds); ``epoch`` is then the last finished one

A write goes to a temporary file in the same folder, is flushed and fsynced, then renamed over
the old file (``os.replace`` is atomic on POSIX): a kill at any moment leaves the previous
checkpoint whole.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_VERSION", "CheckpointHistory", "capture_rng", "copy_checkpoint", "read_checkpoint", "restore_rng", "save_checkpoint",
]

CHECKPOINT_VERSION = 2


def _atomic_write(path: Path, write) -> Path:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power loss
    finally:
        os.close(directory)
    return path


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename, fsync of the folder)."""
    return _atomic_write(Path(path), lambda handle: torch.save(state, handle))


def copy_checkpoint(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Copy a written checkpoint (``last.pth`` -> ``best.pth``) with the same atomic rename."""
    with open(source, "rb") as src:
        return _atomic_write(Path(path), lambda handle: shutil.copyfileobj(src, handle, 1 << 24))


def read_checkpoint(path: str | os.PathLike, flag: str = "--resume") -> dict[str, Any]:
    """Load a checkpoint on the CPU (``weights_only``); a ``ValueError`` naming ``flag`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"{flag} {path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{flag} {path}: not a training checkpoint (no 'state_dict')")
    return checkpoint


def capture_rng(mixer: Optional[object] = None) -> dict[str, Any]:
    """This process's random states, as plain values and tensors (``weights_only`` loadable)."""
    legacy = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [legacy[0], torch.from_numpy(legacy[1].astype(np.int64)), *legacy[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if hasattr(mixer, "state_dict"):
        state["mixer"] = mixer.state_dict()
    return state


def restore_rng(state: dict[str, Any], mixer: Optional[object] = None) -> None:
    """Put back what :func:`capture_rng` took (the mixer's generator included)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if hasattr(mixer, "load_state_dict") and "mixer" in state:
        saved = state["mixer"]
        # Checkpoints of earlier versions hold the generator's state itself.
        mixer.load_state_dict(saved if "generator" in saved else {"generator": saved})


class CheckpointHistory:
    """``--checkpoint-hist N``: the N best epochs kept as ``checkpoint-<epoch>.pth`` (timm's top-N).

    Ranked by val top-1, higher first, ties keeping the earlier epoch, as timm's ``CheckpointSaver``.
    Each kept file is a hard link to that epoch's ``last.pth`` (a copy where links are not allowed).
    :meth:`state_dict` goes into every checkpoint, so a resumed run keeps ranking the same files.
    """

    def __init__(self, folder: str | os.PathLike, keep: int) -> None:
        self.folder, self.keep = Path(folder), keep
        self.files: list[tuple[str, float]] = []  # (file name, metric), best first

    def state_dict(self) -> list[list]:
        return [[name, metric] for name, metric in self.files]

    def load_state_dict(self, files: list) -> None:
        self.files = [(name, float(metric)) for name, metric in files if (self.folder / name).is_file()]

    def rank(self, epoch: int, metric: float) -> None:
        """Enter ``epoch`` into the ranking (before its checkpoint is written, which records it)."""
        self._pending: tuple[Optional[str], list[str]] = (None, [])
        if self.keep < 1:
            return
        name = f"checkpoint-{epoch}.pth"
        ranked = sorted([*self.files, (name, metric)], key=lambda item: -item[1])  # stable: earlier wins ties
        self.files = ranked[:self.keep]
        kept = name if (name, metric) in self.files else None
        self._pending = (kept, [old for old, _ in ranked[self.keep:] if old != name])

    def write(self, last: Path) -> None:
        """After ``last`` (that epoch's checkpoint) is written: keep it if it ranked, drop the evicted."""
        kept, dropped = getattr(self, "_pending", (None, []))
        if kept is not None:
            _link_or_copy(last, self.folder / kept)
        for old in dropped:
            (self.folder / old).unlink(missing_ok=True)
        self._pending = (None, [])


def _link_or_copy(source: Path, path: Path) -> None:
    path.unlink(missing_ok=True)
    try:
        os.link(source, path)
    except OSError:
        copy_checkpoint(source, path)
