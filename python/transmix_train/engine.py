"""The training step and the evaluation loop (DeiT's ``engine.py``, in this trainer's terms).

One training step, in order: the loader's batch (already on the device and normalised) ->
``mixer(images, labels)`` mixes it in place -> the model runs with the attention probe attached
-> ``mix.targets(probe)`` (TransMix: CutMix labels re-weighted by that forward's attention) ->
soft-target loss -> backward -> (every ``grad_accum_steps``) clip, optimizer step, EMA, lr.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from timm.utils import dispatch_clip_grad, NativeScaler
from torch import nn

__all__ = ["DistillationLoss", "EpochProgress", "NonFiniteLossError", "StepConfig", "evaluate", "train_one_epoch"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (the run stops; the last checkpoint is kept)."""


class DistillationLoss(nn.Module):
    """DeiT's loss: ``(1 - alpha) * base(class head) + alpha * distillation(distillation head)``.

    ``hard``: cross-entropy to the teacher's argmax on the same (mixed) images; ``soft``: the KL
    divergence at temperature ``tau``, summed and divided by the number of logits (batch x classes),
    times ``tau**2``, as DeiT's ``losses.py``. Without a teacher, the soft-target cross-entropy.
    """

    def __init__(self, teacher: Optional[nn.Module] = None, kind: str = "none", alpha: float = 0.5,
                 tau: float = 1.0, base: Optional[nn.Module] = None) -> None:
        super().__init__()
        # base(logits, soft targets (B, K)): timm's SoftTargetCrossEntropy, or BinaryCrossEntropy (--bce-loss).
        self.base = base if base is not None else SoftTargetCrossEntropy()
        self.teacher, self.kind, self.alpha, self.tau = teacher, kind, alpha, tau

    def forward(self, images: torch.Tensor, outputs, targets: torch.Tensor) -> torch.Tensor:
        if self.teacher is None or self.kind == "none":
            if isinstance(outputs, tuple):  # a distilled model trained without teacher: both heads learn the labels
                return sum(self.base(out, targets) for out in outputs) / len(outputs)
            return self.base(outputs, targets)
        logits, logits_dist = outputs
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        if self.kind == "hard":
            distill = F.cross_entropy(logits_dist, teacher_logits.argmax(dim=1))
        else:
            tau = self.tau
            # DeiT's losses.py: the KL summed over batch and classes, divided by their count (B x K).
            distill = F.kl_div(F.log_softmax(logits_dist / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                               reduction="sum", log_target=True) * (tau * tau) / logits_dist.numel()
        return (1 - self.alpha) * self.base(logits, targets) + self.alpha * distill


@dataclass(frozen=True)
class StepConfig:
    """How steps run: built once by ``build_run`` and frozen for the run."""

    device: torch.device
    autocast: Callable[[], ContextManager] = nullcontext
    channels_last: bool = False
    grad_accum_steps: int = 1
    clip_grad: Optional[float] = None
    clip_mode: str = "norm"
    scaler: Optional[NativeScaler] = None  # timm's loss scaler, with float16 autocast only
    ema_update: Optional[Callable[[int], None]] = None  # EMA of the weights after an optimizer step
    limit_train_batches: Optional[int] = None
    limit_val_batches: Optional[int] = None
    log_interval: int = 50
    log: Callable[[str], None] = print
    progress: bool = False
    distributed: bool = False
    world_size: int = 1
    random_erasing: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # timm RandomErasing, on the device
    recovery_interval: int = 0  # write a recovery checkpoint every N optimizer updates (0: never)


@dataclass
class EpochProgress:
    """Where an epoch stands after ``steps`` micro-batches (what a recovery checkpoint carries)."""

    steps: int = 0
    loss_sum: float = 0.0
    images_seen: int = 0
    seconds: float = 0.0


def _reduce_sum(values: list[float], cfg: StepConfig) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=cfg.device)
    if cfg.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def _batches(loader: Iterable, limit: Optional[int]) -> tuple[Iterable, int]:
    total = len(loader)
    if limit is not None:
        total = min(total, limit)
        return itertools.islice(loader, total), total
    return loader, total


def _progress(iterable: Iterable, total: int, cfg: StepConfig, desc: str):
    if not cfg.progress:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int) -> None:
    value = float(loss_sum)
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"the training loss is {value} at epoch {epoch}, step {step}: stopping. The last checkpoint "
            "(last.pth) is from before this epoch; try a lower --lr, --clip-grad, or --no-amp"
        )


def _backward_and_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, cfg: StepConfig,
                       update: bool) -> None:
    """Backward; on the last micro-batch of an update also clip, step and clear the gradients.

    With float16 autocast timm's ``NativeScaler`` scales the loss, unscales before clipping and
    skips steps with non-finite gradients (as timm's ``train.py`` and DeiT's ``engine.py``).
    """
    if cfg.scaler is not None:
        cfg.scaler(loss, optimizer, clip_grad=cfg.clip_grad, clip_mode=cfg.clip_mode,
                   parameters=model.parameters(), need_update=update)
    else:
        loss.backward()
        if update:
            if cfg.clip_grad is not None:
                dispatch_clip_grad(model.parameters(), cfg.clip_grad, mode=cfg.clip_mode)
            optimizer.step()
    if update:
        optimizer.zero_grad(set_to_none=True)


def _group_size(step: int, total: int, accum: int) -> int:
    """Micro-batches in the optimizer update that ``step`` belongs to (the epoch's last may be short)."""
    return min(accum, total - step // accum * accum)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    mixer: Callable,
    probe,
    criterion: DistillationLoss,
    optimizer: torch.optim.Optimizer,
    scheduler,
    cfg: StepConfig,
    epoch: int,
    num_updates: int,
    resume_from: Optional[EpochProgress] = None,
    recovery: Optional[Callable[[int, int, EpochProgress], None]] = None,
    on_mix: Optional[Callable[[int, object], None]] = None,
) -> tuple[dict[str, float], int]:
    """One epoch of training. Returns ({"loss", "lr", "images_per_s", "seconds"}, num_updates).

    ``resume_from``: the epoch continues after ``resume_from.steps`` micro-batches (a recovery
    checkpoint); ``loader`` then yields only the remaining ones. ``recovery(epoch, num_updates,
    progress)`` writes a recovery checkpoint every ``cfg.recovery_interval`` updates.
    ``on_mix(step, state)`` sees each step's mixer state (e.g. :class:`~transmix_train.mixdigest.MixDigest`).
    """
    model.train()
    done = resume_from or EpochProgress()
    batches, remaining = _batches(loader, None if cfg.limit_train_batches is None
                                  else max(cfg.limit_train_batches - done.steps, 0))
    total = done.steps + remaining
    accum = cfg.grad_accum_steps
    loss_sum = torch.tensor(done.loss_sum, dtype=torch.float64, device=cfg.device)
    images_seen, start = done.images_seen, time.perf_counter() - done.seconds
    for step, (images, labels) in enumerate(_progress(batches, remaining, cfg, f"train {epoch}"), start=done.steps):
        if cfg.random_erasing is not None:
            images = cfg.random_erasing(images)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        images, mix = mixer(images, labels)  # mixes in place on the device
        if on_mix is not None:
            on_mix(step, mix)
        last_micro = (step + 1) % accum == 0 or step + 1 == total
        sync = nullcontext() if last_micro or not cfg.distributed else model.no_sync()
        with sync:
            with cfg.autocast():
                outputs = model(images)
                targets = mix.targets(probe)  # TransMix: attention of this very forward
                loss = criterion(images, outputs, targets)
            # As timm's train.py: the mean over the micro-batches of this update, a short last one too.
            _backward_and_step(model, optimizer, loss / _group_size(step, total, accum), cfg, last_micro)
        loss_sum += loss.detach()
        images_seen += images.shape[0]
        if last_micro:
            num_updates += 1
            if cfg.ema_update is not None:
                cfg.ema_update(num_updates)
            scheduler.step_update(num_updates=num_updates)
        if (step + 1) % cfg.log_interval == 0 or step + 1 == total:
            _check_finite(loss_sum, epoch, step)
            if not cfg.progress:
                cfg.log(f"epoch {epoch} step {step + 1}/{total} loss {float(loss_sum) / (step + 1):.4f} "
                        f"lr {optimizer.param_groups[0]['lr']:.3e}")
        if (last_micro and recovery is not None and cfg.recovery_interval
                and num_updates % cfg.recovery_interval == 0 and step + 1 < total):
            _check_finite(loss_sum, epoch, step)
            recovery(epoch, num_updates,
                     EpochProgress(step + 1, float(loss_sum), images_seen, time.perf_counter() - start))
    seconds = time.perf_counter() - start
    loss_total, count, seen = _reduce_sum([float(loss_sum), float(total), float(images_seen)], cfg)
    return {
        "loss": loss_total / max(count, 1),
        "lr": optimizer.param_groups[0]["lr"],
        "images_per_s": seen / seconds if seconds > 0 else float("nan"),
        "seconds": seconds,
    }, num_updates


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, cfg: StepConfig, desc: str = "val") -> dict[str, float]:
    """Val loss (cross-entropy) and top-1/top-5 in percent over all ranks' shards (each image once)."""
    model.eval()
    batches, total = _batches(loader, cfg.limit_val_batches)
    sums = torch.zeros(4, dtype=torch.float64, device=cfg.device)  # loss, top-1, top-5, images
    for images, labels in _progress(batches, total, cfg, desc):
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with cfg.autocast():
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(labels[:, None])
        sums += torch.stack([
            F.cross_entropy(logits, labels, reduction="sum").double(),
            hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
            torch.tensor(float(labels.shape[0]), dtype=torch.float64, device=sums.device),
        ])
    loss, top1, top5, count = _reduce_sum(sums.tolist(), cfg)
    count = max(count, 1.0)
    return {"loss": loss / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "count": count}
