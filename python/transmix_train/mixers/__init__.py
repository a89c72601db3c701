"""``--mix``: the one place where a batch mixer is chosen.

Every mixer has TransMix's interface::

    images, state = mixer(images, target)      # images (B, C, H, W) mixed in place, target (B,) int64
    targets = state.targets(probe)             # (B, K) float32 soft targets; probe may be None

and ``uses_attention`` says whether the training step should attach a ``ClassAttentionProbe``.
A new mixer is one function added to :data:`MIXERS`. The compared variants (saliencymix,
attentive_cutmix, puzzlemix) live in ``saliency.py``, ``attentive.py`` and ``puzzle.py`` beside
this file, on the shared pair-mixing state of ``base.py``; mixpro and tokenmix are ``tk.MixPro``
(its logits hook in ``pal.py``) and ``tk.TokenMix`` (teacher-free: attention labels; with a
teacher, ``--teacher`` / ``--teacher-model``, the official rule on its class activation maps, in
``teacher.py``). :data:`TEACHER_LABELLED` names the mixers that use a teacher for their labels.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from timm.data.mixup import one_hot

import transmix_kernels as tk

__all__ = ["ARGUMENT_FLAGS", "MIXERS", "Mixing", "NoMix", "TEACHER_LABELLED", "create_mixer"]


@dataclass
class Mixing:
    """A mixer and whether its targets read the model's attention."""

    mixer: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, object]]
    uses_attention: bool
    name: str


class _SmoothedLabels:
    """State of an unmixed batch: label-smoothed one-hot targets (the attention is not used)."""

    def __init__(self, target: torch.Tensor, num_classes: int, smoothing: float) -> None:
        self.target, self.num_classes, self.smoothing = target, num_classes, smoothing

    def targets(self, attention=None) -> torch.Tensor:
        off = self.smoothing / self.num_classes
        return one_hot(self.target, self.num_classes, on_value=1.0 - self.smoothing + off, off_value=off)


class NoMix:
    """``--mix none``: images untouched, smoothed one-hot targets (timm's loss path unchanged)."""

    def __init__(self, num_classes: int, smoothing: float) -> None:
        self.num_classes, self.smoothing = num_classes, smoothing

    def __call__(self, images: torch.Tensor, target: torch.Tensor):
        return images, _SmoothedLabels(target, self.num_classes, self.smoothing)


def _transmix(args: argparse.Namespace, num_classes: int, model: torch.nn.Module, seed: int,
              mixup_alpha: float, cutmix_alpha: float) -> tk.TransMix:
    return tk.TransMix(
        num_classes, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
        cutmix_minmax=tuple(args.cutmix_minmax) if args.cutmix_minmax else None,
        prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
        label_smoothing=args.smoothing, ratio=args.transmix_ratio, model=model, seed=seed,
    )


def _none(args, num_classes, model, seed) -> Mixing:
    return Mixing(NoMix(num_classes, args.smoothing), uses_attention=False, name="none")


def _mixup(args, num_classes, model, seed) -> Mixing:
    if args.mixup <= 0:
        raise ValueError("--mix mixup needs --mixup > 0")
    return Mixing(_transmix(args, num_classes, model, seed, args.mixup, 0.0), uses_attention=False, name="mixup")


def _cutmix(args, num_classes, model, seed) -> Mixing:
    # timm's Mixup with both alphas as configured (Table 3's "+CutMix" row keeps Mixup).
    return Mixing(_transmix(args, num_classes, model, seed, args.mixup, args.cutmix), uses_attention=False,
                  name="cutmix")


def _transmix_mixing(args, num_classes, model, seed) -> Mixing:
    # The same draws as cutmix; CutMix batches are relabelled by the attention (mix.targets(probe)).
    return Mixing(_transmix(args, num_classes, model, seed, args.mixup, args.cutmix), uses_attention=True,
                  name="transmix")


def _switched(args, seed) -> dict:
    """The Mixup/method switch of the compared variants (one draw per batch, as mode batch)."""
    if args.mixup_mode != "batch" or args.cutmix_minmax:
        raise ValueError(f"--mix {args.mix}: draws one lam per batch; needs --mixup-mode batch and no --cutmix-minmax")
    return dict(mixup_alpha=args.mixup, switch_prob=args.mixup_switch_prob, prob=args.mixup_prob,
                label_smoothing=args.smoothing, seed=seed)


def _saliencymix(args, num_classes, model, seed) -> Mixing:
    from .saliency import SaliencyMix

    try:
        mixer = SaliencyMix(num_classes, alpha=args.cutmix, **_switched(args, seed))
    except ImportError as error:
        raise ValueError(f"--mix saliencymix: {error}") from None
    return Mixing(mixer, uses_attention=False, name="saliencymix")


def _attentive_cutmix(args, num_classes, model, seed) -> Mixing:
    from .attentive import AttentiveCutMix, load_cell_scorer

    if not args.attentive_checkpoint:
        raise ValueError("--mix attentive_cutmix needs --attentive-checkpoint CKPT: a transmix-train checkpoint of a "
                         "timm CNN (e.g. --model resnet18 --mix none); transmix-experiment trains one when none is given")
    scorer = load_cell_scorer(args.attentive_checkpoint, num_classes)
    mixer = AttentiveCutMix(num_classes, scorer, topk=args.attentive_topk, **_switched(args, seed))
    return Mixing(mixer, uses_attention=False, name="attentive_cutmix")


def _puzzlemix(args, num_classes, model, seed) -> Mixing:
    from .puzzle import PuzzleMix

    return Mixing(PuzzleMix(num_classes, model, alpha=args.cutmix, **_switched(args, seed)), uses_attention=False,
                  name="puzzlemix")


def _mixpro(args, num_classes, model, seed) -> Mixing:
    from .pal import LogitsMixPro

    mixpro = tk.MixPro(
        num_classes, mask_size=args.mixpro_mask_size, mask_alpha=args.mixpro_mask_alpha,
        maskmix_prob=args.mixpro_prob, pal_smoothing=args.mixpro_pal_smoothing, mixup_alpha=args.mixup,
        cutmix_alpha=args.cutmix, cutmix_minmax=tuple(args.cutmix_minmax) if args.cutmix_minmax else None,
        prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
        label_smoothing=args.smoothing, model=model, seed=seed,
    )
    # PAL reads the attention (the probe) and the logits of the same forward (kept by a hook).
    return Mixing(LogitsMixPro(mixpro, model), uses_attention=True, name="mixpro")


def _tokenmix(args, num_classes, model, seed) -> Mixing:
    # Teacher-free: the token mask's label by the student's attention (TransMix's rule, --transmix-ratio);
    # with a teacher, create_mixer wraps it in the official teacher label (TEACHER_LABELLED).
    mixer = tk.TokenMix(
        num_classes, mixup_alpha=args.mixup, switch_prob=args.mixup_switch_prob, prob=args.mixup_prob,
        mask_ratio=args.tokenmix_mask_ratio, min_tokens=args.tokenmix_min_tokens, label_smoothing=args.smoothing,
        ratio=args.transmix_ratio, model=model, seed=seed,
    )
    return Mixing(mixer, uses_attention=True, name="tokenmix")


def _teacher_tokenmix(mixing: Mixing, args: argparse.Namespace, teacher: torch.nn.Module,
                      input_size: Optional[tuple[int, int, int]]) -> Mixing:
    # The official label: the teacher's class maps of the unmixed images; the student's attention is not read.
    from .teacher import ClassActivationMaps, TeacherTokenMix, teacher_flag

    maps = ClassActivationMaps(teacher, flag=teacher_flag(args), input_size=input_size)
    return Mixing(TeacherTokenMix(mixing.mixer, maps), uses_attention=False, name=mixing.name)


#: --mix name -> how a teacher (--teacher / --teacher-model) labels its batches, without distillation too.
TEACHER_LABELLED: dict[str, Callable[..., Mixing]] = {"tokenmix": _teacher_tokenmix}


#: The flag behind each mixer argument: the mixers' checks name their argument first ("prob must
#: be ..."), and a trainer error names the flag the user typed.
ARGUMENT_FLAGS: dict[str, str] = {
    "mixup_alpha": "--mixup",
    "cutmix_alpha": "--cutmix",
    "alpha": "--cutmix",  # the compared variants' own Beta alpha takes CutMix's place
    "cutmix_minmax": "--cutmix-minmax",
    "prob": "--mixup-prob",
    "switch_prob": "--mixup-switch-prob",
    "mode": "--mixup-mode",
    "label_smoothing": "--smoothing",
    "ratio": "--transmix-ratio",
    "topk": "--attentive-topk",
    "mask_size": "--mixpro-mask-size",
    "mask_alpha": "--mixpro-mask-alpha",
    "maskmix_prob": "--mixpro-prob",
    "pal_smoothing": "--mixpro-pal-smoothing",
    "mask_ratio": "--tokenmix-mask-ratio",
    "min_tokens": "--tokenmix-min-tokens",
}


def _flag_error(mix: str, error: Exception) -> ValueError:
    """``error`` of a mixer's check as a ValueError that starts with the flag it is about."""
    message = str(error)
    if message.startswith("--"):  # a factory's own error already names its flag
        return ValueError(message)
    argument = message.split(" ", 1)[0].split("[", 1)[0]
    return ValueError(f"{ARGUMENT_FLAGS.get(argument, f'--mix {mix}')}: {message}")


#: name -> factory(args, num_classes, model, seed) -> Mixing
MIXERS: dict[str, Callable[..., Mixing]] = {
    "none": _none,
    "mixup": _mixup,
    "cutmix": _cutmix,
    "transmix": _transmix_mixing,
    "saliencymix": _saliencymix,
    "attentive_cutmix": _attentive_cutmix,
    "puzzlemix": _puzzlemix,
    "mixpro": _mixpro,
    "tokenmix": _tokenmix,
}


def create_mixer(args: argparse.Namespace, num_classes: int, model: Optional[torch.nn.Module], seed: int,
                 teacher: Optional[torch.nn.Module] = None,
                 input_size: Optional[tuple[int, int, int]] = None) -> Mixing:
    """The ``--mix`` mixer; ``seed`` should differ per rank (each rank draws its own boxes).

    ``teacher``: the run's frozen teacher; a mixer of :data:`TEACHER_LABELLED` labels with it (the
    others ignore it). ``input_size``: (C, H, W) of the run's images, to check the teacher at once.
    Bad mixing hyper-parameters are a ``ValueError`` that starts with the flag (:data:`ARGUMENT_FLAGS`).
    """
    if args.mix not in MIXERS:
        raise ValueError(f"--mix {args.mix!r}: choose one of {', '.join(MIXERS)}")
    try:
        mixing = MIXERS[args.mix](args, num_classes, model, seed)
        if teacher is not None and args.mix in TEACHER_LABELLED:
            mixing = TEACHER_LABELLED[args.mix](mixing, args, teacher, input_size)
        return mixing
    except (ValueError, TypeError) as error:
        raise _flag_error(args.mix, error) from error
