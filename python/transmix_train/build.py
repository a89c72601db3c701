"""Everything a run needs, built from the config by timm's factories, before anything is written.

A bad configuration raises ``ValueError`` naming the flag here, so the trainer can stop before
it creates the output folder: nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from timm.loss import BinaryCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, NativeScaler, random_seed
from torch import nn

import transmix_kernels as tk

from .checkpoint import read_checkpoint
from .config import validate_config
from .data import create_datasets, data_settings
from .distributed import ProcessInfo
from .engine import DistillationLoss, StepConfig
from .loader import create_loaders
from .mixers import TEACHER_LABELLED, create_mixer, Mixing
from .model import build_model, build_teacher, probe_for

__all__ = ["Run", "base_loss", "build_run", "resolve_output", "rank_seed"]


@dataclass
class Run:
    """The pieces of one invocation (see :func:`build_run`)."""

    args: argparse.Namespace
    info: ProcessInfo
    module: nn.Module  # the eager, unwrapped model (checkpoints, EMA, probe)
    model: nn.Module  # what the step calls: DDP and/or compiled parts around ``module``
    mixing: Mixing
    probe: Optional[tk.ClassAttentionProbe]
    criterion: DistillationLoss
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Optional[ModelEmaV3]
    train_loader: Any
    val_loader: Any
    loaders: Any  # loader.Loaders: set_epoch(epoch, skip_batches) before each epoch
    step: StepConfig
    num_epochs: int
    updates_per_epoch: int
    num_classes: int
    lr: float
    output: Optional[Path]
    checkpoint: Optional[dict]
    started_at: float = 0.0  # wall-clock start of the training (main.run_training sets it)
    trackers: Any = None  # tracking.Trackers, opened by main.run_training once the output folder exists


def rank_seed(seed: int, rank: int) -> int:
    """A per-rank seed for the mixer: each rank draws different boxes, reproducibly."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def base_loss(args: argparse.Namespace, device: torch.device) -> Optional[nn.Module]:
    """``--bce-loss``: timm's BinaryCrossEntropy on the soft targets; None: soft-target cross-entropy."""
    if not args.bce_loss:
        return None
    # smoothing 0: the mixers' targets are dense and already smoothed (timm smooths only sparse ones).
    return BinaryCrossEntropy(smoothing=0.0, target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum,
                              pos_weight=args.bce_pos_weight).to(device)


def _grad_checkpointing(module: nn.Module, args: argparse.Namespace) -> None:
    """``--grad-checkpointing``: timm's ``set_grad_checkpointing`` (the probe skips recomputed forwards)."""
    if not args.grad_checkpointing:
        return
    try:
        module.set_grad_checkpointing(True)
    except (AssertionError, AttributeError, NotImplementedError) as error:
        raise ValueError(f"--grad-checkpointing: --model {args.model} does not support it ({error})") from None


def _check_teacher_use(args: argparse.Namespace, teacher: Optional[nn.Module]) -> None:
    """A teacher serves DeiT's distillation (``--distillation-type``), the labels of a
    :data:`~transmix_train.mixers.TEACHER_LABELLED` mixer (``--mix tokenmix``: its class maps), or
    both; one that would serve neither is an error rather than a silent extra load."""
    if teacher is None or args.distillation_type != "none" or args.mix in TEACHER_LABELLED:
        return
    flag = "--teacher" if getattr(args, "teacher", None) else "--teacher-model"
    raise ValueError(f"{flag}: the teacher would be unused: give --distillation-type hard|soft (DeiT distillation) "
                     f"or a mixer that labels with it (--mix {' | '.join(TEACHER_LABELLED)}), or leave it out")


def resolve_output(args: argparse.Namespace) -> Optional[Path]:
    """The output folder (None for --eval-only), checked writable without creating it."""
    if args.eval_only:
        return None
    if args.output:
        output = Path(args.output)
    elif args.resume:
        output = Path(args.resume).resolve().parent  # continue where the checkpoint lives
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        output = Path("output") / f"{stamp}-{args.model}"
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output}: exists and is not a folder")
    if output.is_dir() and (output / "last.pth").exists() and not args.resume:
        raise ValueError(f"--output {output} already holds a run (last.pth): continue it with --resume "
                         f"{output / 'last.pth'}, or choose another --output")
    existing = output
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--output {output}: {existing} is a file, not a folder")
    try:  # a real probe: permissions alone do not tell (root, read-only mounts, /proc)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(f"--output {output}: cannot write in {existing} ({error.strerror})") from None
    return output


def _autocast(args: argparse.Namespace, device: torch.device):
    enabled = args.amp if args.amp is not None else device.type == "cuda"
    dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16
    scaler = NativeScaler(device.type) if enabled and dtype == torch.float16 else None
    return (partial(torch.autocast, device.type, dtype=dtype) if enabled else nullcontext), scaler


def attach_probe(module: nn.Module, args: argparse.Namespace, uses_attention: bool, image_size: int,
                 log) -> tuple[nn.Module, Any]:
    """(the model to call, the probe or None); ``--compile`` compiles what the probe allows."""
    if not uses_attention:
        return (torch.compile(module, backend=args.compile_backend) if args.compile else module), None
    return probe_for(module, args.attn_source, name=args.model, image_size=image_size, compile=args.compile,
                     backend=args.compile_backend, log=log)


#: ``--opt`` names whose torch optimizer is fused unless ``--no-fused-opt``.
FUSED_BY_DEFAULT = ("adam", "adamw")


def _optimizer(args: argparse.Namespace, module: nn.Module, info: ProcessInfo):
    global_batch = args.batch_size * info.world_size * args.grad_accum_steps
    lr = args.lr if args.lr is not None else args.lr_base * global_batch / args.lr_base_size
    # torch's fused Adam/AdamW kernels run on CUDA and on the CPU (one kernel instead of a Python
    # loop over the parameters); timm's other optimizers take no such argument.
    fused = args.fused_opt if args.fused_opt is not None else args.opt.lower() in FUSED_BY_DEFAULT
    cfg = argparse.Namespace(**{**vars(args), "lr": lr, "opt_args": {"fused": True} if fused else None})
    try:
        return create_optimizer_v2(module, **optimizer_kwargs(cfg=cfg)), lr
    except (ValueError, AssertionError, TypeError) as error:
        raise ValueError(f"--opt {args.opt!r}: {error}") from None


def _scheduler(args: argparse.Namespace, optimizer, updates_per_epoch: int):
    try:
        return create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=updates_per_epoch)
    except (ValueError, AssertionError) as error:
        raise ValueError(f"--sched {args.sched!r}: {error}") from None


def build_run(args: argparse.Namespace, info: ProcessInfo, log, progress: bool = False) -> Run:
    """Data, model, mixer, probe, optimizer, schedule, EMA and loaders; the resume checkpoint read.

    The flags are validated first (:func:`~transmix_train.config.validate_config`); ``progress``:
    tqdm bars instead of log lines during epochs.
    """
    validate_config(args, info.world_size)
    if args.total_batch_size:
        args.batch_size = args.total_batch_size // info.world_size
    output = resolve_output(args)
    checkpoint = read_checkpoint(args.resume) if args.resume else None
    if checkpoint is not None and checkpoint.get("arch") not in (None, args.model):
        raise ValueError(f"--resume {args.resume}: the checkpoint is a {checkpoint['arch']}, not --model {args.model}")
    train_set, val_set, num_classes = create_datasets(args)
    random_seed(args.seed, 0)  # the same initial weights on every rank
    module = build_model(args, num_classes, weights=checkpoint is None)  # a resume brings its own weights
    _grad_checkpointing(module, args)
    settings = data_settings(args, train_set, module)
    teacher = build_teacher(args, num_classes, info.device, settings.input_size[-1])
    _check_teacher_use(args, teacher)
    mixing = create_mixer(args, num_classes, module, rank_seed(args.seed, info.rank), teacher=teacher,
                          input_size=tuple(settings.input_size))
    if teacher is not None and args.distillation_type != "none":
        if not hasattr(module, "set_distilled_training"):
            raise ValueError(f"--teacher with --model {args.model}: distillation needs a distilled model "
                             "(a deit_*_distilled_* name, with a distillation token)")
        module.set_distilled_training(True)
    random_seed(args.seed, info.rank)  # augmentation, drop path: different per rank
    autocast, scaler = _autocast(args, info.device)
    channels_last = args.channels_last if args.channels_last is not None else info.device.type == "cuda"
    module.to(info.device)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    optimizer, lr = _optimizer(args, module, info)
    loaders = create_loaders(args, train_set, val_set, settings, rank=info.rank, world_size=info.world_size,
                             device=info.device)
    train_loader, val_loader = loaders.train, loaders.val
    steps = min(len(train_loader), args.limit_train_batches or len(train_loader))
    if steps < 1:
        raise ValueError(f"--batch-size {args.batch_size}: larger than this process's share of the "
                         f"{len(train_set)} training images (no full batch per epoch)")
    updates_per_epoch = math.ceil(steps / args.grad_accum_steps)
    scheduler, num_epochs = _scheduler(args, optimizer, updates_per_epoch)
    ema = ModelEmaV3(module, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) if args.model_ema else None
    # The probe after the EMA copy (a deep copy would carry its hooks); nothing is written yet.
    model, probe = attach_probe(module, args, mixing.uses_attention, settings.input_size[-1], log)
    if info.distributed:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    step = StepConfig(
        device=info.device, autocast=autocast, channels_last=channels_last, grad_accum_steps=args.grad_accum_steps,
        clip_grad=args.clip_grad, clip_mode=args.clip_mode, scaler=scaler,
        ema_update=(lambda n: ema.update(module, step=n)) if ema is not None else None,
        limit_train_batches=args.limit_train_batches, limit_val_batches=args.limit_val_batches,
        log_interval=args.log_interval, log=log, progress=progress, distributed=info.distributed, world_size=info.world_size,
        random_erasing=loaders.random_erasing, recovery_interval=args.recovery_interval,
    )
    criterion = DistillationLoss(teacher, args.distillation_type, args.distillation_alpha, args.distillation_tau,
                                 base=base_loss(args, info.device))
    return Run(
        args=args, info=info, module=module, model=model, mixing=mixing, probe=probe, criterion=criterion,
        optimizer=optimizer, scheduler=scheduler, ema=ema, train_loader=train_loader, val_loader=val_loader,
        loaders=loaders, step=step, num_epochs=num_epochs, updates_per_epoch=updates_per_epoch,
        num_classes=num_classes, lr=lr, output=output, checkpoint=checkpoint,
    )
