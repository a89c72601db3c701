"""What a run writes beside its checkpoints: ``metrics.csv``, ``curves.png`` and ``train.log``, and
the console (:func:`setup_logging`: timm's ``setup_default_logging``, on stderr).

Only rank 0 writes. ``metrics.csv`` has one row per epoch (:data:`METRIC_FIELDS`; accuracies in
percent as timm reports them, ``ema_top1`` empty without ``--model-ema``); on ``--resume`` the
rows after the checkpoint's epoch are dropped, so a run killed between writing a row and its
checkpoint does not repeat that epoch.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from timm.utils import setup_default_logging

__all__ = ["METRIC_FIELDS", "MetricsLog", "plot_curves", "run_summary", "setup_logging"]

METRIC_FIELDS = ("epoch", "train_loss", "lr", "val_loss", "val_top1", "val_top5", "ema_top1", "images_per_s",
                 "seconds")


class MetricsLog:
    """Append-only ``metrics.csv`` (flushed and fsynced per row)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def rows(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as handle:
            return list(csv.DictReader(handle))

    def keep_until(self, epoch: int) -> None:
        """Drop rows of epochs after ``epoch`` (resuming from that epoch's checkpoint)."""
        kept = [row for row in self.rows() if int(row["epoch"]) <= epoch]
        self._write(kept, "w")

    def append(self, row: dict[str, object]) -> None:
        unknown = set(row) - set(METRIC_FIELDS)
        if unknown:
            raise KeyError(f"unknown metrics fields {sorted(unknown)}")
        self._write([row], "a")

    def _write(self, rows: list[dict], mode: str) -> None:
        new = mode == "w" or not self.path.is_file()
        with open(self.path, mode, newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRIC_FIELDS)
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow({key: _format(row.get(key)) for key in METRIC_FIELDS})
            handle.flush()
            os.fsync(handle.fileno())


def _format(value) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def plot_curves(metrics_csv: str | os.PathLike, png: str | os.PathLike) -> Optional[Path]:
    """Loss and accuracy curves per epoch (matplotlib, Agg); None when there is nothing to plot."""
    rows = MetricsLog(metrics_csv).rows()
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) + 1 for r in rows]

    def column(name: str) -> list[float]:
        return [float(r[name]) if r.get(name) else float("nan") for r in rows]

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, column("train_loss"), label="train (mixed targets)")
    ax_loss.plot(epochs, column("val_loss"), label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, column("val_top1"), label="val top-1")
    ax_acc.plot(epochs, column("val_top5"), label="val top-5")
    if any(r.get("ema_top1") for r in rows):
        ax_acc.plot(epochs, column("ema_top1"), label="EMA top-1")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="val accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png = Path(png)
    temporary = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(temporary, dpi=100)
    plt.close(fig)
    os.replace(temporary, png)
    return png


def run_summary(output: str | os.PathLike, best: tuple[float, int], seconds: float) -> str:
    """The line that ends a run: final and best val top-1 with their epochs, wall time, and where
    the checkpoints and curves are (the final row is metrics.csv's last, so a resume that trains
    no further epoch still reports it)."""
    output = Path(output)
    rows = MetricsLog(output / "metrics.csv").rows()
    final = f"final val top-1 {float(rows[-1]['val_top1']):.2f}% (epoch {rows[-1]['epoch']})" if rows \
        else "no epoch trained"
    best_text = f"best {best[0]:.2f}% (epoch {best[1]})" if best[1] >= 0 else "no best yet"
    checkpoints = ", ".join(sorted(path.name for path in output.glob("*.pth"))) or "none"
    curves = output / "curves.png"
    return (f"done: {final}, {best_text}; wall time {seconds:.1f} s; checkpoints in {output}/ ({checkpoints}); "
            f"curves {curves if curves.is_file() else 'none'}")


class _CurrentStderr:
    """``sys.stderr`` looked up at each write: a handler left on the root logger after ``main()``
    returns follows a later swap (pytest's capture, a notebook) instead of writing to a closed stream."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def setup_logging(log_file: Optional[str | os.PathLike], primary: bool) -> logging.Logger:
    """The ``transmix_train`` logger; console and ``log_file`` on the root logger, as timm's train.py.

    The console is timm's ``setup_default_logging`` (stderr, plain INFO lines, ``LEVEL: message``
    above), at INFO on rank 0 and WARNING on the others, so that timm's own messages (the saver's
    kept checkpoints, its restored history) show as in timm's train.py. ``log_file`` (rank 0) gets
    every line with a time stamp through a plain ``FileHandler``, not the ``log_path`` of
    ``setup_default_logging``: that one is a ``RotatingFileHandler`` of 2 MB x 3 backups, which would
    move the start of a long run to ``train.log.1``.. and then drop it. Calling this again (once the
    output folder exists; each ``main()`` of a test) first removes the handlers the last call added,
    so no line is written twice.
    """
    root = logging.getLogger()
    for handler in [handler for handler in root.handlers if getattr(handler, "_transmix_train", False)]:
        root.removeHandler(handler)
        handler.close()
    before = set(root.handlers)
    setup_default_logging(logging.INFO if primary else logging.WARNING)
    for handler in set(root.handlers) - before:
        handler.setStream(_CurrentStderr())  # timm's console, writing to sys.stderr as it is at each line
    if log_file is not None and primary:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        root.addHandler(file_handler)
    for handler in set(root.handlers) - before:
        handler._transmix_train = True
    return logging.getLogger("transmix_train")  # no handler or level of its own: the root's
