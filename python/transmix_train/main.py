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
from functools import partial
from typing import Optional, Sequence

from .build import build_run, Run
from .checkpoint import AtomicCheckpointSaver, capture_rng, CHECKPOINT_VERSION, restore_rng
from .config import config_dict, parse_args, save_config
from .data import describe_data
from .distributed import all_gather_objects, init_processes, shutdown
from .engine import EpochProgress, evaluate, NonFiniteLossError, train_one_epoch
from .fidelity import record_fidelity
from .mixdigest import MixDigest
from .mixers import NoMix
from .outputs import MetricsLog, plot_curves, run_summary, setup_logging
from .tracking import open_trackers

__all__ = ["main", "run_training"]


def _checkpoint_state(run: Run, epoch: int, metric: Optional[float], best: tuple[float, int],
                      num_updates: int) -> dict:
    """timm's layout plus what an exact resume needs (RNG of every rank: all ranks call this; the saver
    adds its ``history``)."""
    rng = all_gather_objects(capture_rng(run.mixing.mixer), run.info)
    state = {
        "epoch": epoch,
        "arch": run.args.model,
        "state_dict": run.module.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "args": config_dict(run.args),
        "version": CHECKPOINT_VERSION,
        "metric": metric,
        "num_updates": num_updates,
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


def _restore(run: Run, saver: AtomicCheckpointSaver, log) -> tuple[int, tuple[float, int], Optional[EpochProgress]]:
    """Load the resume checkpoint into the run.

    Returns (the epoch to train next, (best top-1, its epoch), how far that epoch got: None at an
    epoch boundary, an ``EpochProgress`` from a mid-epoch recovery checkpoint).
    """
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
    saver.resume(checkpoint)
    best = (checkpoint.get("best_metric", -1.0), checkpoint.get("best_epoch", -1))
    progress = checkpoint.get("progress")
    if progress is not None:
        return progress["epoch"], best, EpochProgress(**{k: v for k, v in progress.items() if k != "epoch"})
    return checkpoint["epoch"] + 1, best, None


def _evaluate_all(run: Run) -> dict:
    val = evaluate(run.model, run.val_loader, run.step)
    ema = evaluate(run.ema.module, run.val_loader, run.step, desc="val ema") if run.ema is not None else None
    return {"val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
            "ema_top1": ema["top1"] if ema else None}


def _report_skipped(run: Run, epoch: int, log) -> None:
    """A stream's samples its reader skipped (they cannot be decoded), counted since the last report."""
    for split, loader in (("train", run.train_loader), ("val", run.val_loader)):
        take_skipped = getattr(loader.loader.dataset, "take_skipped", None)  # streams.SourceStream
        count = take_skipped() if take_skipped else 0
        if count:
            log(f"epoch {epoch}: skipped {count} unreadable {split} sample(s) of {loader.loader.dataset.source} "
                "(the reader's warnings above give each error)")


def _save_recovery(run: Run, saver: AtomicCheckpointSaver, best: tuple[float, int], epoch: int, num_updates: int,
                   progress: EpochProgress, log) -> None:
    """``--recovery-interval``: a mid-epoch checkpoint from which ``--resume`` continues exactly."""
    state = _checkpoint_state(run, epoch - 1, None, best, num_updates)
    state["progress"] = {"epoch": epoch, **vars(progress)}
    if run.info.primary:
        path = saver.save_recovery(epoch, num_updates, state=state)  # recovery-<epoch>-<num_updates>.pth, the newest
        log(f"recovery checkpoint {path} (epoch {epoch}, {progress.steps} batches done)")


# Drawing curves.png (matplotlib's import the first time, then a figure) is slow next to a short
# epoch: redrawn every epoch it showed in a profile of a short run. It is redrawn at most every
# CURVES_INTERVAL_S while training (the first time that long after the start) and always at the
# end of the invocation.
CURVES_INTERVAL_S = 300.0


def _plot_now_and_then(output, started: float) -> None:
    curves = output / "curves.png"
    last = max(started, curves.stat().st_mtime if curves.exists() else 0.0)
    if time.time() - last >= CURVES_INTERVAL_S:
        plot_curves(output / "metrics.csv", curves)


def _end_epoch(run: Run, saver: AtomicCheckpointSaver, epoch: int, metrics: dict, best: tuple[float, int],
               num_updates: int, log) -> tuple[float, int]:
    """Checkpoint (last, and best when top-1 improved; the top-N history), metrics row, curves."""
    improved = metrics["val_top1"] > best[0]
    best = (metrics["val_top1"], epoch) if improved else best
    state = _checkpoint_state(run, epoch, metrics["val_top1"], best, num_updates)
    if run.info.primary:
        # The row first: a kill before the checkpoint is undone by the resume's keep_until.
        MetricsLog(run.output / "metrics.csv").append({"epoch": epoch, **metrics})
        # last.pth, best.pth when improved, checkpoint-<epoch>.pth when among the --checkpoint-hist
        # best, the epoch's recovery files removed
        saver.save_checkpoint(epoch, metrics["val_top1"], state=state)
        _plot_now_and_then(run.output, run.started_at)
        log(f"epoch {epoch}: train_loss {metrics['train_loss']:.4f} val_top1 {metrics['val_top1']:.2f} "
            f"val_top5 {metrics['val_top5']:.2f} ({metrics['images_per_s']:.0f} img/s, {metrics['seconds']:.1f} s)"
            + (f" ema_top1 {metrics['ema_top1']:.2f}" if metrics["ema_top1"] is not None else "")
            + (" *best*" if improved else ""))
    return best


def _epoch_mixer(run: Run, epoch: int, log):
    """The mixer of ``epoch``: from ``--mixup-off-epoch N`` on, none (smoothed one-hot targets, as timm's).

    It depends on the epoch alone, so a resume switches at the same epoch; the mixer's own random
    state is left as it was (it is not drawn from while off).
    """
    off = run.args.mixup_off_epoch
    if not off or epoch < off:
        return run.mixing.mixer
    if epoch == off:
        log(f"--mixup-off-epoch {off}: no mixing from epoch {off} on (smoothed one-hot targets)")
    return NoMix(run.num_classes, run.args.smoothing)


def _open_outputs(run: Run, start_epoch: int) -> None:
    run.output.mkdir(parents=True, exist_ok=True)
    save_config(run.args, run.output)
    if start_epoch > 0:
        MetricsLog(run.output / "metrics.csv").keep_until(start_epoch - 1)


def run_training(run: Run, log) -> float:
    """Train from the run's first epoch; returns the best val top-1 (percent)."""
    run.started_at = time.time()
    saver = AtomicCheckpointSaver(run.output, run.args.checkpoint_hist)  # called to write on rank 0 only
    start_epoch, best, progress = _restore(run, saver, log) if run.checkpoint is not None else (0, (-1.0, -1), None)
    if run.info.primary:
        _open_outputs(run, start_epoch)
    run.trackers = open_trackers(run.args, run.output, config_dict(run.args), run.info.primary, start_epoch, log)
    stop = run.num_epochs
    if run.args.stop_after_epochs is not None:
        stop = min(stop, start_epoch + run.args.stop_after_epochs)
    log(f"training {run.args.model} on {describe_data(run.args)} ({run.num_classes} classes), mix {run.mixing.name}, "
        f"{run.info.world_size} process(es) on {run.info.device}, lr {run.lr:.3g}, epochs {start_epoch}..{stop - 1} "
        f"of {run.num_epochs}, output {run.output}"
        + (f", resuming after {progress.steps} batches of epoch {start_epoch}" if progress else ""))
    num_updates = run.checkpoint.get("num_updates", start_epoch * run.updates_per_epoch) if run.checkpoint \
        else 0
    # The first steps' mixing draws, fingerprinted once, in a run that starts from scratch.
    digest = MixDigest(run.output / "mix_digest.json") if run.info.primary and run.checkpoint is None else None
    for epoch in range(start_epoch, stop):
        if epoch == start_epoch:  # later epochs were set (and started) during the previous evaluation
            run.loaders.set_epoch(epoch, skip_batches=progress.steps if progress else 0)
        run.loaders.start_val()
        recovery = partial(_save_recovery, run, saver, best, log=log)  # (epoch, num_updates, progress)
        train, num_updates = train_one_epoch(run.model, run.train_loader, _epoch_mixer(run, epoch, log), run.probe,
                                             run.criterion, run.optimizer, run.scheduler, run.step, epoch,
                                             num_updates, resume_from=progress, recovery=recovery, on_mix=digest)
        if digest is not None:  # written after the first epoch: its steps are the first ones
            digest.write()
            digest = None
        progress = None
        start = time.perf_counter()
        if epoch + 1 < stop:
            run.loaders.set_epoch(epoch + 1)
        metrics = _evaluate_all(run)
        run.scheduler.step(epoch + 1, metrics["val_top1"])
        metrics = {"train_loss": train["loss"], "lr": train["lr"], **metrics,
                   "images_per_s": train["images_per_s"], "seconds": train["seconds"] + time.perf_counter() - start}
        best = _end_epoch(run, saver, epoch, metrics, best, num_updates, log)
        run.trackers.log({"epoch": epoch, **metrics})
        _report_skipped(run, epoch, log)
        record_fidelity(run, epoch, log)  # --fidelity-every N: fidelity.csv / fidelity.png
    run.trackers.close()
    if run.info.primary:
        plot_curves(run.output / "metrics.csv", run.output / "curves.png")
        log(run_summary(run.output, best, time.time() - run.started_at))
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
        run = build_run(args, info, logger.info, progress=info.primary and sys.stderr.isatty())
    except ValueError as error:  # a bad configuration (ConfigError) or unusable data/weights: nothing was written
        shutdown(info)
        sys.exit(f"transmix-train: error: {error}")
    try:
        if args.eval_only:
            _eval_only(run, logger.info)
        else:
            if info.primary:
                run.output.mkdir(parents=True, exist_ok=True)
                logger = setup_logging(run.output / "train.log", True)  # the same logger: run.step.log writes there too
            run_training(run, logger.info)
    except NonFiniteLossError as error:
        logger.error(f"transmix-train: {error}")
        sys.exit(1)
    finally:
        if run.probe is not None:
            run.probe.remove()
        if run.trackers is not None:  # still open only when training stopped on an error
            run.trackers.close(exit_code=1)
    shutdown(info)


if __name__ == "__main__":
    main()
