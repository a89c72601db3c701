"""Command line and YAML configs of ``transmix-train``, in timm's manner.

``--config FILE`` is read first: a YAML mapping whose keys are the flag names with underscores
(``--mixup-switch-prob`` -> ``mixup_switch_prob``). Its values become the parser's defaults, then
the command-line flags win. An unknown key in the file or an unknown flag is an error that names
it. Without ``--config`` the packaged ``demo.yaml`` is used. :func:`save_config` writes the
resolved config (``config.yaml``) to the output folder.

Flag groups (every flag; ``None`` means "automatic", decided in the trainer):

- run: ``--config``, ``--output``, ``--seed``, ``--device``, ``--resume``, ``--eval-only``,
  ``--stop-after-epochs``, ``--limit-train-batches``, ``--limit-val-batches``, ``--log-interval``,
  ``--checkpoint-hist``, ``--recovery-interval``, ``--fidelity-every``, ``--dist-backend``
- data: ``--data`` (digits | shapes | synthetic | PATH with train/ and val/), timm's
  ``create_dataset`` sources: ``--dataset`` (hfds/ | hfids/ | wds/ | tfds/ | torch/ NAME, or a
  folder or tar), ``--data-dir``, ``--train-split``, ``--val-split``, ``--class-map``,
  ``--dataset-download``, ``--train-num-samples`` / ``--val-num-samples``, ``--input-key`` /
  ``--target-key``; ``--img-size``, ``--num-classes`` (synthetic, or data without class names),
  ``--train-size`` / ``--val-size`` (shapes, synthetic),
  ``--val-fraction`` (digits), ``--workers``, ``--batch-size`` (per process), ``--aug-repeats``, ``--total-batch-size``,
  ``--validation-batch-size``
- augmentation (timm ``create_transform``): ``--base-aug`` (random resized crop + flips; off: a
  plain resize), ``--crop-scale``, ``--crop-ratio``, ``--hflip``, ``--vflip``, ``--color-jitter``,
  ``--aa`` (RandAugment string or ``none``), ``--reprob`` / ``--remode`` / ``--recount``
  (random erasing), ``--interpolation``, ``--crop-pct`` (eval), ``--mean`` / ``--std``
- mixing: ``--mix`` (none | mixup | cutmix | transmix | saliencymix | attentive_cutmix | puzzlemix |
  mixpro | tokenmix), ``--attentive-checkpoint``, ``--attentive-topk``, ``--mixpro-mask-size``,
  ``--mixpro-mask-alpha``, ``--mixpro-prob``, ``--mixpro-pal-smoothing``, ``--tokenmix-mask-ratio``,
  ``--tokenmix-min-tokens``, ``--mixup``, ``--cutmix``,
  ``--cutmix-minmax``, ``--mixup-prob``, ``--mixup-switch-prob``, ``--mixup-mode``
  (batch | pair | elem), ``--smoothing``, ``--attn-source`` (last | rollout | block index),
  ``--transmix-ratio`` (weight of the area lam), ``--mixup-off-epoch``, ``--bce-loss``,
  ``--bce-target-thresh``, ``--bce-pos-weight``, ``--bce-sum``
- model: ``--model``, ``--model-kwargs key=value ...``, ``--pretrained``, ``--pretrained-path``,
  ``--initial-checkpoint``, ``--drop-path``, ``--drop``,
  ``--model-ema``, ``--model-ema-decay``, ``--model-ema-warmup``, ``--compile``, ``--compile-backend``,
  ``--channels-last``, ``--amp``, ``--amp-dtype``, ``--grad-checkpointing``
- optimisation: ``--opt``, ``--lr`` (absolute), ``--lr-base`` / ``--lr-base-size`` (DeiT's
  scaling: lr = lr_base * global batch / lr_base_size when ``--lr`` is not given),
  ``--weight-decay``, ``--momentum``, ``--opt-eps``, ``--opt-betas``, ``--layer-decay``,
  ``--fused-opt``, ``--clip-grad``, ``--clip-mode``, ``--grad-accum-steps``
- schedule (timm ``create_scheduler_v2``): ``--sched``, ``--epochs``, ``--warmup-epochs``,
  ``--warmup-lr``, ``--min-lr``, ``--cooldown-epochs``, ``--sched-on-updates``
- distillation (DeiT, hard): ``--teacher`` (checkpoint path) or ``--teacher-model`` with
  ``--teacher-pretrained`` / ``--teacher-path``, ``--distillation-type``,
  ``--distillation-alpha``, ``--distillation-tau``
- tracking (the ``track`` extra): ``--log-tensorboard``, ``--log-wandb``, ``--wandb-project``,
  ``--wandb-tags``, ``--wandb-resume-id``
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import yaml
from timm.utils import ParseKwargs

from .fidelity import fidelity_every
from .mixers import MIXERS
from .model import check_weight_flags
from .tracking import check_tracking

__all__ = [
    "ConfigError",
    "DEFAULT_CONFIG",
    "MIX_CHOICES",
    "attn_source",
    "build_parser",
    "config_dict",
    "default_config_path",
    "load_yaml_config",
    "parse_args",
    "read_config",
    "save_config",
    "validate_config",
]

#: The packaged config used when no ``--config`` is given.
DEFAULT_CONFIG = "demo.yaml"
#: The mixers ``--mix`` can name (the registry of ``transmix_train.mixers``).
MIX_CHOICES = tuple(MIXERS)
# Flags that only exist on the command line (never read from a YAML file).
_CLI_ONLY = ("config",)
# Keys of one invocation, not of the run: a checkpoint's saved config does not carry them over.
_PER_INVOCATION = ("config", "resume", "eval_only", "stop_after_epochs", "output", "wandb_resume_id")


def attn_source(value: str | int) -> str | int:
    """``--attn-source``: "last", "rollout" or an int block index (negative counts from the end)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    if text in ("last", "rollout"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'last', 'rollout' or a block index, got {value!r}") from None


class MergeKwargs(ParseKwargs):
    """``--model-kwargs k=v ...`` on top of the config's mapping (a flag changes only its keys)."""

    def __call__(self, parser, namespace, values, option_string=None):
        merged = dict(getattr(namespace, self.dest, None) or {})
        super().__call__(parser, namespace, values, option_string)
        merged.update(getattr(namespace, self.dest))
        setattr(namespace, self.dest, merged)


def _optional_int(value: str) -> int | None:
    return None if str(value).lower() in ("none", "null", "") else int(value)


def _optional_float(value: str) -> float | None:
    return None if str(value).lower() in ("none", "null", "") else float(value)


def _add_run(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("-c", "--config", default=None, metavar="FILE",
                       help=f"YAML config read first (keys: flag names with underscores); default: the packaged "
                            f"{DEFAULT_CONFIG}")
    group.add_argument("--output", default=None, metavar="DIR",
                       help="output folder (metrics.csv, last.pth, best.pth, config.yaml, train.log, curves.png); "
                            "default output/<time>-<model>")
    group.add_argument("--seed", type=int, default=0, help="seeds model init, data order, augmentation and mixing")
    group.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    group.add_argument("--resume", default=None, metavar="CKPT",
                       help="continue a run exactly from this checkpoint (last.pth), or evaluate it with --eval-only")
    group.add_argument("--eval-only", action="store_true", help="print val top-1/top-5 of --resume and exit")
    group.add_argument("--stop-after-epochs", type=_optional_int, default=None, metavar="N",
                       help="end this invocation after N epochs; the schedule still follows --epochs")
    group.add_argument("--limit-train-batches", type=_optional_int, default=None, metavar="N",
                       help="at most N optimizer micro-batches per epoch (tests, smoke runs)")
    group.add_argument("--limit-val-batches", type=_optional_int, default=None, metavar="N",
                       help="at most N val batches per evaluation")
    group.add_argument("--log-interval", type=int, default=50, help="log a line every N steps")
    group.add_argument("--checkpoint-hist", type=int, default=0, metavar="N",
                       help="also keep the N best epochs as checkpoint-<epoch>.pth (timm's top-N; 0: only last.pth "
                            "and best.pth)")
    group.add_argument("--recovery-interval", type=int, default=0, metavar="N",
                       help="write recovery-<epoch>-<update>.pth every N optimizer updates inside an epoch (the newest "
                            "is kept until the epoch ends); --resume from it continues exactly")
    group.add_argument("--fidelity-every", type=fidelity_every, default=0, metavar="N",
                       help="every N epochs, score the area, attention and TransMix labels of seeded CutMix pairs of "
                            "val images against the true object share (digits, shapes): fidelity.csv and fidelity.png "
                            "in the output folder (0: off; see transmix-fidelity)")
    group.add_argument("--dist-backend", default=None, help="torch.distributed backend (default nccl on GPU, gloo on CPU)")


def _add_data(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", default="digits",
                       help="digits | shapes | synthetic | PATH (short for --data-dir PATH: a folder with train/ "
                            "and val/ class folders, read by timm's create_dataset)")
    group.add_argument("--dataset", default="", metavar="NAME",
                       help="a timm create_dataset source: hfds/NAME, hfids/NAME (Hugging Face, hub name or local "
                            "folder), wds/NAME (WebDataset shards in --data-dir), tfds/NAME, torch/NAME (torchvision: "
                            "mnist, cifar10, image_folder ...); empty: the folder or tar in --data-dir")
    group.add_argument("--data-dir", default=None, metavar="DIR",
                       help="the data's folder (hfds/hfids: the cache folder); overrides --data")
    group.add_argument("--train-split", default="train", metavar="NAME", help="train split (default: train)")
    group.add_argument("--val-split", default="validation", metavar="NAME",
                       help="val split (default: validation; a folder named val/ or valid/ is found too)")
    group.add_argument("--class-map", default="", metavar="FILE",
                       help="class name -> index as timm reads it: a .txt with one class per line (index = line), "
                            "or a .pkl dict; default: classes in sorted order")
    group.add_argument("--dataset-download", action=argparse.BooleanOptionalAction, default=False,
                       help="let torch/ and tfds/ sets download, and prepare hfids/ sets (gives their size)")
    group.add_argument("--train-num-samples", type=_optional_int, default=None, metavar="N",
                       help="images in the train split, for hfids/ wds/ tfds/ sources that do not say")
    group.add_argument("--val-num-samples", type=_optional_int, default=None, metavar="N",
                       help="images in the val split, for hfids/ wds/ tfds/ sources that do not say")
    group.add_argument("--input-key", default=None, metavar="KEY",
                       help="image column/field of hfds/ hfids/ wds/ tfds/ sources (timm's default: image, jpg...)")
    group.add_argument("--target-key", default=None, metavar="KEY",
                       help="label column/field of hfds/ hfids/ wds/ tfds/ sources (timm's default: label, cls)")
    group.add_argument("--img-size", type=_optional_int, default=None,
                       help="input size (default: 32 for digits/shapes, the model's for folders and synthetic)")
    group.add_argument("--num-classes", type=_optional_int, default=None,
                       help="classes of the synthetic set, and of sources that do not name their classes "
                            "(e.g. wds/ without --class-map); others: from the data")
    group.add_argument("--train-size", type=int, default=5000, help="images in the shapes/synthetic train split")
    group.add_argument("--val-size", type=int, default=1000, help="images in the shapes/synthetic val split")
    group.add_argument("--val-fraction", type=float, default=0.2, help="share of digits held out for val")
    group.add_argument("--workers", type=_optional_int, default=None,
                       help="DataLoader workers per process (default: 0 for in-memory sets, 4 for folders)")
    group.add_argument("--batch-size", "-b", type=int, default=128, help="images per process per micro-batch")
    group.add_argument("--aug-repeats", type=int, default=0, metavar="N",
                       help="repeated augmentation: each image N times per epoch, differently augmented (timm's "
                            "RepeatAugSampler; DeiT's default is 3, the TransMix paper turns it off: 0)")
    group.add_argument("--total-batch-size", type=_optional_int, default=None,
                       help="global batch split over the processes (instead of --batch-size; must divide evenly)")
    group.add_argument("--validation-batch-size", type=_optional_int, default=None,
                       help="val batch per process (default: --batch-size)")


def _add_augmentation(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("augmentation (timm create_transform)")
    group.add_argument("--base-aug", action=argparse.BooleanOptionalAction, default=True,
                       help="random resized crop and flips (off: resize only; supplementary Table 3's BaseAug)")
    group.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                       help="random resized crop area range")
    group.add_argument("--crop-ratio", type=float, nargs=2, default=(3 / 4, 4 / 3), metavar=("MIN", "MAX"),
                       help="random resized crop aspect range")
    group.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    group.add_argument("--vflip", type=float, default=0.0, help="vertical flip probability")
    group.add_argument("--color-jitter", type=float, default=0.4, help="colour jitter (unused while RandAugment is on)")
    group.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="RandAugment policy string, or 'none'")
    group.add_argument("--reprob", type=float, default=0.25, help="random erasing probability (0: off)")
    group.add_argument("--remode", default="pixel", help="random erasing fill: pixel, rand or const")
    group.add_argument("--recount", type=int, default=1, help="random erasing regions")
    group.add_argument("--interpolation", default="bicubic", help="resize interpolation (train: 'random' too)")
    group.add_argument("--crop-pct", type=_optional_float, default=None,
                       help="eval centre crop share (default: the model's, 1.0 for images <= 64 px)")
    group.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                       help="normalisation mean (default: the data's, ImageNet's for folders)")
    group.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                       help="normalisation std (default: the data's, ImageNet's for folders)")


def _add_mixing(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mixing")
    group.add_argument("--mix", default="transmix", choices=MIX_CHOICES,
                       help="none; mixup (Mixup only); cutmix (timm's Mixup/CutMix switch, area labels); "
                            "transmix (the same draws, CutMix labels re-weighted by attention); saliencymix, "
                            "attentive_cutmix, puzzlemix (the compared variants in CutMix's place); mixpro "
                            "(MaskMix + progressive attention labels); tokenmix (block token masks, attention "
                            "labels)")
    group.add_argument("--attentive-checkpoint", default=None, metavar="CKPT",
                       help="attentive_cutmix: the frozen CNN (a transmix-train checkpoint of a timm CNN)")
    group.add_argument("--attentive-topk", type=int, default=6, help="attentive_cutmix: cells of 7x7 pasted")
    group.add_argument("--mixpro-mask-size", type=int, default=16, metavar="PIXELS",
                       help="mixpro: MaskMix cell side, a multiple of the patch size dividing the image "
                            "(official DeiT configs: 56 = 4 patches of 14)")
    group.add_argument("--mixpro-mask-alpha", type=float, default=1.0,
                       help="mixpro: Beta alpha of the batch's own-cell ratio")
    group.add_argument("--mixpro-prob", type=float, default=0.5,
                       help="mixpro: probability of a MaskMix batch; the others get timm's Mixup/CutMix "
                            "(area labels)")
    group.add_argument("--mixpro-pal-smoothing", type=float, default=0.0,
                       help="mixpro: label smoothing of the attention-labelled targets (official: 0, hard labels)")
    group.add_argument("--tokenmix-mask-ratio", type=float, default=0.5,
                       help="tokenmix: masked token share before --tokenmix-min-tokens (official 0.5)")
    group.add_argument("--tokenmix-min-tokens", type=int, default=14,
                       help="tokenmix: tokens added to the masked count (official 14, for a 14x14 grid)")
    group.add_argument("--mixup", type=float, default=0.8, help="Mixup beta alpha (0: CutMix only)")
    group.add_argument("--cutmix", type=float, default=1.0, help="CutMix beta alpha")
    group.add_argument("--cutmix-minmax", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                       help="CutMix box size range (overrides --cutmix)")
    group.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixing a batch/element")
    group.add_argument("--mixup-switch-prob", type=float, default=0.5, help="probability of CutMix when both are on")
    group.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"),
                       help="one draw per batch, per pair or per element (as timm)")
    group.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    group.add_argument("--attn-source", type=attn_source, default="last",
                       help="attention TransMix reads: last, rollout, or a block index (supplementary Table 1)")
    group.add_argument("--transmix-ratio", type=float, default=0.5,
                       help="lam = ratio * lam_area + (1 - ratio) * lam_attention (0.5 in the paper)")
    group.add_argument("--mixup-off-epoch", type=int, default=0, metavar="N",
                       help="from epoch N on, no mixing: smoothed one-hot targets (timm; 0: mix every epoch)")
    group.add_argument("--bce-loss", action=argparse.BooleanOptionalAction, default=False,
                       help="timm's BinaryCrossEntropy on the mixed targets instead of soft-target cross-entropy")
    group.add_argument("--bce-target-thresh", type=_optional_float, default=None,
                       help="--bce-loss: targets above this become 1, the others 0 (default: soft targets)")
    group.add_argument("--bce-pos-weight", type=_optional_float, default=None,
                       help="--bce-loss: weight of the positive term (default: 1)")
    group.add_argument("--bce-sum", action=argparse.BooleanOptionalAction, default=False,
                       help="--bce-loss: sum over classes before the batch mean")


def _add_model(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="deit_tiny_patch16_224", help="a timm model name")
    group.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False,
                       help="start from timm's hub weights of --model (cached, or downloaded; offline: "
                            "--pretrained-path); a new head for another class count, position embeddings "
                            "resampled for another --img-size")
    group.add_argument("--pretrained-path", default=None, metavar="FILE",
                       help="start from this weights file, adapted as --pretrained: .safetensors or .pth "
                            "(timm / Hugging Face state dict) or a transmix-train checkpoint")
    group.add_argument("--initial-checkpoint", default=None, metavar="FILE",
                       help="load these weights after creation, unadapted (timm's load_checkpoint: every key fits)")
    group.add_argument("--model-kwargs", nargs="*", default={}, action=MergeKwargs, metavar="KEY=VALUE",
                       help="extra create_model arguments, e.g. img_size=32 patch_size=4 depth=6")
    group.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    group.add_argument("--drop", type=float, default=0.0, help="dropout rate")
    group.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=False,
                       help="keep an EMA of the weights (timm ModelEmaV3) and evaluate it too")
    group.add_argument("--model-ema-decay", type=float, default=0.99996, help="EMA decay")
    group.add_argument("--model-ema-warmup", action=argparse.BooleanOptionalAction, default=False,
                       help="EMA decay warm-up (timm ModelEmaV3 use_warmup)")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="torch.compile the model (TransMix and the probe stay on)")
    group.add_argument("--compile-backend", default="inductor", help="torch.compile backend (e.g. aot_eager)")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="channels_last images and model (default: on for CUDA)")
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                       help="autocast (default: on for CUDA, off on CPU)")
    group.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"),
                       help="autocast dtype (float16 uses a gradient scaler)")
    group.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                       help="recompute activations in backward (timm's set_grad_checkpointing): less memory")


def _add_optimisation(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimisation (timm create_optimizer_v2)")
    group.add_argument("--opt", default="adamw", help="timm optimizer name")
    group.add_argument("--lr", type=_optional_float, default=None,
                       help="absolute learning rate (default: lr_base * global batch / lr_base_size)")
    group.add_argument("--lr-base", type=float, default=5e-4, help="lr for a global batch of --lr-base-size (DeiT)")
    group.add_argument("--lr-base-size", type=int, default=512, help="global batch that --lr-base refers to")
    group.add_argument("--weight-decay", type=float, default=0.05, help="weight decay")
    group.add_argument("--momentum", type=float, default=0.9, help="momentum (SGD-like optimizers)")
    group.add_argument("--opt-eps", type=_optional_float, default=None, help="optimizer epsilon")
    group.add_argument("--opt-betas", type=float, nargs="+", default=None, help="optimizer betas")
    group.add_argument("--layer-decay", type=_optional_float, default=None, help="layer-wise lr decay")
    group.add_argument("--fused-opt", action=argparse.BooleanOptionalAction, default=None,
                       help="torch's fused optimizer kernel (default: on for adam and adamw, CPU or CUDA)")
    group.add_argument("--clip-grad", type=_optional_float, default=None, help="gradient clipping value (off: none)")
    group.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"), help="gradient clipping mode")
    group.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    sched = parser.add_argument_group("schedule (timm create_scheduler_v2)")
    sched.add_argument("--sched", default="cosine", help="timm scheduler name")
    sched.add_argument("--epochs", type=int, default=300, help="epochs of the schedule")
    sched.add_argument("--warmup-epochs", type=int, default=5, help="linear warm-up epochs")
    sched.add_argument("--warmup-lr", type=float, default=1e-6, help="lr at the start of warm-up")
    sched.add_argument("--min-lr", type=float, default=1e-5, help="lr at the end of the cosine")
    sched.add_argument("--cooldown-epochs", type=int, default=0, help="epochs at min lr after the schedule")
    sched.add_argument("--sched-on-updates", action=argparse.BooleanOptionalAction, default=True,
                       help="step the lr every optimizer update (off: once per epoch)")


def _add_distillation(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distillation (DeiT)")
    group.add_argument("--teacher", default=None, metavar="CKPT",
                       help="teacher checkpoint (a transmix-train last.pth/best.pth: its arch and model kwargs): DeiT "
                            "distillation with --distillation-type, or TokenMix's activation-map labels with "
                            "--mix tokenmix")
    group.add_argument("--teacher-model", default=None, metavar="NAME",
                       help="teacher by timm name instead of --teacher (DeiT: regnety_160), with its weights from "
                            "--teacher-pretrained or --teacher-path")
    group.add_argument("--teacher-pretrained", action=argparse.BooleanOptionalAction, default=False,
                       help="--teacher-model's timm hub weights (their classes must be the data's)")
    group.add_argument("--teacher-path", default=None, metavar="FILE",
                       help="--teacher-model's weights: .safetensors or .pth state dict, or a checkpoint; the head "
                            "must predict the data's classes")
    group.add_argument("--distillation-type", default="none", choices=("none", "hard", "soft"),
                       help="DeiT distillation through the distillation token")
    group.add_argument("--distillation-alpha", type=float, default=0.5, help="weight of the distillation loss")
    group.add_argument("--distillation-tau", type=float, default=1.0, help="soft distillation temperature")


def _add_tracking(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tracking (pip install transmix-kernels[track])")
    group.add_argument("--log-tensorboard", action=argparse.BooleanOptionalAction, default=False,
                       help="write each epoch's metrics row as TensorBoard scalars under OUTPUT/tensorboard")
    group.add_argument("--log-wandb", action=argparse.BooleanOptionalAction, default=False,
                       help="log each epoch's metrics row and the config to Weights & Biases (WANDB_MODE=offline "
                            "works without network)")
    group.add_argument("--wandb-project", default=None, help="W&B project (default: W&B's)")
    group.add_argument("--wandb-tags", nargs="*", default=[], metavar="TAG", help="W&B run tags")
    group.add_argument("--wandb-resume-id", default=None, metavar="ID",
                       help="with --resume: continue this W&B run (its id is in train.log)")


class ConfigError(ValueError):
    """A configuration ``transmix-train`` cannot run; the message names the flag or config key."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`ConfigError` instead of printing and exiting, so that reading a
    config (:func:`read_config`) is a function; the command line (:func:`parse_args`) prints it."""

    def error(self, message: str):
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """The full ``transmix-train`` parser (defaults are the DeiT recipe; demo.yaml overrides).

    Its errors raise :class:`ConfigError` (``--help`` still prints and exits).
    """
    parser = _Parser(
        prog="transmix-train",
        usage="%(prog)s [--config FILE] [--FLAG VALUE ...]   (see --help)",
        description="Train a timm vision transformer with the DeiT recipe and TransMix.",
        allow_abbrev=False,
    )
    for add in (_add_run, _add_data, _add_augmentation, _add_mixing, _add_model, _add_optimisation,
                _add_distillation, _add_tracking):
        add(parser)
    return parser


def default_config_path() -> Path:
    """The packaged ``demo.yaml`` (installed as ``transmix_train.configs``)."""
    return Path(str(resources.files("transmix_train.configs").joinpath(DEFAULT_CONFIG)))


def load_yaml_config(path: str | os.PathLike, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a YAML config and check every key is a flag of ``parser`` (error naming the key)."""
    path = Path(path)
    if not path.is_file():
        parser.error(f"--config: no such file: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        parser.error(f"--config {path}: not valid YAML: {error}")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values, got {type(values).__name__}")
    known = {action.dest for action in parser._actions} - set(_CLI_ONLY) - {"help"}
    for key in values:
        if key not in known:
            hint = f" (did you mean '{key.replace('-', '_')}'?)" if key.replace("-", "_") in known else ""
            parser.error(f"--config {path}: unknown key '{key}'{hint}")
    return values


def _coerce(action: argparse.Action, value: Any) -> Any:
    """A YAML value checked and converted as the command line would convert that flag's text."""
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {value!r}")
        return value
    if isinstance(action, ParseKwargs):
        if not isinstance(value, dict):
            raise TypeError(f"expected a mapping of keyword arguments, got {value!r}")
        return dict(value)
    convert = action.type or str
    if action.nargs is None:
        if isinstance(value, (list, dict)) or isinstance(value, bool) and convert is not str:
            raise TypeError(f"expected one value, got {value!r}")
        converted = convert(str(value))
    else:
        items = value if isinstance(value, (list, tuple)) else [value]
        converted = [convert(str(item)) for item in items]
        if isinstance(action.nargs, int) and len(converted) != action.nargs:
            raise ValueError(f"expected {action.nargs} values, got {value!r}")
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"invalid choice {converted!r} (choose from {', '.join(map(str, action.choices))})")
    return converted


def _checkpoint_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The config saved in a checkpoint (``args``), without the keys that describe one invocation."""
    from .checkpoint import read_checkpoint

    try:
        saved = dict(read_checkpoint(path, "--resume").get("args") or {})
    except ValueError as error:
        parser.error(str(error))
    for key in _PER_INVOCATION:
        saved.pop(key, None)
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(saved) - known)
    if unknown:
        parser.error(f"--resume {path}: the checkpoint's config has keys this trainer does not know: {unknown}")
    return saved


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line: :func:`read_config`, with an error printed after the usage line and exit
    status 2, as argparse does. Values are checked by :func:`validate_config`, not here."""
    try:
        return read_config(argv)
    except ConfigError as error:
        argparse.ArgumentParser(prog="transmix-train", usage=build_parser().usage).error(str(error))


def read_config(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``): a config first, then flags win. An unknown flag or
    key, a value of the wrong type, a missing file: :class:`ConfigError` naming it.

    The config is ``--config FILE``; without it, the config saved in the ``--resume`` checkpoint
    (so ``transmix-train --resume out/last.pth`` continues the same run), else the packaged
    ``demo.yaml``. The returned namespace's ``config`` names what was read.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    early = _Parser(add_help=False, allow_abbrev=False)
    early.add_argument("-c", "--config", default=None)
    early.add_argument("--resume", default=None)
    known, _ = early.parse_known_args(argv)
    if known.config is None and known.resume is not None:
        config_source, values = f"{known.resume} (its saved config)", _checkpoint_config(known.resume, parser)
    else:
        config_source = str(known.config or default_config_path())
        values = load_yaml_config(config_source, parser)
    for action in parser._actions:
        if action.dest in values:
            try:
                values[action.dest] = _coerce(action, values[action.dest])
            except (argparse.ArgumentTypeError, TypeError, ValueError) as error:
                parser.error(f"config {config_source}: key '{action.dest}': {error}")
    parser.set_defaults(**values)
    args = parser.parse_args(argv)  # an unknown flag is an error naming it (argparse)
    args.config = config_source
    return args


def config_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved config as plain YAML/pickle-safe values (tuples become lists)."""
    known = {action.dest for action in build_parser()._actions} - {"help"}

    def plain(value):
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)

    return {key: plain(value) for key, value in sorted(vars(args).items()) if key in known}


def save_config(args: argparse.Namespace, output_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config to ``output_dir/name``; ``--config`` of it reproduces the run."""
    values = {k: v for k, v in config_dict(args).items() if k not in _CLI_ONLY}
    path = Path(output_dir) / name
    path.write_text(yaml.safe_dump(values, sort_keys=True))
    return path


def validate_config(args: argparse.Namespace, world_size: int = 1) -> None:
    """The one validation step: every flag value, and every combination of flags, that cannot
    work raises :class:`ConfigError` naming the flag (nothing is read, built or written here).

    ``world_size``: the number of processes, for ``--total-batch-size``. ``args`` is not changed.
    """
    try:
        _validate(args, world_size)
    except ConfigError:
        raise
    except ValueError as error:  # the checks of model.py and tracking.py
        raise ConfigError(str(error)) from None


def _validate(args: argparse.Namespace, world_size: int) -> None:
    batch_size = args.batch_size
    if getattr(args, "total_batch_size", None):
        if args.total_batch_size % world_size:
            raise ConfigError(f"--total-batch-size {args.total_batch_size} is not divisible by the "
                              f"{world_size} processes")
        batch_size = args.total_batch_size // world_size
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    for name in ("epochs", "grad_accum_steps", "log_interval"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("checkpoint_hist", "recovery_interval", "aug_repeats"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.aug_repeats == 1:
        raise ConfigError("--aug-repeats 1 repeats nothing: use 0 (off) or >= 2 (DeiT uses 3)")
    for name in ("stop_after_epochs", "limit_train_batches", "limit_val_batches", "validation_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.mix != "none" and batch_size % 2:
        raise ConfigError(f"--batch-size {batch_size} per process is odd: timm's mixing modes pair image i "
                          f"with image B-1-i and need an even batch (--mix {args.mix})")
    if args.eval_only and not args.resume:
        raise ConfigError("--eval-only needs --resume CKPT (the checkpoint to evaluate)")
    check_weight_flags(args)
    if args.distillation_type != "none" and not (args.teacher or args.teacher_model):
        raise ConfigError(f"--distillation-type {args.distillation_type} needs --teacher CKPT or --teacher-model NAME")
    _check_recipe_switches(args)
    check_tracking(args)


def _check_recipe_switches(args: argparse.Namespace) -> None:
    """``--mixup-off-epoch`` and the ``--bce-*`` options."""
    if args.mixup_off_epoch < 0:
        raise ConfigError(f"--mixup-off-epoch must be >= 0 (0: mix every epoch), got {args.mixup_off_epoch}")
    if not args.bce_loss:
        given = [flag for flag, value in (("--bce-target-thresh", args.bce_target_thresh is not None),
                                          ("--bce-pos-weight", args.bce_pos_weight is not None),
                                          ("--bce-sum", args.bce_sum)) if value]
        if given:
            raise ConfigError(f"{given[0]} sets up the BCE loss: it needs --bce-loss")
        return
    if args.bce_target_thresh is not None and not 0.0 <= args.bce_target_thresh < 1.0:
        raise ConfigError(f"--bce-target-thresh must be in [0, 1) (targets above it become 1), "
                          f"got {args.bce_target_thresh}")
    if args.bce_pos_weight is not None and not (math.isfinite(args.bce_pos_weight) and args.bce_pos_weight > 0):
        raise ConfigError(f"--bce-pos-weight must be a finite number > 0, got {args.bce_pos_weight}")
