"""The probe's framework: the adapter base class, the family registry and their shared helpers.

An adapter knows where one model family keeps its attention's queries and keys. It registers
forward hooks that keep detached *views* of those tensors (never copies, nothing N x N) and
recomputes the attention map from them on demand. Hooks are written so that ``torch.compile``
(dynamo) traces them: they only store tensors and Python values on the adapter, which the
compiled graph replays after each call.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

Source = Union[str, int]
SOURCES = ("last", "rollout")


# --------------------------------------------------------------------------------------------
# helpers shared by the family adapters
# --------------------------------------------------------------------------------------------


def in_backward() -> bool:
    """True while autograd runs a backward pass (activation checkpointing reruns blocks there)."""
    if torch.compiler.is_compiling():
        # A compiled forward runs the hooks once, while dynamo traces it, and replays what they
        # store after every call; the compiled backward never runs Python hooks, so inside a trace
        # it is never a checkpoint rerun (and dynamo cannot trace the graph-task query below).
        return False
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def normalise(rows: torch.Tensor) -> torch.Tensor:
    """(B, N) -> float32 rows divided by their sums."""
    rows = rows.float()
    return rows / rows.sum(dim=-1, keepdim=True)


def conv_out(size: int, conv: nn.Conv2d, dim: int) -> int:
    """Output length of ``conv`` along ``dim`` (0: height, 1: width) for an input of ``size``."""
    pad = conv.padding[dim] if isinstance(conv.padding, tuple) else 0
    return (size + 2 * pad - conv.dilation[dim] * (conv.kernel_size[dim] - 1) - 1) // conv.stride[dim] + 1


def patch_embed_grid(patch_embed: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
    """timm PatchEmbed grid, with its dynamic padding rule."""
    if hasattr(patch_embed, "dynamic_feat_size"):
        return tuple(int(s) for s in patch_embed.dynamic_feat_size(image_size))
    patch = patch_embed.patch_size
    patch = (patch, patch) if isinstance(patch, int) else patch
    return image_size[0] // patch[0], image_size[1] // patch[1]


def as_image_size(name: str, image_size) -> tuple[int, int]:
    """An int or a (height, width) pair of positive ints -> (height, width)."""
    if isinstance(image_size, bool):
        raise TypeError(f"{name} must be an int or a (height, width) pair, got bool")
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if (
        not isinstance(image_size, (tuple, list, torch.Size))
        or len(image_size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in image_size)
    ):
        raise ValueError(
            f"{name} must be a positive int or a (height, width) pair of positive ints, got {image_size!r}"
        )
    return int(image_size[0]), int(image_size[1])


def check_source(source: Source) -> None:
    """'last', 'rollout' or an int (not bool) block index."""
    valid = source in SOURCES if isinstance(source, str) else isinstance(source, int) and not isinstance(source, bool)
    if not valid:
        raise ValueError(f"source must be 'last', 'rollout' or an int block index, got {source!r}")


def resolve_index(source: Source, count: int, what: str) -> int:
    """'last' or a Python index over ``count`` blocks -> a non-negative index."""
    if count == 0:
        raise ValueError(f"source={source!r} has nothing to pick: the model has no {what}")
    if source == "last":
        return count - 1
    check_source(source)
    if source == "rollout":
        raise ValueError(f"source must be 'last' or an int block index here, got {source!r}")
    if not -count <= source < count:
        raise ValueError(f"source={source} is out of range for the {count} {what} (valid: {-count} .. {count - 1})")
    return source % count


# --------------------------------------------------------------------------------------------
# the adapter base class
# --------------------------------------------------------------------------------------------


class AttentionAdapter:
    """How the probe reads one model family. Subclass, then :func:`register_attention_family`.

    A subclass sets ``family`` (a readable name), validates ``source`` in ``__init__`` (raise
    ValueError before any hook exists) and implements:

    - ``attach() -> list[RemovableHandle]``: register hooks that store detached views of the
      tensors they need (never clones of anything N x N) and call ``self.new_forward()`` when a
      forward pass starts;
    - ``compute() -> (B, N_patches) float32``: the attention, rows summing to 1 (runs under
      ``torch.no_grad()`` with autocast off, after a forward);
    - ``class_query_keys()``: ``(q_cls (B, heads, D), k (B, heads, N_total, D), scale,
      num_prefix_tokens)`` for class-token sources, else None;
    - ``infer_token_grid(model, (height, width)) -> (gh, gw)`` (classmethod).

    ``self.token_grid`` is set by the hooks; ``self.captured`` holds the current forward's tensors;
    ``self.rollout_residual`` (set by the probe) is the identity weight r of a rollout source.
    Hooks built with :meth:`keep`, :meth:`hook_output` and :meth:`hook_forward_start` also run
    inside ``torch.compile``: store tensors and Python values only, and call :func:`in_backward`
    rather than autograd internals.
    """

    family = "custom"
    # Why source="rollout" is not defined for the family, for the error :meth:`pick_block` raises.
    rollout_reason = "this adapter reads one block only"

    def __init__(self, model: nn.Module, source: Source) -> None:
        self.model = model
        self.source = source
        self.rollout_residual = 0.5
        self.token_grid: Optional[tuple[int, int]] = None
        self.captured: dict = {}
        self._result: Optional[torch.Tensor] = None

    # hooks ----------------------------------------------------------------------------------
    def new_forward(self) -> None:
        self.captured = {}
        self.token_grid = None
        self._result = None

    def keep(self, key, tensor: torch.Tensor) -> None:
        """Store a detached view under ``key`` (skipped during checkpoint recomputation)."""
        if not in_backward():
            self.captured[key] = tensor.detach()
            self._result = None

    def hook_output(self, module: nn.Module, key, view: Callable[[torch.Tensor], torch.Tensor]) -> RemovableHandle:
        def hook(_module, _args, output):
            self.keep(key, view(output))

        return module.register_forward_hook(hook)

    def hook_forward_start(self, module: nn.Module, image_grid: bool = True) -> RemovableHandle:
        """Pre-hook on the stem: a new forward starts; the image size gives the token grid."""

        def hook(_module, args):
            if in_backward():
                return
            self.new_forward()
            images = args[0] if args else None
            if image_grid and isinstance(images, torch.Tensor) and images.dim() == 4:
                size = (int(images.shape[-2]), int(images.shape[-1]))
                self.token_grid = tuple(int(s) for s in self.infer_token_grid(self.model, size))

        return module.register_forward_pre_hook(hook)

    # interface ------------------------------------------------------------------------------
    def attach(self) -> list[RemovableHandle]:  # pragma: no cover - interface
        raise NotImplementedError

    def compute(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def class_query_keys(self):
        return None

    @classmethod
    def infer_token_grid(cls, model: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:  # pragma: no cover
        raise NotImplementedError

    # shared ---------------------------------------------------------------------------------
    def pick_block(self, blocks: Sequence[nn.Module], what: str) -> int:
        """Index into ``blocks`` (``what`` names them in errors) of the block ``self.source`` picks;
        a ValueError with :attr:`rollout_reason` for ``source="rollout"``."""
        if self.source == "rollout":
            raise ValueError(f"source='rollout' is not defined for {self.family}: {self.rollout_reason}")
        return resolve_index(self.source, len(blocks), what)

    def attention(self) -> torch.Tensor:
        if self._result is None:
            self._result = self.compute()
        return self._result

    def need(self, key) -> torch.Tensor:
        if key not in self.captured:
            raise RuntimeError(
                f"ClassAttentionProbe: the last forward pass of this {self.family} did not run the "
                f"probed attention ({key!r} was not captured); run the whole model forward"
            )
        return self.captured[key]

    def check_grid(self, patches: int) -> tuple[int, int]:
        grid = self.token_grid
        if grid is None or grid[0] * grid[1] != patches:
            raise RuntimeError(
                f"ClassAttentionProbe: the probed attention has {patches} patch tokens, which does not "
                f"match the token grid {grid} inferred from the input of this {self.family}"
            )
        return grid


# --------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------

_FAMILIES: dict[type, type[AttentionAdapter]] = {}


def register_attention_family(model_type: type, adapter: Optional[type[AttentionAdapter]] = None):
    """Teach the probe a model class: ``register_attention_family(MyViT, MyAdapter)``.

    ``adapter`` is an :class:`AttentionAdapter` subclass; ``model_type`` and its subclasses use it
    (the nearest registered class in the model's MRO wins). Without ``adapter`` it returns a
    class decorator::

        @tk.register_attention_family(MyViT)
        class MyAdapter(tk.probe.AttentionAdapter): ...
    """
    if not isinstance(model_type, type) or not issubclass(model_type, nn.Module):
        raise TypeError(f"model_type must be an nn.Module subclass, got {model_type!r}")
    if adapter is None:

        def decorate(cls: type[AttentionAdapter]) -> type[AttentionAdapter]:
            register_attention_family(model_type, cls)
            return cls

        return decorate
    if not isinstance(adapter, type) or not issubclass(adapter, AttentionAdapter):
        raise TypeError(f"adapter must be an AttentionAdapter subclass, got {adapter!r}")
    _FAMILIES[model_type] = adapter
    return adapter


def wrapper_chain(model: nn.Module) -> list[nn.Module]:
    """``model`` and the modules it wraps (DDP, ``torch.compile``), outermost first; the last runs."""
    chain = [model]
    while True:
        inner = chain[-1]
        # DDP runs the wrapped module itself, so hooks on it see every forward. (DataParallel runs
        # per-device replicas, whose captures would overwrite each other: not supported.)
        if isinstance(inner, nn.parallel.DistributedDataParallel):
            chain.append(inner.module)
        # A torch.compile wrapper runs the original's submodules (traced, their hooks included).
        elif isinstance(getattr(inner, "_orig_mod", None), nn.Module):
            chain.append(inner._orig_mod)
        else:
            return chain


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose submodules run: through DDP and ``torch.compile`` wrappers."""
    return wrapper_chain(model)[-1]


def adapter_class(model) -> type[AttentionAdapter]:
    """The registered adapter for ``model`` (wrappers looked through), or a TypeError naming them."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for cls in type(unwrap(model)).__mro__:
        if cls in _FAMILIES:
            return _FAMILIES[cls]
    known = ", ".join(sorted(c.__name__ for c in _FAMILIES)) or "none"
    raise TypeError(
        f"model is a {type(model).__name__}, which ClassAttentionProbe does not know; supported families: "
        f"{known}. Register one with transmix_kernels.register_attention_family({type(model).__name__}, "
        f"adapter) where adapter subclasses transmix_kernels.probe.AttentionAdapter"
    )


__all__ = [
    "SOURCES",
    "AttentionAdapter",
    "Source",
    "adapter_class",
    "as_image_size",
    "check_source",
    "conv_out",
    "in_backward",
    "normalise",
    "patch_embed_grid",
    "register_attention_family",
    "resolve_index",
    "unwrap",
    "wrapper_chain",
]
