"""``transmix-train``: train (or evaluate) a timm vision transformer with the DeiT recipe and TransMix.

    transmix-train                                   # the demo: a small DeiT on digits, CPU-sized
    transmix-train --config my.yaml --epochs 100     # YAML first, flags win
    torchrun --nproc-per-node 4 python/train.py --config my.yaml
    transmix-train --resume out/last.pth             # continue exactly (its saved config)
    transmix-train --eval-only --resume out/best.pth # val top-1 / top-5

Set-up lives in ``build.py``, the step and the evaluation in ``engine.py``; this file runs the
epochs and writes the outputs (rank 0 only).
"""

from __future__ import annotations

import sys
import time
from typing import Optional, Sequence

from .build import build_run, Run
from .checkpoint import capture_rng, CHECKPOINT_VERSION, copy_checkpoint, restore_rng, save_checkpoint
from .config import config_dict, parse_args, save_config
from .distributed import all_gather_objects, init_processes, shutdown
from .engine import evaluate, NonFiniteLossError, train_one_epoch
from .outputs import MetricsLog, plot_curves, setup_logging

__all__ = ["main", "run_training"]


def _checkpoint_state(run: Run, epoch: int, metrics: dict, best: tuple[float, int]) -> dict:
    """timm's layout plus what an exact resume needs (RNG of every rank: all ranks call this)."""
    rng = all_gather_objects(capture_rng(run.mixing.mixer), run.info)
    state = {
        "epoch": epoch,
        "arch": run.args.model,
        "state_dict": run.module.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "args": config_dict(run.args),
        "version": CHECKPOINT_VERSION,
        "metric": metrics["val_top1"],
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.step.scaler.state_dict() if run.step.scaler is not None else None,
        "best_metric": best[0],
        "best_epoch": best[1],
        "world_size": run.info.world_size,
        "rng": rng,
    }
    if run.ema is not None:
        state["state_dict_ema"] = run.ema.module.state_dict()
    return state


def _restore(run: Run, log) -> tuple[int, tuple[float, int]]:
    """Load the resume checkpoint into the run; (first epoch to train, (best top-1, its epoch))."""
    checkpoint = run.checkpoint
    run.module.load_state_dict(checkpoint["state_dict"])
    if run.ema is not None and checkpoint.get("state_dict_ema") is not None:
        run.ema.module.load_state_dict(checkpoint["state_dict_ema"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    if run.step.scaler is not None and checkpoint.get("scaler"):
        run.step.scaler.load_state_dict(checkpoint["scaler"])
    states = checkpoint.get("rng") or []
    if len(states) == run.info.world_size:
        restore_rng(states[run.info.rank], run.mixing.mixer)
    else:
        log(f"warning: the checkpoint was written by {len(states)} processes, this job has "
            f"{run.info.world_size}: random states start afresh (the run continues, not bit for bit)")
    return checkpoint["epoch"] + 1, (checkpoint.get("best_metric", -1.0), checkpoint.get("best_epoch", -1))


def _evaluate_all(run: Run) -> dict:
    val = evaluate(run.model, run.val_loader, run.step)
    ema = evaluate(run.ema.module, run.val_loader, run.step, desc="val ema") if run.ema is not None else None
    return {"val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
            "ema_top1": ema["top1"] if ema else None}


def _end_epoch(run: Run, epoch: int, metrics: dict, best: tuple[float, int], log) -> tuple[float, int]:
    """Checkpoint (last, and best when top-1 improved), metrics row, curves."""
    improved = metrics["val_top1"] > best[0]
    best = (metrics["val_top1"], epoch) if improved else best
    state = _checkpoint_state(run, epoch, metrics, best)
    if run.info.primary:
        # The row first: a kill before the checkpoint is undone by the resume's keep_until.
        MetricsLog(run.output / "metrics.csv").append({"epoch": epoch, **metrics})
        save_checkpoint(state, run.output / "last.pth")
        if improved:
            copy_checkpoint(run.output / "last.pth", run.output / "best.pth")
        plot_curves(run.output / "metrics.csv", run.output / "curves.png")
        log(f"epoch {epoch}: train_loss {metrics['train_loss']:.4f} val_top1 {metrics['val_top1']:.2f} "
            f"val_top5 {metrics['val_top5']:.2f} ({metrics['images_per_s']:.0f} img/s, {metrics['seconds']:.1f} s)"
            + (f" ema_top1 {metrics['ema_top1']:.2f}" if metrics["ema_top1"] is not None else "")
            + (" *best*" if improved else ""))
    return best


def _open_outputs(run: Run, start_epoch: int) -> None:
    run.output.mkdir(parents=True, exist_ok=True)
    save_config(run.args, run.output)
    if start_epoch > 0:
        MetricsLog(run.output / "metrics.csv").keep_until(start_epoch - 1)


def run_training(run: Run, log) -> float:
    """Train from the run's first epoch; returns the best val top-1 (percent)."""
    start_epoch, best = _restore(run, log) if run.checkpoint is not None else (0, (-1.0, -1))
    if run.info.primary:
        _open_outputs(run, start_epoch)
    stop = run.num_epochs
    if run.args.stop_after_epochs is not None:
        stop = min(stop, start_epoch + run.args.stop_after_epochs)
    log(f"training {run.args.model} on {run.args.data} ({run.num_classes} classes), mix {run.mixing.name}, "
        f"{run.info.world_size} process(es) on {run.info.device}, lr {run.lr:.3g}, epochs {start_epoch}..{stop - 1} "
        f"of {run.num_epochs}, output {run.output}")
    num_updates = start_epoch * run.updates_per_epoch
    for epoch in range(start_epoch, stop):
        run.sampler.set_epoch(epoch)
        train, num_updates = train_one_epoch(run.model, run.train_loader, run.mixing.mixer, run.probe,
                                             run.criterion, run.optimizer, run.scheduler, run.step, epoch,
                                             num_updates)
        start = time.perf_counter()
        metrics = _evaluate_all(run)
        run.scheduler.step(epoch + 1, metrics["val_top1"])
        metrics = {"train_loss": train["loss"], "lr": train["lr"], **metrics,
                   "images_per_s": train["images_per_s"], "seconds": train["seconds"] + time.perf_counter() - start}
        best = _end_epoch(run, epoch, metrics, best, log)
    return best[0]


def _eval_only(run: Run, log) -> None:
    """Print val top-1/top-5 of the checkpoint's weights (and of its EMA weights when it has them)."""
    weights = [("", run.checkpoint["state_dict"])]
    if run.checkpoint.get("state_dict_ema") is not None:
        weights.append((" (EMA)", run.checkpoint["state_dict_ema"]))
    for label, state in weights:
        run.module.load_state_dict(state)
        metrics = evaluate(run.model, run.val_loader, run.step)
        log(f"{run.args.resume}{label}: val top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f} "
            f"loss {metrics['loss']:.4f} ({int(metrics['count'])} images)")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point of ``transmix-train``."""
    args = parse_args(argv)
    try:
        info = init_processes(args.device, args.dist_backend)
    except ValueError as error:
        sys.exit(f"transmix-train: error: {error}")
    logger = setup_logging(None, info.primary)
    try:
        run = build_run(args, info, logger.info)
    except ValueError as error:  # a bad configuration: nothing was written
        shutdown(info)
        sys.exit(f"transmix-train: error: {error}")
    run.step.progress = info.primary and sys.stderr.isatty()
    try:
        if args.eval_only:
            _eval_only(run, logger.info)
        else:
            if info.primary:
                run.output.mkdir(parents=True, exist_ok=True)
                logger = setup_logging(run.output / "train.log", True)
                run.step.log = logger.info
            run_training(run, logger.info)
    except NonFiniteLossError as error:
        logger.error(f"transmix-train: {error}")
        sys.exit(1)
    finally:
        if run.probe is not None:
            run.probe.remove()
    shutdown(info)


if __name__ == "__main__":
    main()
