"""Run tracking beside ``metrics.csv``: TensorBoard event files (``--log-tensorboard``) and Weights &
Biases (``--log-wandb``, timm's flag), both from the ``track`` extra.

Each epoch's metrics row (the one ``metrics.csv`` gets, :data:`~.outputs.METRIC_FIELDS`) goes to
every tracker; W&B also gets the resolved config, TensorBoard gets it as text. Only rank 0 logs.
:func:`check_tracking` imports the packages at set-up, so a missing one stops the run before
anything is trained or written.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

__all__ = ["TENSORBOARD_DIR", "Trackers", "check_tracking", "open_trackers"]

#: The folder under ``--output`` that holds the TensorBoard event files.
TENSORBOARD_DIR = "tensorboard"
# flag -> (module it needs, the pip package)
_NEEDS = {"log_tensorboard": ("torch.utils.tensorboard", "tensorboard"), "log_wandb": ("wandb", "wandb")}


def check_tracking(args: argparse.Namespace) -> None:
    """A ValueError naming the flag and the extra when a tracker's package cannot be imported."""
    for name, (module, package) in _NEEDS.items():
        if not getattr(args, name, False):
            continue
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ValueError(f"--{name.replace('_', '-')} needs the {package} package ({error}): "
                             f"pip install 'transmix-kernels[track]' (or pip install {package})") from None
    if getattr(args, "wandb_resume_id", None) and not args.resume:
        raise ValueError(f"--wandb-resume-id {args.wandb_resume_id} continues a W&B run: it needs --resume CKPT")


class Trackers:
    """The open trackers of a run; ``log`` sends one metrics row to each, ``close`` ends them."""

    def __init__(self, tensorboard=None, wandb_run=None) -> None:
        self.tensorboard, self.wandb_run = tensorboard, wandb_run

    def log(self, row: dict[str, Any]) -> None:
        """One epoch's row (``epoch`` plus the metrics; None values, e.g. ``ema_top1``, are skipped)."""
        epoch = int(row["epoch"])
        values = {key: float(value) for key, value in row.items() if key != "epoch" and value is not None}
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, epoch)
            self.tensorboard.flush()  # a killed run keeps the epochs it finished
        if self.wandb_run is not None:
            self.wandb_run.log({"epoch": epoch, **values})  # as timm: the epoch is a field, W&B counts steps

    def close(self, exit_code: int = 0) -> None:
        """Flush and end every tracker (idempotent)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None


def _tensorboard(output: Path, start_epoch: int, config: dict[str, Any]):
    from torch.utils.tensorboard import SummaryWriter

    # purge_step: a resume drops the epochs after its checkpoint, as metrics.csv does.
    writer = SummaryWriter(log_dir=str(output / TENSORBOARD_DIR), purge_step=start_epoch or None)
    if start_epoch == 0:
        writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=True) + "```", 0)
    return writer


def _wandb(args: argparse.Namespace, output: Path, config: dict[str, Any], log: Callable[[str], None]):
    import wandb

    run = wandb.init(
        project=args.wandb_project, name=output.name, config=config, tags=list(args.wandb_tags or []) or None,
        # WANDB_DIR wins; otherwise the run's own files sit with its outputs, not in the working directory.
        dir=None if os.environ.get("WANDB_DIR") else str(output),
        resume="must" if args.wandb_resume_id else None, id=args.wandb_resume_id or None,
    )
    log(f"W&B run {run.id} ({run.project}; continue it after a --resume with --wandb-resume-id {run.id})")
    return run


def open_trackers(args: argparse.Namespace, output: Optional[Path], config: dict[str, Any], primary: bool,
                  start_epoch: int, log: Callable[[str], None]) -> Trackers:
    """The trackers the flags ask for (none on ranks other than 0); ``output`` must exist."""
    if not primary or output is None:
        return Trackers()
    tensorboard = _tensorboard(output, start_epoch, config) if args.log_tensorboard else None
    wandb_run = _wandb(args, output, config, log) if args.log_wandb else None
    return Trackers(tensorboard, wandb_run)
