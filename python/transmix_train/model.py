"""Models of the trainer: timm's ``create_model`` from the config, and a DeiT teacher from a checkpoint.

Never pretrained (no model hub is assumed): weights come from training or from ``--resume``.
"""

from __future__ import annotations

import argparse
from typing import Any

import timm
import torch
from torch import nn

__all__ = ["build_model", "check_probe_support", "load_teacher", "model_kwargs"]


def model_kwargs(args: argparse.Namespace | dict[str, Any]) -> dict[str, Any]:
    """The ``create_model`` keyword arguments of a config (a namespace or a checkpoint's ``args``)."""
    get = args.get if isinstance(args, dict) else lambda key, default=None: getattr(args, key, default)
    kwargs = {"drop_rate": get("drop", 0.0), "drop_path_rate": get("drop_path", 0.0)}
    kwargs.update(get("model_kwargs", None) or {})
    return kwargs


def _create(name: str, num_classes: int, kwargs: dict[str, Any], flag: str) -> nn.Module:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise ValueError(f"{flag} {name!r}: not a timm model name{hint}")
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as error:  # an unexpected keyword of the model class
        raise ValueError(f"{flag} {name!r} does not accept these --model-kwargs {kwargs}: {error}") from None


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """``timm.create_model(args.model, num_classes=..., drop/drop_path, **args.model_kwargs)``.

    A name timm does not know, or a keyword the model does not take, is a ``ValueError`` naming
    ``--model`` / ``--model-kwargs``.
    """
    return _create(args.model, num_classes, model_kwargs(args), "--model")


def check_probe_support(model: nn.Module, name: str, image_size: int, source: str | int) -> None:
    """Fail early (naming ``--model`` / ``--attn-source``) when TransMix cannot read the attention."""
    import transmix_kernels as tk

    try:
        tk.infer_token_grid(model, image_size)
    except TypeError as error:
        raise ValueError(f"--model {name!r}: TransMix cannot read its attention: {error}") from None
    try:
        probe = tk.ClassAttentionProbe(model, source=source)
    except (TypeError, ValueError) as error:
        raise ValueError(f"--attn-source {source!r} with this model: {error}") from None
    probe.remove()


def load_teacher(path: str, num_classes: int, device: torch.device) -> nn.Module:
    """A frozen teacher in eval mode from a ``transmix-train`` checkpoint (its ``arch`` and ``args``)."""
    from .checkpoint import read_checkpoint

    checkpoint = read_checkpoint(path, "--teacher")
    arch, args = checkpoint.get("arch"), checkpoint.get("args") or {}
    if not arch:
        raise ValueError(f"--teacher {path}: the checkpoint names no 'arch' (expected a transmix-train checkpoint)")
    kwargs = dict(args.get("model_kwargs") or {})
    teacher = _create(arch, num_classes, kwargs, "--teacher arch")
    state = checkpoint.get("state_dict_ema") or checkpoint["state_dict"]
    try:
        teacher.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"--teacher {path}: weights do not fit {arch} with {num_classes} classes: {error}") from None
    teacher.requires_grad_(False)
    return teacher.to(device).eval()
