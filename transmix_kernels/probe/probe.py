"""The probe: :class:`ClassAttentionProbe` reads a timm model's class attention from its own forward.

It finds the model's family adapter (:mod:`.base`'s registry, filled by the package's
``__init__``), lets it hook the attention's q / k producers, and turns what they captured into
the (B, gh * gw) attention TransMix needs. :func:`infer_token_grid` gives the (gh, gw) of that
attention for an image size without a forward pass. The package docstring explains how the
attention is recomputed from q and k.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .._checks import check_range
from .base import AttentionAdapter, Source, adapter_class, as_image_size, check_source, unwrap, wrapper_chain

__all__ = ["ClassAttentionProbe", "infer_token_grid"]


def infer_token_grid(model: nn.Module, image_size: Union[int, tuple[int, int]]) -> tuple[int, int]:
    """(gh, gw) of the token set the probe's attention covers, for ``image_size`` (int or (H, W)).

    ViT / DeiT / CaiT: the patch grid (``patch_embed``'s rule, dynamic padding included); XCiT:
    the output of its strided convolution stem; PVTv2 / Swin: the last stage's resolution.
    """
    size = as_image_size("image_size", image_size)
    return tuple(int(s) for s in adapter_class(model).infer_token_grid(unwrap(model), size))


def _check_rollout_residual(value) -> float:
    value = check_range("rollout_residual", value, 0.0, 1.0)
    if value == 1.0:
        raise ValueError(
            "rollout_residual must be below 1: with r = 1 every A' = (1 - r) A + r I is the identity and "
            "the class row keeps no patch attention"
        )
    return value


class ClassAttentionProbe:
    """Capture a timm model's class attention during its normal forward pass.

    ``source``: "last" (default), an int block index (what it counts per family: the family
    modules of :mod:`transmix_kernels.probe`; Python convention) or "rollout" (ViT / DeiT:
    attention rollout over all blocks). ``rollout_residual``: the identity's weight r in each
    block's A' = (1 - r) A + r I of the rollout, in [0, 1) (0.5 in Abnar & Zuidema and in the
    TransMix paper); only ``source="rollout"`` uses it. Hooks attach on construction;
    :meth:`remove` (or leaving a ``with`` block) detaches them. After each forward pass:

    - :meth:`attention` -> (B, gh * gw) float32 probabilities over the patch tokens (rows sum
      to 1), detached; class-token models: the class token's row, heads averaged; models
      without a class token: the attention each token receives (mean over queries and heads);
    - :attr:`token_grid` -> (gh, gw) of those tokens;
    - :meth:`class_query_keys` -> (q_cls (B, heads, D), k (B, heads, N_total, D), scale,
      num_prefix_tokens) for class-token sources, else None (for the fused CUDA path).

    The probe keeps detached views of q / k of the probed block(s) until the next forward (no
    copies, nothing N x N); in training autograd holds them anyway. Under ``torch.no_grad`` a
    rollout probe keeps every block's q and k alive until the next forward.

    ``torch.compile``: pass the compiled model or the original one; the hooks sit on the
    original modules and dynamo traces them into the graph. Attach the probe before the compiled
    model's first call and keep it attached: torch.compile does not see hooks added to a model
    it has already run without them (reading then raises an error saying so).

    Example::

        with ClassAttentionProbe(model, source=5) as probe:   # DeiT-S: Table 1's d = 6
            logits = model(images)
            lam = tk.transmix_lambda(probe.attention(), token_mask, lam_area)
    """

    def __init__(self, model: nn.Module, source: Source = "last", *, rollout_residual: float = 0.5) -> None:
        adapter_cls = adapter_class(model)
        check_source(source)
        residual = _check_rollout_residual(rollout_residual)
        self._adapter = adapter_cls(unwrap(model), source)
        self._adapter.rollout_residual = residual
        self._handles: list[RemovableHandle] = self._adapter.attach()
        self._handles += self._watch_compiled_calls(wrapper_chain(model)[:-1])
        self._untraced_call = False
        self.source = source
        self.rollout_residual = residual

    def _watch_compiled_calls(self, wrappers: list[nn.Module]) -> list[RemovableHandle]:
        """Eager hooks on the torch.compile wrappers (they run outside the compiled graph): each
        call starts with no captures, so a graph traced without the probe's hooks cannot leave
        the previous call's tensors looking current."""
        compiled = [w for w in wrappers if isinstance(getattr(w, "_orig_mod", None), nn.Module)]

        def before(_module, _args):
            self._adapter.new_forward()

        def after(_module, _args, _output):
            self._untraced_call = not self._adapter.captured

        return [h for w in compiled for h in (w.register_forward_pre_hook(before), w.register_forward_hook(after))]

    @property
    def family(self) -> str:
        return self._adapter.family

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def token_grid(self) -> Optional[tuple[int, int]]:
        return self._adapter.token_grid

    def _ready(self) -> AttentionAdapter:
        if not self._handles:
            raise RuntimeError("ClassAttentionProbe: the probe was removed; create a new one to read attention")
        if self._untraced_call:
            raise RuntimeError(
                "ClassAttentionProbe: the compiled model ran a graph that torch.compile traced before this probe "
                "was attached, so no attention was captured (torch.compile does not see hooks added to a model "
                "it has already run without them). Attach the probe before the compiled model's first call and "
                "keep it attached, or call torch.compiler.reset() after attaching it"
            )
        if not self._adapter.captured:
            raise RuntimeError(
                "ClassAttentionProbe: no attention captured yet; run a forward pass of the model first (a "
                "torch.compile'd model needs the probe attached before its first compiled call)"
            )
        return self._adapter

    def attention(self) -> torch.Tensor:
        """(B, gh * gw) float32 attention over the patch tokens of the last forward; rows sum to 1.

        Computed in float32 (autocast off) on first call after a forward, then the same tensor is
        returned until the next forward.
        """
        adapter = self._ready()
        # float32 math even when called inside the training step's autocast region.
        with torch.no_grad(), torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return adapter.attention()

    def class_query_keys(self):
        """(q_cls (B, heads, D), k (B, heads, N_total, D), scale, num_prefix_tokens) or None.

        Detached views of the model's own tensors (model dtype); None for rollout and for
        families without a class token.
        """
        return self._ready().class_query_keys()

    def remove(self) -> None:
        """Detach every hook and drop the captured tensors (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._adapter.new_forward()

    def __enter__(self) -> "ClassAttentionProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "attached" if self._handles else "removed"
        residual = f", rollout_residual={self.rollout_residual}" if self.source == "rollout" else ""
        return f"ClassAttentionProbe(family={self.family}, source={self.source!r}{residual}, {state})"
