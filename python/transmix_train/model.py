"""Models of the trainer: timm's ``create_model`` from the config, its starting weights, and the DeiT teacher.

Starting weights, with timm ``train.py``'s flags (:func:`build_model` with ``weights=True``):

- none: timm's random initialisation (the default);
- ``--pretrained``: timm's hub weights of ``--model`` (from the local cache when they are there;
  with no network and no cached copy, an immediate error that names the model and
  ``--pretrained-path``);
- ``--pretrained-path FILE``: a local weights file loaded as if it were the pretrained weights: a
  timm / Hugging Face ``.safetensors`` or ``.pth`` state dict, or a ``transmix-train`` checkpoint
  (its EMA weights when it has them, as timm's ``load_state_dict`` prefers).

Both adapt the weights to the model as timm does when it fine-tunes: the model's own checkpoint
filter (``pretrained_filter_fn``) resamples position embeddings for another ``--img-size`` or patch
grid, and a new head is made when the class count differs. Every other key must fit.
``--initial-checkpoint FILE`` is then loaded as is (timm's ``load_checkpoint``: all keys, head
included). A ``--resume`` brings its own weights, so none of these is read when resuming.

The teacher of DeiT's distillation is a ``transmix-train`` checkpoint (``--teacher``) or a timm
name (``--teacher-model``) with hub weights (``--teacher-pretrained``) or a file
(``--teacher-path``); its head must already predict the data's classes.
"""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import timm
import torch
from timm.models import get_pretrained_cfg, load_checkpoint, load_state_dict
from torch import nn

__all__ = [
    "WeightSource",
    "build_model",
    "build_teacher",
    "probe_for",
    "check_weight_flags",
    "load_from_checkpoint",
    "load_teacher",
    "model_kwargs",
    "read_weights",
]

# How long --pretrained waits for the hub's host before calling the machine offline: huggingface_hub
# itself retries a failing request for about 45 s per file.
HUB_CONNECT_TIMEOUT_S = 3.0
# Errors a weights file or timm's adaptation of it can raise (a TypeError is a --model-kwargs error).
_LOAD_ERRORS = (RuntimeError, KeyError, ValueError, AssertionError, OSError, EOFError, IndexError)


@dataclass(frozen=True)
class WeightSource:
    """Where a model's starting weights come from: a local ``path`` or (``path`` None) timm's hub.

    ``flag`` names the source in errors (``--pretrained-path``, ``--teacher-pretrained`` ...);
    ``new_head``: a class count other than the weights' gets a new head (fine-tuning) instead of
    an error (a teacher).
    """

    flag: str
    path: Optional[str] = None
    new_head: bool = True
    offline_hint: str = "--pretrained-path FILE"


def model_kwargs(args: argparse.Namespace | dict[str, Any]) -> dict[str, Any]:
    """The ``create_model`` keyword arguments of a config (a namespace or a checkpoint's ``args``)."""
    get = args.get if isinstance(args, dict) else lambda key, default=None: getattr(args, key, default)
    kwargs = {"drop_rate": get("drop", 0.0), "drop_path_rate": get("drop_path", 0.0)}
    kwargs.update(get("model_kwargs", None) or {})
    return kwargs


def _check_name(name: str, flag: str) -> None:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise ValueError(f"{flag} {name!r}: not a timm model name{hint}")


def _first_line(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def read_weights(path: str | os.PathLike, flag: str) -> dict[str, torch.Tensor]:
    """The state dict of a weights file (timm's ``load_state_dict``), or a ``ValueError`` naming ``flag``.

    ``.safetensors`` or a ``torch.save`` file (``weights_only``): a bare state dict, or a training
    checkpoint with ``state_dict_ema`` / ``state_dict`` / ``model`` (timm, DeiT, ``transmix-train``).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file")
    try:
        state = load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as error:  # safetensors, pickle and zip readers raise many types for a foreign file
        raise ValueError(f"{flag} {path}: not a readable weights file (.safetensors or .pth): "
                         f"{type(error).__name__}: {_first_line(error)}") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{flag} {path}: holds no state dict of tensors (expected model weights, or a checkpoint "
                         "with 'state_dict')")
    return state


def _classifiers(name: str) -> tuple[str, ...]:
    """The head modules of ``name`` (timm's pretrained config, e.g. ``head`` and ``head_dist``)."""
    cfg = get_pretrained_cfg(name)
    names = (cfg.classifier if cfg else None) or "head"
    return (names,) if isinstance(names, str) else tuple(names)


def _head_classes(state: dict[str, torch.Tensor], classifiers: tuple[str, ...]) -> int:
    """Classes of the weights' head (0 when they have none: a feature backbone)."""
    for classifier in classifiers:
        weight = state.get(f"{classifier}.weight")
        if weight is not None and weight.dim() >= 1:
            return int(weight.shape[0])
    return 0


def _offline_reason(cfg) -> Optional[str]:
    """Why the hub cannot be used now (None: try it). Fast: an env check, then one short connect."""
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # read now: huggingface_hub reads it at import
        if os.environ.get(variable, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{variable}={os.environ[variable]}"
    url = cfg.url
    if cfg.hf_hub_id:
        from huggingface_hub import constants

        if constants.is_offline_mode():
            return "huggingface_hub is in offline mode"
        url = constants.ENDPOINT
    host = urlparse(url or "").hostname
    if not host:
        return "no download address"
    try:
        socket.create_connection((host, 443), timeout=HUB_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        return f"{host} unreachable: {_first_line(error, 120)}"
    return None


def _cached_hub_file(cfg) -> Optional[str]:
    """The hub weights of ``cfg`` when a previous download left them in a local cache."""
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in ([cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]):
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    if cfg.url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if candidate.is_file():
            return str(candidate)
    return None


def _hub_overlay(name: str, source: WeightSource) -> tuple[dict[str, Any], int]:
    """``pretrained_cfg_overlay`` and head classes for timm's hub weights of ``name``.

    A cached copy is loaded as a file (no request at all); otherwise timm downloads, unless the
    machine is offline, which is an immediate ``ValueError`` instead of huggingface_hub's retries.
    """
    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ValueError(f"{source.flag}: timm has no pretrained weights for {name!r}; pass a weights file with "
                         f"{source.offline_hint}")
    cached = cfg.file or _cached_hub_file(cfg)
    if cached:
        return {"file": cached}, cfg.num_classes
    reason = _offline_reason(cfg)
    if reason is not None:
        where = cfg.hf_hub_id or cfg.url
        raise ValueError(f"{source.flag}: the pretrained weights of {name!r} ({where}) are not in the local cache and "
                         f"cannot be downloaded ({reason}). Offline, download them on a machine with a network "
                         f"(timm.create_model({name!r}, pretrained=True) fills the Hugging Face cache, or save the "
                         f"model's state_dict) and pass the file with {source.offline_hint}")
    return {}, cfg.num_classes


def _file_classes(name: str, source: WeightSource) -> int:
    """Classes of a local weights file's head (0: it has none), after checking the file reads."""
    return _head_classes(read_weights(source.path, source.flag), _classifiers(name))


def _create(name: str, num_classes: int, kwargs: dict[str, Any], flag: str,
            source: Optional[WeightSource] = None) -> nn.Module:
    _check_name(name, flag)
    overlay, create_classes = {}, num_classes
    if source is not None and source.path:
        weight_classes = _file_classes(name, source)
        if source.new_head:
            # Created with the file's own head, timm loads strictly (every key must fit); a
            # differing class count gets its new head afterwards.
            create_classes = weight_classes
        elif weight_classes and weight_classes != num_classes:
            raise ValueError(f"{source.flag} {source.path}: the weights of {name!r} predict {weight_classes} classes, "
                             f"the data has {num_classes}: a teacher must already predict the data's classes")
        overlay = {"file": str(source.path), "num_classes": create_classes}
    elif source is not None:
        overlay, weight_classes = _hub_overlay(name, source)  # timm drops a head that does not fit, as train.py
        if weight_classes != num_classes and not source.new_head:
            raise ValueError(f"{source.flag}: the hub weights of {name!r} predict {weight_classes} classes, the data "
                             f"has {num_classes}: a teacher must already predict the data's classes")
    try:
        model = timm.create_model(name, pretrained=source is not None, num_classes=create_classes,
                                  pretrained_cfg_overlay=overlay or None, **kwargs)
    except TypeError as error:  # an unexpected keyword of the model class
        raise ValueError(f"{flag} {name!r} does not accept these --model-kwargs {kwargs}: {error}") from None
    except _LOAD_ERRORS as error:
        if source is None:
            raise
        if source.path:
            raise ValueError(f"{source.flag} {source.path}: the weights do not fit {flag} {name!r} with {kwargs}: "
                             f"{_first_line(error)}") from None
        raise ValueError(f"{source.flag}: timm's hub weights of {name!r} could not be loaded (with {kwargs}): "
                         f"{type(error).__name__}: {_first_line(error)}; a local file works with "
                         f"{source.offline_hint}") from None
    if create_classes != num_classes:
        model.reset_classifier(num_classes)  # timm's fine-tuning API: a new, freshly initialised head
    return model


def _initial_checkpoint(model: nn.Module, path: str, name: str) -> None:
    """``--initial-checkpoint``: timm's ``load_checkpoint`` after creation; every key must fit."""
    if not Path(path).is_file():
        raise ValueError(f"--initial-checkpoint {path}: no such file")
    try:
        load_checkpoint(model, path, use_ema=True, strict=True, weights_only=True)
    except Exception as error:  # unreadable file or keys that do not fit
        raise ValueError(f"--initial-checkpoint {path}: cannot be loaded into --model {name!r} (all keys, head "
                         f"included, must fit; --pretrained-path adapts weights instead): "
                         f"{type(error).__name__}: {_first_line(error)}") from None


def check_weight_flags(args: argparse.Namespace) -> None:
    """Weight and teacher flags that contradict each other, named (before anything is read)."""
    get = lambda key: getattr(args, key, None)  # noqa: E731  (older configs lack the newer keys)
    if get("teacher") and get("teacher_model"):
        raise ValueError("--teacher-model: give either --teacher CKPT (a transmix-train checkpoint) or "
                         "--teacher-model NAME with its weights, not both")
    if get("teacher_model"):
        if bool(get("teacher_pretrained")) == bool(get("teacher_path")):
            raise ValueError(f"--teacher-model {get('teacher_model')}: needs its weights from exactly one of "
                             "--teacher-pretrained (timm's hub) or --teacher-path FILE")
    else:
        for key in ("teacher_pretrained", "teacher_path"):
            if get(key):
                raise ValueError(f"--{key.replace('_', '-')} gives the weights of --teacher-model NAME, which is "
                                 "not set")


def build_model(args: argparse.Namespace, num_classes: int, weights: bool = False) -> nn.Module:
    """``timm.create_model(args.model, num_classes=..., drop/drop_path, **args.model_kwargs)``.

    ``weights=True`` starts from ``--pretrained`` / ``--pretrained-path`` (adapted: new head,
    resampled position embeddings) and then ``--initial-checkpoint``, as timm's ``train.py``;
    otherwise the random initialisation (a rebuilt model whose checkpoint is loaded next).
    A name timm does not know, a keyword the model does not take, or weights that cannot be read
    or do not fit are a ``ValueError`` naming the flag.
    """
    source = None
    if weights and getattr(args, "pretrained_path", None):
        source = WeightSource("--pretrained-path", args.pretrained_path)
    elif weights and getattr(args, "pretrained", False):
        source = WeightSource("--pretrained")
    model = _create(args.model, num_classes, model_kwargs(args), "--model", source)
    if weights and getattr(args, "initial_checkpoint", None):
        _initial_checkpoint(model, args.initial_checkpoint, args.model)
    return model


def _compile_unhooked(module: nn.Module, backend: str) -> int:
    """Compile, in place, every block of a block list whose subtree carries no probe hook."""
    compiled = 0
    for child in module.children():
        hooked = any(m._forward_hooks or m._forward_pre_hooks for m in child.modules())
        if hooked:
            compiled += _compile_unhooked(child, backend)
        elif isinstance(module, (nn.ModuleList, nn.Sequential)):
            child.compile(backend=backend)
            compiled += 1
    return compiled


def probe_for(model: nn.Module, source: str | int, *, name: Optional[str] = None, image_size: Optional[int] = None,
              compile: bool = False, backend: str = "inductor", log=print) -> tuple[nn.Module, Any]:
    """(the model to call, its ``tk.ClassAttentionProbe``): the one place a probe is made and checked.

    A model whose attention TransMix cannot read (at ``image_size``, when given) is a ``ValueError``
    naming ``--model`` (``name``, else the class); a source it cannot give, one naming ``--attn-source``. With ``compile``, a
    probe that accepts a ``torch.compile`` wrapper gets the whole model compiled; one that refuses it
    keeps the probed blocks eager and every other block compiled in place.
    """
    import transmix_kernels as tk

    name = repr(name) if name else type(model).__name__
    if image_size is not None:
        try:
            tk.infer_token_grid(model, image_size)
        except TypeError as error:
            raise ValueError(f"--model {name}: TransMix cannot read its attention: {error}") from None

    def attach(target: nn.Module):
        try:
            return tk.ClassAttentionProbe(target, source=source)
        except ValueError as error:
            raise ValueError(f"--attn-source {source!r} with this model: {error}") from None

    if not compile:
        try:
            return model, attach(model)
        except TypeError as error:
            raise ValueError(f"--model {name}: TransMix cannot read its attention: {error}") from None
    compiled = torch.compile(model, backend=backend)
    try:
        probe = attach(compiled)
        log(f"--compile: the whole model ({backend}), probe attached through the wrapper")
        return compiled, probe
    except TypeError:
        probe = attach(model)
        count = _compile_unhooked(model, backend)
        log(f"--compile: the probe needs its blocks eager; compiled {count} other blocks in place ({backend})")
        return model, probe


def _frozen(teacher: nn.Module, device: torch.device) -> nn.Module:
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def _trained_classes(arch: str, state_dict: dict, where: str) -> int:
    """Classes of a trained head, read from its weight (the data need not be on this machine)."""
    classifiers = _classifiers(arch)
    classes = _head_classes(state_dict, classifiers)
    if not classes:
        raise ValueError(f"{where}: no classifier weight '{classifiers[0]}.weight' for {arch} in its state_dict")
    return classes


def load_from_checkpoint(path: str, flag: str, *, use_ema: Optional[bool] = None, num_classes: Optional[int] = None,
                         checkpoint: Optional[dict] = None) -> nn.Module:
    """The model of a ``transmix-train`` checkpoint (its ``arch`` and ``args``), weights loaded, in eval mode.

    ``use_ema``: True, the EMA weights (an error when there are none); False, the trained weights;
    None, the EMA weights when the checkpoint has them (as timm's ``load_checkpoint``).
    ``num_classes``: the head the caller needs (None: the checkpoint's own). Errors are
    ``ValueError`` naming ``flag`` and ``path``. ``checkpoint``: the file's contents, already read.
    """
    from .checkpoint import read_checkpoint

    checkpoint = read_checkpoint(path, flag) if checkpoint is None else checkpoint
    arch, args = checkpoint.get("arch"), checkpoint.get("args") or {}
    if not arch:
        raise ValueError(f"{flag} {path}: the checkpoint names no 'arch' (expected a transmix-train checkpoint)")
    has_ema = checkpoint.get("state_dict_ema") is not None
    if use_ema and not has_ema:
        raise ValueError(f"{flag} {path}: the checkpoint holds no EMA weights (train with --model-ema)")
    state = checkpoint["state_dict_ema"] if (has_ema if use_ema is None else use_ema) else checkpoint["state_dict"]
    classes = _trained_classes(arch, state, f"{flag} {path}") if num_classes is None else num_classes
    model = _create(arch, classes, model_kwargs(args), f"{flag} {path}: its arch")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{flag} {path}: its weights do not fit {arch} with {classes} classes rebuilt from its args: "
                         f"{error}") from None
    return model.eval()


def load_teacher(path: str, num_classes: int, device: torch.device) -> nn.Module:
    """A frozen teacher in eval mode from a ``transmix-train`` checkpoint (EMA weights when it has them)."""
    return _frozen(load_from_checkpoint(path, "--teacher", num_classes=num_classes), device)


def _check_teacher_runs(teacher: nn.Module, name: str, num_classes: int, image_size: int) -> None:
    """One image through the teacher: a model that cannot take the run's size fails here, named."""
    try:
        with torch.no_grad():
            logits = teacher(torch.zeros(1, 3, image_size, image_size, device=next(teacher.parameters()).device))
    except Exception as error:  # e.g. a ViT with a fixed position grid
        raise ValueError(f"--teacher-model {name!r} cannot run on the run's {image_size} px images: "
                         f"{type(error).__name__}: {_first_line(error)}") from None
    if logits.shape[-1] != num_classes:
        raise ValueError(f"--teacher-model {name!r}: outputs {logits.shape[-1]} classes, the data has {num_classes}")


def build_teacher(args: argparse.Namespace, num_classes: int, device: torch.device,
                  image_size: int) -> Optional[nn.Module]:
    """DeiT's frozen teacher: ``--teacher CKPT`` or ``--teacher-model NAME`` with ``--teacher-pretrained``
    / ``--teacher-path FILE`` (timm's hub weights or a weights file, head included); None without one."""
    check_weight_flags(args)
    if getattr(args, "teacher", None):
        return load_teacher(args.teacher, num_classes, device)
    name = getattr(args, "teacher_model", None)
    if not name:
        return None
    if args.teacher_path:
        source = WeightSource("--teacher-path", args.teacher_path, new_head=False, offline_hint="--teacher-path FILE")
    else:
        source = WeightSource("--teacher-pretrained", new_head=False, offline_hint="--teacher-path FILE")
    teacher = _frozen(_create(name, num_classes, {}, "--teacher-model", source), device)
    _check_teacher_runs(teacher, name, num_classes, image_size)
    return teacher
