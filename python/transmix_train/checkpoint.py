"""Checkpoints in timm's layout, written atomically by a timm ``CheckpointSaver``, with every state an
exact resume needs.

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
    history         the saver's state, in the format of timm's ``CheckpointSaver.state_dict()``:
                    ``checkpoint_files`` (``--checkpoint-hist``'s kept files and their val top-1,
                    best first), ``best_metric``, ``best_epoch``, ``pending`` (this checkpoint's
                    epoch and top-1, ranked just after it was written)
    progress        only in a mid-epoch recovery checkpoint (``recovery-<epoch>-<update>.pth``,
                    ``--recovery-interval``): the epoch under way and how far it got (micro-batches,
                    loss sum, images, seconds); ``epoch`` is then the last finished one

Files (:class:`AtomicCheckpointSaver`, a subclass of timm's ``CheckpointSaver``): ``last.pth`` every
epoch, ``best.pth`` when val top-1 improved, ``checkpoint-<epoch>.pth`` for the ``--checkpoint-hist N``
best epochs, and the newest ``recovery-<epoch>-<update>.pth`` while an epoch is under way.

Every write goes to a temporary file in the same folder (timm's ``tmp.pth``, ``recovery_tmp.pth``), is
flushed and fsynced, then renamed over the old file (``os.replace`` is atomic on POSIX) and the folder
is fsynced; ``best.pth`` and ``checkpoint-<epoch>.pth`` are hard links (durable copies where links
fail) made under a temporary name and renamed the same way: a kill at any moment leaves the
previous checkpoints whole.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from timm.utils import CheckpointSaver

__all__ = [
    "AtomicCheckpointSaver", "CHECKPOINT_VERSION", "capture_rng", "read_checkpoint", "restore_rng", "save_checkpoint",
]

CHECKPOINT_VERSION = 2

_logger = logging.getLogger(__name__)


def _write_durably(path: str | os.PathLike, write) -> None:
    """``write(handle)`` into ``path``, then flush and fsync: the bytes are on disk when it returns."""
    with open(path, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def _replace_durably(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename ``source`` over ``path`` (atomic on POSIX), then fsync the folder so the rename survives a power loss."""
    os.replace(source, path)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _temporary(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename, fsync of the folder)."""
    temporary = _temporary(path)
    _write_durably(temporary, lambda handle: torch.save(state, handle))
    _replace_durably(temporary, path)
    return Path(path)


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


class AtomicCheckpointSaver(CheckpointSaver):
    """timm's ``CheckpointSaver`` with durable writes, our file names and our checkpoint layout.

    timm's code decides what is kept: ``save_checkpoint`` writes ``last``, ranks the epoch among the
    ``--checkpoint-hist`` best (val top-1, higher first, ties keeping the earlier epoch), links it as
    ``checkpoint-<epoch>.pth``, evicts the worst (``_cleanup_checkpoints``) and copies a new best;
    ``save_recovery`` writes ``recovery-<epoch>-<update>.pth``. This class overrides how files are
    written (``_save``, ``_replace``, ``_duplicate``: see each for what timm's would lose), what a file
    holds (the caller's state, built on every rank, plus the saver's :meth:`state_dict`) and a few
    policies (no history at ``keep`` 0, ``best.pth``, one recovery file).

    Example (rank 0; ``state`` as ``main._checkpoint_state`` builds it)::

        saver = AtomicCheckpointSaver("out", keep=2)
        saver.save_checkpoint(epoch, val_top1, state=state)   # last.pth, best.pth, checkpoint-<epoch>.pth
        saver.save_recovery(epoch, num_updates, state=state)  # recovery-<epoch>-<num_updates>.pth
        saver.resume(read_checkpoint("out/last.pth"))         # the same kept files after --resume
    """

    def __init__(self, folder: str | os.PathLike, keep: int) -> None:
        # The saver only writes the states it is handed, so it needs no model or optimizer. timm
        # asserts max_history >= 1; keep 0 (no --checkpoint-hist) is handled in save_checkpoint.
        super().__init__(None, None, checkpoint_dir=os.fspath(folder), recovery_dir=os.fspath(folder),
                         max_history=max(keep, 1))
        self.keep = keep
        self.extension = ".pth"  # timm's .pth.tar: ours stay last.pth, checkpoint-<epoch>.pth, recovery-*.pth
        self._state: Optional[dict[str, Any]] = None

    def _path(self, name: str) -> str:
        return os.path.join(self.checkpoint_dir, name + self.extension)

    def _checkpoint_path(self, epoch: int) -> str:  # timm >= 1.0.31 has the same; 1.0.30 builds it inline
        return self._path(f"{self.save_prefix}-{epoch}")

    # -- writing: timm's own would lose the atomicity or the durability --------------------------

    def _save(self, save_path: str, epoch: int, metric: Optional[float] = None) -> None:
        """Write the state handed to :meth:`save_checkpoint` / :meth:`save_recovery` (timm's builds its
        own from a model and optimizer, without scheduler, RNG or progress) and fsync it; timm's
        ``save_checkpoint`` then renames the temporary file with :meth:`_replace`."""
        if self._state is None:
            raise RuntimeError("AtomicCheckpointSaver writes the state passed to save_checkpoint/save_recovery")
        # The history before this epoch is ranked, with the epoch as 'pending' (timm's format); a
        # recovery checkpoint (no metric) ranks nothing on resume.
        history = self.state_dict(epoch, metric) if metric is not None else self.state_dict()
        state = {**self._state, "history": history}
        _write_durably(save_path, lambda handle: torch.save(state, handle))

    def _replace(self, src: str, dst: str) -> None:
        """timm's unlinks ``dst`` before the rename (for Windows), so a kill in between leaves no
        ``last.pth`` at all; ``os.replace`` alone is atomic, and the folder's fsync makes it durable."""
        _replace_durably(src, dst)

    def _duplicate(self, src: str, dst: str) -> None:
        """``dst`` as a hard link to ``src`` (a durable copy where links fail), made under a temporary name
        and renamed over ``dst``. timm's unlinks ``dst`` first (a kill then leaves no ``best.pth``) and
        copies without fsync. timm names the best file ``model_best``: ours is ``best.pth``."""
        if os.path.basename(dst) == "model_best" + self.extension:
            dst = self._path("best")
        temporary = _temporary(dst)
        if os.path.lexists(temporary):
            os.unlink(temporary)
        linked = False
        if self.can_hardlink:
            try:
                os.link(src, temporary)
                linked = True
            except (OSError, NotImplementedError):
                self.can_hardlink = False
        if not linked:
            with open(src, "rb") as source:
                _write_durably(temporary, lambda handle: shutil.copyfileobj(source, handle, 1 << 24))
        _replace_durably(temporary, dst)

    # -- what is kept ------------------------------------------------------------------------------

    def save_checkpoint(self, epoch: int, metric: Optional[float] = None, *,
                        state: dict[str, Any]) -> tuple[Optional[float], Optional[int]]:
        """Write ``state`` as ``last.pth``; then timm's ranking keeps it as ``checkpoint-<epoch>.pth`` when
        it is among the ``keep`` best; ``best.pth`` when ``metric`` beats every earlier epoch; recovery
        files of the finished epoch removed. Returns (best metric, its epoch) as timm's."""
        self._state = state
        try:
            if self.keep > 0:
                super().save_checkpoint(epoch, metric)
            else:  # timm's saver always keeps >= 1 numbered file; without --checkpoint-hist only last and best
                temporary = self._path("tmp")
                self._save(temporary, epoch, metric)
                self._replace(temporary, self._path("last"))
                if metric is not None and (self.best_metric is None or self.cmp(metric, self.best_metric)):
                    self.best_metric, self.best_epoch = metric, epoch
                    self._duplicate(self._path("last"), self._path("best"))
        finally:
            self._state = None
        self.remove_recovery()
        return self.best_metric, self.best_epoch

    def save_recovery(self, epoch: int, batch_idx: int = 0, *, state: dict[str, Any]) -> str:
        """timm's ``recovery-<epoch>-<batch_idx>.pth``, keeping only the newest (timm keeps two: with
        atomic writes the newest is always whole, and each is as large as a checkpoint)."""
        self._state = state
        try:
            super().save_recovery(epoch, batch_idx)
        finally:
            self._state = None
        self.remove_recovery(keep=self.curr_recovery_file)
        return self.curr_recovery_file

    def remove_recovery(self, keep: str = "") -> None:
        """Delete recovery files but ``keep`` (those of an earlier invocation in this folder too)."""
        for path in glob.glob(os.path.join(self.recovery_dir, f"{self.recovery_prefix}-*{self.extension}")):
            if os.path.basename(path) != os.path.basename(keep):
                os.unlink(path)
        self.prev_recovery_file, self.curr_recovery_file = "", keep

    # -- the saver's own state ---------------------------------------------------------------------

    def state_dict(self, epoch: Optional[int] = None, metric: Optional[float] = None) -> dict[str, Any]:
        """timm's format (timm >= 1.0.31 has the same method; 1.0.30, which this project supports, has none)."""
        return {
            "checkpoint_files": [(os.path.basename(path), value) for path, value in self.checkpoint_files],
            "best_epoch": self.best_epoch,
            "best_metric": self.best_metric,
            "pending": (epoch, metric),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Kept files that still exist (an evicted one is gone), plus the pending epoch's when it was kept,
        as timm >= 1.0.31 does; the pending epoch also counts for the best (kept or not, with keep 0)."""
        files = [(os.path.join(self.checkpoint_dir, name), float(value))
                 for name, value in state.get("checkpoint_files", [])
                 if os.path.exists(os.path.join(self.checkpoint_dir, name))]
        self.best_epoch, self.best_metric = state.get("best_epoch"), state.get("best_metric")
        epoch, metric = state.get("pending") or (None, None)
        if epoch is not None and metric is not None:
            path = self._checkpoint_path(epoch)
            if os.path.exists(path) and path not in [name for name, _ in files]:
                files.append((path, float(metric)))
            if self.best_metric is None or self.cmp(metric, self.best_metric):
                self.best_epoch, self.best_metric = epoch, metric
        # timm's order: best first, a stable sort so that ties keep the earlier epoch.
        self.checkpoint_files = sorted(files, key=lambda item: item[1], reverse=not self.decreasing)
        if self.keep > 0:
            _logger.info(f"--checkpoint-hist: {len(self.checkpoint_files)} kept file(s) restored, best top-1 "
                         f"{self.best_metric} (epoch {self.best_epoch})")

    def resume(self, checkpoint: dict[str, Any]) -> None:
        """The saver's state from a checkpoint being resumed (``history``; checkpoints written before this
        saver hold a list of [file, top-1] there, their best in ``best_metric``/``best_epoch``)."""
        history = checkpoint.get("history") or {}
        if isinstance(history, list):
            known = checkpoint.get("best_epoch", -1) >= 0
            history = {"checkpoint_files": history, "best_epoch": checkpoint["best_epoch"] if known else None,
                       "best_metric": checkpoint["best_metric"] if known else None}
        self.load_state_dict(history)
