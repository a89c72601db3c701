"""``--mix tokenmix`` with ``--teacher`` / ``--teacher-model``: TokenMix's labels from a teacher's
class activation maps, as the official code (Sense-X/TokenMix) labels its token-mixed batches.

The official code does not run a teacher while training: it reads label maps made offline by
TokenLabeling's ``generate_label.py`` (zihangJiang/TokenLabeling; NFNet-F6 teacher) and turns them
into the own-class map of each crop in ``tokenmix.py``. We run the same steps online on the
batch, each step following one official function:

1. the teacher sees the *unmixed* images (official: the label maps are of the clean image; the
   images are mixed in place afterwards, ``Mixup._mix_batch``), so :class:`TeacherTokenMix` keeps
   a copy of the batch before ``tk.TokenMix`` mixes it;
2. the per-location class scores are the teacher's classifier applied as a 1x1 convolution, bias
   included, to the last feature map of ``forward_features`` (TokenLabeling ``generate_label.py``,
   ``TokenLabelHead``: ``get_classifier()`` copied into a 1x1 ``Conv2d``; token models: prefix
   tokens dropped, the rest reshaped to the square patch grid);
3. only the top-5 classes of each location keep their score, the others are 0 (``generate_label.py``
   stores ``output.topk(5)``; TokenMix ``get_featuremaps`` scatters them into zero maps);
4. the map is resampled to the token grid by ``torchvision.ops.roi_align`` over the whole map
   (TokenMix ``get_label`` / ``get_labelmaps_with_coords`` with ``label_size=14``: the box is the
   crop's coordinates times the map width minus 0.5; our images are the crop, so the box is the
   whole map);
5. the map of each image's own (ground-truth) class is taken (TokenMix ``Mixup.__call__``:
   ``label_map[arange(B), hard_label]``); ``tk.TokenMixState.targets(activation_maps=...)`` then
   normalises it (``/ (sum + 1e-8)``) and labels the batch (the rest of ``Mixup.__call__``).

Ours, not official: the teacher sees the training crop at the run's resolution (official: the
full image at the teacher's, then RoI-aligned to the crop); scores below 0 count as 0 (the maps
are label mass; the official NFNet-F6 top-5 scores are practically never negative); an image
whose own class is nowhere in the top 5 gets a uniform map (its label share is then its area
share; official: 0, which gives negative on-values).

A teacher qualifies when ``get_classifier()`` is a ``Linear`` (or 1x1 ``Conv2d``) and, for a CNN,
its head only averages the feature map before it, so the class maps average to its logits
(resnet*, efficientnet_*, regnet*, densenet*). ConvNeXt (a norm after the pooling), MobileNetV3
(a conv after the pooling) and VGG (an MLP) do not, and are refused with an error naming the flag.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

import transmix_kernels as tk

__all__ = ["ClassActivationMaps", "TeacherLabelledState", "TeacherTokenMix", "teacher_flag"]

#: The top-k classes the official label maps keep per location (``generate_label.py``: ``topk(5)``).
OFFICIAL_TOPK = 5


def teacher_flag(args: argparse.Namespace) -> str:
    """How the user named the teacher: ``--teacher CKPT`` or ``--teacher-model NAME``."""
    if getattr(args, "teacher", None):
        return f"--teacher {args.teacher}"
    return f"--teacher-model {getattr(args, 'teacher_model', None)}"


def _linear_classifier(teacher: nn.Module, flag: str) -> nn.Module:
    """timm's ``get_classifier()`` when it is a Linear or a 1x1 Conv2d, else a ValueError naming ``flag``."""
    classifier = teacher.get_classifier() if hasattr(teacher, "get_classifier") else None
    if isinstance(classifier, nn.Linear):
        return classifier
    if isinstance(classifier, nn.Conv2d) and classifier.kernel_size == (1, 1) and classifier.groups == 1:
        return classifier
    raise ValueError(
        f"{flag}: --mix tokenmix labels with the teacher's class activation maps, which need a linear "
        f"classifier (timm's get_classifier() is {type(classifier).__name__}); use a timm CNN such as "
        "resnet*, efficientnet_* or regnet*, or leave out the teacher for TokenMix's teacher-free rule"
    )


class ClassActivationMaps:
    """A frozen timm teacher's per-location class scores and TokenMix's own-class maps.

    Args:
        teacher: a timm model in eval mode (``forward_features`` + a linear ``get_classifier()``).
        topk: classes kept per location (official 5); None keeps all.
        flag: how the user named the teacher, for errors.
        input_size: (C, H, W) of the run's images: when given, the head is checked at once on two
            seeded random images (errors before anything is written).

    Example::

        cams = ClassActivationMaps(teacher)
        scores = cams.scores(images)                 # (B, K, h, w) float32
        maps = cams(images, target, (4, 4))          # (B, 4, 4) float32, own class, >= 0
    """

    def __init__(self, teacher: nn.Module, *, topk: Optional[int] = OFFICIAL_TOPK, flag: str = "--teacher-model",
                 input_size: Optional[tuple[int, int, int]] = None) -> None:
        self.teacher, self.topk, self.flag = teacher, topk, flag
        self.classifier = _linear_classifier(teacher, flag)
        if input_size is not None:
            self.check(tuple(input_size))

    def _unusable(self, why: str) -> ValueError:
        return ValueError(
            f"{self.flag}: --mix tokenmix labels with the teacher's class activation maps, which need its last "
            f"feature map and a head that only averages it before the linear classifier: {why}; use a timm CNN "
            "such as resnet*, efficientnet_* or regnet*, or leave out the teacher for TokenMix's teacher-free rule"
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w): the last feature map of ``forward_features`` (token models: the patch tokens
        on their square grid, as TokenLabeling's ``TokenLabelHead``)."""
        features = self.teacher.forward_features(images)
        if features.ndim == 3:
            tokens = features[:, int(getattr(self.teacher, "num_prefix_tokens", 0)):]
            side = math.isqrt(tokens.shape[1])
            if side * side != tokens.shape[1]:
                raise self._unusable(f"its {tokens.shape[1]} patch tokens are not a square grid")
            features = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
        channels = self.classifier.weight.shape[1]
        if features.ndim != 4 or features.shape[1] != channels:
            raise self._unusable(f"forward_features gives shape {tuple(features.shape)}, not (B, {channels}, h, w)")
        return features

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) float32: the classifier (weight and bias) as a 1x1 convolution on the feature map."""
        weight, bias = self.classifier.weight, self.classifier.bias
        weight = weight.reshape(weight.shape[0], -1, 1, 1).float()
        return F.conv2d(self.features(images).float(), weight, None if bias is None else bias.float())

    def check(self, input_size: tuple[int, int, int]) -> None:
        """A ValueError naming the flag unless the class maps of this teacher average to its logits."""
        device = self.classifier.weight.device
        images = torch.randn((2, *input_size), generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad():
            tokens = self.teacher.forward_features(images).ndim == 3  # TokenLabeling's rule: no pooling check
            features = self.features(images)
            if tokens:
                return
            try:
                pooled = self.teacher.forward_head(features, pre_logits=True).float()
            except (AttributeError, TypeError, RuntimeError) as error:
                raise self._unusable(f"its forward_head(features, pre_logits=True) fails ({error})") from None
            mean = features.float().mean((2, 3))
            if pooled.shape != mean.shape or not torch.allclose(pooled, mean, rtol=1e-4, atol=1e-5):
                raise self._unusable("its head does more than average the feature map (a norm, a conv or an MLP "
                                     "after the pooling: the class maps would not add up to its prediction)")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, target: torch.Tensor, token_grid: tuple[int, int]) -> torch.Tensor:
        """(B, th, tw) float32 >= 0: each image's own-class map (top-k kept) resampled to the token grid.

        images: (B, C, H, W) float, *unmixed*; target: (B,) int64 on the same device.
        """
        scores = self.scores(images)
        batch, classes, height, width = scores.shape
        own = scores.gather(1, target.view(-1, 1, 1, 1).expand(batch, 1, height, width))
        if self.topk is not None and self.topk < classes:
            kth = scores.topk(self.topk, dim=1).values[:, -1:]
            own = torch.where(own >= kth, own, torch.zeros_like(own))  # official: absent from the top-k -> 0
        own = own.clamp_min(0.0)
        boxes = torch.tensor([[-0.5, -0.5, width - 0.5, height - 0.5]], device=own.device).expand(batch, 4)
        boxes = torch.cat([torch.arange(batch, device=own.device, dtype=own.dtype).view(-1, 1), boxes], 1)
        maps = roi_align(own, boxes, output_size=tuple(token_grid), spatial_scale=1.0, sampling_ratio=-1,
                         aligned=False)[:, 0]
        empty = maps.sum((1, 2)) <= 0
        return torch.where(empty.view(-1, 1, 1), torch.ones_like(maps), maps)


@dataclass
class TeacherLabelledState(tk.TokenMixState):
    """A token-mixed batch's ``tk.TokenMixState`` with the teacher's maps of its unmixed images.

    ``targets(attention)`` / ``lambdas(attention)`` ignore ``attention`` (the trainer's interface):
    the label is the official teacher rule on ``activation_maps`` (B, th, tw).
    """

    activation_maps: Optional[torch.Tensor] = None

    def targets(self, attention=None, *, activation_maps: Optional[torch.Tensor] = None) -> torch.Tensor:
        return super().targets(activation_maps=self.activation_maps if activation_maps is None else activation_maps)

    def lambdas(self, attention=None, *, activation_maps: Optional[torch.Tensor] = None) -> torch.Tensor:
        return super().lambdas(activation_maps=self.activation_maps if activation_maps is None else activation_maps)


class TeacherTokenMix:
    """``tk.TokenMix`` whose token batches are labelled by the teacher's maps of the unmixed images.

    Mixup and unmixed batches keep TokenMix's own state (area targets) and cost no teacher
    forward. ``state_dict`` / ``load_state_dict`` are TokenMix's (the checkpoints capture its draws).
    """

    def __init__(self, tokenmix: tk.TokenMix, maps: ClassActivationMaps) -> None:
        self.tokenmix, self.maps = tokenmix, maps

    def __call__(self, images: torch.Tensor, target: torch.Tensor):
        unmixed = images.detach().clone()  # the mixer writes in place
        images, state = self.tokenmix(images, target)
        if state.mask is None:
            return images, state
        activation_maps = self.maps(unmixed, target, tuple(state.mask.shape[1:]))
        values = {f.name: getattr(state, f.name) for f in fields(state)}
        return images, TeacherLabelledState(**values, activation_maps=activation_maps)

    def state_dict(self) -> dict:
        return self.tokenmix.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.tokenmix.load_state_dict(state)
