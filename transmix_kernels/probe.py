"""Read a timm model's class attention from its own forward pass, fused attention included.

TransMix weighs each label by the class token's attention over the patch tokens. timm's fused
attention (SDPA) never materialises the probability matrix, so the probe captures what the
attention is made of instead: forward hooks on the attention's q / k producers (the q_norm /
k_norm outputs of ``timm.layers.Attention``, the q / k / kv / qkv Linear outputs elsewhere) keep
detached *views* of the query and key tensors the model computed anyway (autograd saves them for
the backward of SDPA). The model's forward, its ``fused_attn`` switch and its outputs are never
touched. From q and k the probe recomputes, in float32, only what TransMix needs:

- class-token models (ViT / DeiT, CaiT, XCiT): the class token's row
  ``softmax(q_cls k^T * scale)``, heads averaged, prefix tokens dropped, renormalised over the
  patches (:func:`transmix_kernels.class_attention_lambda.class_attention_row`), O(N) memory;
- models without a class token (PVTv2, Swin, ViT with ``class_token=False``): the attention each
  token *receives*, i.e. the mean over query tokens (and heads) of the last global attention
  layer, computed a chunk of queries at a time so that no (B, heads, N, N) tensor exists beyond
  one chunk;
- ``source="rollout"`` (ViT / DeiT): the class-token row of attention rollout over all blocks
  (:func:`transmix_kernels.qk_rollout.rollout_from_qk`).

What an int ``source`` (block index, Python convention, negative from the end) counts:

- ``VisionTransformer`` (incl. ``VisionTransformerDistilled``): ``model.blocks``. DeiT-S:
  Table 1's d = 6 of 12 is index 5.
- ``Cait``: ``model.blocks_token_only``, the class-attention blocks (2 in CaiT); the patch
  blocks before them carry no class token.
- ``Xcit``: ``model.cls_attn_blocks``, the class-attention blocks (2 in XCiT); the XCA blocks
  before them mix channels, not tokens.
- ``PyramidVisionTransformerV2``: every ``stages[s].blocks[i]`` in forward order; only blocks
  with global attention (sr_ratio 1, not linear) can be read.
- ``SwinTransformer``: every ``layers[s].blocks[i]`` in forward order; only blocks whose input
  is exactly one window can be read.

Other architectures: subclass :class:`AttentionAdapter` and register it with
:func:`register_attention_family`; the five families above are registered the same way.

Example::

    with tk.ClassAttentionProbe(model) as probe:
        logits = model(images)
        attn = probe.attention()          # (B, gh * gw) float32, rows sum to 1
        gh, gw = probe.token_grid
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .class_attention_lambda import received_attention

Source = Union[str, int]
SOURCES = ("last", "rollout")


# --------------------------------------------------------------------------------------------
# math on captured tensors
# --------------------------------------------------------------------------------------------


def _normalise(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.float()
    return rows / rows.sum(dim=-1, keepdim=True)


def _conv_out(size: int, conv: nn.Conv2d, dim: int) -> int:
    pad = conv.padding[dim] if isinstance(conv.padding, tuple) else 0
    return (size + 2 * pad - conv.dilation[dim] * (conv.kernel_size[dim] - 1) - 1) // conv.stride[dim] + 1


def _as_size(name: str, image_size) -> tuple[int, int]:
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


def _in_backward() -> bool:
    # Activation checkpointing reruns blocks during backward; those reruns must not replace the
    # forward's captures (and would keep recomputed tensors alive past the backward).
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


# --------------------------------------------------------------------------------------------
# adapters: one per model family
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

    ``self.token_grid`` is set by the hooks; ``self.captured`` holds the current forward's tensors.
    """

    family = "custom"

    def __init__(self, model: nn.Module, source: Source) -> None:
        self.model = model
        self.source = source
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
        if not _in_backward():
            self.captured[key] = tensor.detach()
            self._result = None

    def hook_output(self, module: nn.Module, key, view: Callable[[torch.Tensor], torch.Tensor]) -> RemovableHandle:
        def hook(_module, _args, output):
            self.keep(key, view(output))

        return module.register_forward_hook(hook)

    def hook_forward_start(self, module: nn.Module, image_grid: bool = True) -> RemovableHandle:
        """Pre-hook on the stem: a new forward starts; the image size gives the token grid."""

        def hook(_module, args):
            if _in_backward():
                return
            self.new_forward()
            images = args[0] if args else None
            if image_grid and isinstance(images, torch.Tensor) and images.dim() == 4:
                self.token_grid = self.infer_token_grid(self.model, tuple(images.shape[-2:]))

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


def _resolve_index(source: Source, count: int, what: str) -> int:
    """'last' or a Python index over ``count`` blocks -> a non-negative index."""
    if source == "last":
        return count - 1
    if isinstance(source, bool) or not isinstance(source, int):
        raise ValueError(f"source must be 'last', 'rollout' or an int block index, got {source!r}")
    if not -count <= source < count:
        raise ValueError(f"source={source} is out of range for the {count} {what} (valid: {-count} .. {count - 1})")
    return source % count


def _check_source(source: Source) -> None:
    if isinstance(source, str):
        if source not in SOURCES:
            raise ValueError(f"source must be 'last', 'rollout' or an int block index, got {source!r}")
    elif isinstance(source, bool) or not isinstance(source, int):
        raise ValueError(f"source must be 'last', 'rollout' or an int block index, got {source!r}")


def _patch_embed_grid(patch_embed: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
    """timm PatchEmbed grid, with its dynamic padding rule."""
    if hasattr(patch_embed, "dynamic_feat_size"):
        return tuple(int(s) for s in patch_embed.dynamic_feat_size(image_size))
    patch = patch_embed.patch_size
    patch = (patch, patch) if isinstance(patch, int) else patch
    return image_size[0] // patch[0], image_size[1] // patch[1]


class VisionTransformerAdapter(AttentionAdapter):
    """ViT / DeiT (incl. distilled): ``model.blocks[i].attn`` is ``timm.layers.Attention``.

    q, k are the outputs of the attention's ``q_norm`` / ``k_norm`` (identity unless qk_norm):
    exactly the tensors SDPA (or the naive path) consumes.
    """

    family = "VisionTransformer"

    def __init__(self, model: nn.Module, source: Source) -> None:
        super().__init__(model, source)
        from timm.layers import Attention

        blocks = list(model.blocks)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.has_class_token = getattr(model, "cls_token", None) is not None
        if source == "rollout":
            if not self.has_class_token:
                raise ValueError(
                    "source='rollout' needs a class token (its rollout row is the attention map); "
                    "this VisionTransformer was built with class_token=False"
                )
            self.indices = list(range(len(blocks)))
        else:
            self.indices = [_resolve_index(source, len(blocks), "blocks of model.blocks")]
        for i in self.indices:
            attn = getattr(blocks[i], "attn", None)
            if not isinstance(attn, Attention):
                raise ValueError(
                    f"model.blocks[{i}] has attention {type(attn).__name__}; the VisionTransformer adapter "
                    f"reads timm.layers.Attention only (register an adapter for other block types)"
                )
        self.attns = [blocks[i].attn for i in self.indices]
        self.scale = float(self.attns[0].scale)
        if any(float(a.scale) != self.scale for a in self.attns):
            raise ValueError("source='rollout' needs the same attention scale in every block")

    def attach(self) -> list[RemovableHandle]:
        handles = [self.hook_forward_start(self.model.patch_embed)]
        for i, attn in zip(self.indices, self.attns):
            handles.append(self.hook_output(attn.q_norm, ("q", i), lambda t: t))
            handles.append(self.hook_output(attn.k_norm, ("k", i), lambda t: t))
            handles.append(attn.register_forward_pre_hook(self._mask_hook(i), with_kwargs=True))
        return handles

    def _mask_hook(self, index: int):
        def hook(_module, args, kwargs):
            masked = len(args) > 1 or kwargs.get("attn_mask") is not None or bool(kwargs.get("is_causal", False))
            if masked and not _in_backward():
                self.captured[("masked", index)] = True

        return hook

    def _qk(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if ("masked", index) in self.captured:
            raise RuntimeError(
                f"model.blocks[{index}] ran with an attention mask (or is_causal); the probe reads "
                f"unmasked attention only"
            )
        return self.need(("q", index)), self.need(("k", index))

    def compute(self) -> torch.Tensor:
        if self.source == "rollout":
            from .qk_rollout import rollout_from_qk

            pairs = [self._qk(i) for i in self.indices]
            self.check_grid(pairs[0][1].shape[-2] - self.num_prefix_tokens)
            rows = rollout_from_qk(
                [q for q, _ in pairs],
                [k for _, k in pairs],
                scale=self.scale,
                residual=0.5,
                num_prefix_tokens=self.num_prefix_tokens,
            )
            return _normalise(rows)
        q, k = self._qk(self.indices[0])
        self.check_grid(k.shape[-2] - self.num_prefix_tokens)
        if not self.has_class_token:
            return received_attention(q, k, scale=self.scale, num_prefix_tokens=self.num_prefix_tokens)
        from .class_attention_lambda import class_attention_row

        row = class_attention_row(q[:, :, 0], k, scale=self.scale, num_prefix_tokens=self.num_prefix_tokens)
        return _normalise(row)

    def class_query_keys(self):
        if self.source == "rollout" or not self.has_class_token:
            return None
        q, k = self._qk(self.indices[0])
        return q[:, :, 0], k, self.scale, self.num_prefix_tokens

    @classmethod
    def infer_token_grid(cls, model: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
        return _patch_embed_grid(model.patch_embed, image_size)


class _ClassAttnAdapter(AttentionAdapter):
    """CaiT / XCiT class-attention blocks (``timm.models.cait.ClassAttn``): the class token is the
    only query; its keys are [class token, patch tokens]."""

    blocks_attr = ""
    rollout_reason = ""

    def __init__(self, model: nn.Module, source: Source) -> None:
        super().__init__(model, source)
        from timm.models.cait import ClassAttn

        if source == "rollout":
            raise ValueError(f"source='rollout' is not defined for {self.family}: {self.rollout_reason}")
        blocks = getattr(model, self.blocks_attr, None)
        if blocks is None or len(blocks) == 0:
            raise ValueError(f"this {self.family} has no class-attention blocks (model.{self.blocks_attr} is empty)")
        self.index = _resolve_index(source, len(blocks), f"class-attention blocks of model.{self.blocks_attr}")
        self.attn = blocks[self.index].attn
        if not isinstance(self.attn, ClassAttn):
            raise ValueError(
                f"model.{self.blocks_attr}[{self.index}].attn is {type(self.attn).__name__}; the {self.family} "
                f"adapter reads timm.models.cait.ClassAttn only"
            )
        self.scale = float(self.attn.scale)
        self.num_prefix_tokens = 1

    def attach(self) -> list[RemovableHandle]:
        heads = self.attn.num_heads

        def query(t):  # (B, C) -> (B, heads, D), the class token's query
            return t.view(t.shape[0], heads, t.shape[-1] // heads)

        def keys(t):  # (B, N, C) -> (B, heads, N, D)
            return t.view(t.shape[0], t.shape[1], heads, t.shape[-1] // heads).transpose(1, 2)

        return [
            self.hook_forward_start(self.model.patch_embed),
            self.hook_output(self.attn.q, "q_cls", query),
            self.hook_output(self.attn.k, "k", keys),
        ]

    def class_query_keys(self):
        return self.need("q_cls"), self.need("k"), self.scale, self.num_prefix_tokens

    def compute(self) -> torch.Tensor:
        from .class_attention_lambda import class_attention_row

        q_cls, k, scale, prefix = self.class_query_keys()
        self.check_grid(k.shape[-2] - prefix)
        return _normalise(class_attention_row(q_cls, k, scale=scale, num_prefix_tokens=prefix))


class CaitAdapter(_ClassAttnAdapter):
    family = "Cait"
    blocks_attr = "blocks_token_only"
    rollout_reason = (
        "its patch blocks (model.blocks) carry no class token, which joins only in the class-attention "
        "blocks, so no single token set with a class token runs through every block"
    )

    @classmethod
    def infer_token_grid(cls, model: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
        return _patch_embed_grid(model.patch_embed, image_size)


class XcitAdapter(_ClassAttnAdapter):
    family = "Xcit"
    blocks_attr = "cls_attn_blocks"
    rollout_reason = (
        "its XCA blocks attend across channels, not tokens (there is no token-to-token attention to "
        "roll out), and the class token joins only in the class-attention blocks"
    )

    @classmethod
    def infer_token_grid(cls, model: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
        # ConvPatchEmbed: a stack of strided 3x3 convolutions.
        height, width = image_size
        for conv in (m for m in model.patch_embed.modules() if isinstance(m, nn.Conv2d)):
            height, width = _conv_out(height, conv, 0), _conv_out(width, conv, 1)
        return height, width


class PvtV2Adapter(AttentionAdapter):
    """PVTv2: no class token; reads a block with global attention (sr_ratio 1, not linear)."""

    family = "PyramidVisionTransformerV2"

    def __init__(self, model: nn.Module, source: Source) -> None:
        super().__init__(model, source)
        if source == "rollout":
            raise ValueError(
                "source='rollout' is not defined for PyramidVisionTransformerV2: it has no class token, "
                "its stages merge tokens (each stage starts with a strided patch embedding) and its "
                "spatial-reduction attention pools the keys, so no single token set runs through every block"
            )
        blocks = [blk for stage in model.stages for blk in stage.blocks]
        self.index = _resolve_index(source, len(blocks), "attention blocks of model.stages[*].blocks")
        self.attn = blocks[self.index].attn
        reason = self.non_global_reason(self.attn)
        if reason:
            usable = [i for i, blk in enumerate(blocks) if not self.non_global_reason(blk.attn)]
            raise ValueError(
                f"source={source!r} picks block {self.index} of PyramidVisionTransformerV2, whose attention is "
                f"not global ({reason}): its keys are pooled tokens, so no token-to-token attention exists; "
                f"blocks with global attention: {usable}"
            )
        self.scale = float(self.attn.scale)

    @staticmethod
    def non_global_reason(attn: nn.Module) -> str:
        if getattr(attn, "pool", None) is not None:
            return "linear attention pools the keys to 7x7"
        if getattr(attn, "sr", None) is not None:
            return f"sr_ratio {attn.sr.stride[0]} > 1 reduces the keys"
        return ""

    def attach(self) -> list[RemovableHandle]:
        heads = self.attn.num_heads

        def query(t):  # (B, N, C) -> (B, heads, N, D)
            return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

        def keys(t):  # kv: (B, N, 2C) -> k (B, heads, N, D)
            return t.view(t.shape[0], t.shape[1], 2, heads, -1)[:, :, 0].transpose(1, 2)

        def grid(_module, args):
            if not _in_backward() and len(args) > 1:
                self.token_grid = tuple(int(s) for s in args[1])

        return [
            self.hook_forward_start(self.model.patch_embed, image_grid=False),
            self.attn.register_forward_pre_hook(grid),
            self.hook_output(self.attn.q, "q", query),
            self.hook_output(self.attn.kv, "k", keys),
        ]

    def compute(self) -> torch.Tensor:
        q, k = self.need("q"), self.need("k")
        self.check_grid(k.shape[-2])
        return received_attention(q, k, scale=self.scale)

    @classmethod
    def infer_token_grid(cls, model: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
        convs = [model.patch_embed.proj] + [s.downsample.proj for s in model.stages if s.downsample is not None]
        height, width = image_size
        for conv in convs:
            height, width = _conv_out(height, conv, 0), _conv_out(width, conv, 1)
        return height, width


class SwinAdapter(AttentionAdapter):
    """Swin: no class token; reads a block whose input is one window (global attention).

    timm clamps the window to the feature size and drops the shift when one window covers the
    stage (``always_partition=False``, the default). With ``always_partition=True`` the shift
    stays: the probe then adds the shift mask, like the model, and rolls the result back to
    image order.
    """

    family = "SwinTransformer"

    def __init__(self, model: nn.Module, source: Source) -> None:
        super().__init__(model, source)
        if source == "rollout":
            raise ValueError(
                "source='rollout' is not defined for SwinTransformer: it has no class token, it attends "
                "within local windows, and its stages merge 2x2 tokens (PatchMerging), so no single token "
                "set runs through every block"
            )
        blocks = [blk for layer in model.layers for blk in layer.blocks]
        self.index = _resolve_index(source, len(blocks), "blocks of model.layers[*].blocks")
        self.block = blocks[self.index]
        reason = self.non_global_reason(tuple(self.block.input_resolution), tuple(self.block.window_size))
        if reason:
            usable = [
                i
                for i, blk in enumerate(blocks)
                if not self.non_global_reason(tuple(blk.input_resolution), tuple(blk.window_size))
            ]
            raise ValueError(
                f"source={source!r} picks block {self.index} of SwinTransformer, whose attention is not global: "
                f"{reason}; blocks with one global window at the model's img_size: {usable} (pick an input "
                f"size or window_size for which the last stage is one window)"
            )
        self.attn = self.block.attn
        self.scale = float(self.attn.scale)

    @staticmethod
    def non_global_reason(feat_size: tuple[int, int], window: tuple[int, int]) -> str:
        if feat_size == window:
            return ""
        if feat_size[0] <= window[0] and feat_size[1] <= window[1]:
            return f"its {feat_size[0]}x{feat_size[1]} tokens are padded to a {window[0]}x{window[1]} window"
        return f"its {feat_size[0]}x{feat_size[1]} tokens are split into {window[0]}x{window[1]} windows"

    def attach(self) -> list[RemovableHandle]:
        heads = self.attn.num_heads

        def qk(index):  # qkv: (B*nW, N, 3 * heads * D) -> (B*nW, heads, N, D)
            return lambda t: t.view(t.shape[0], t.shape[1], 3, heads, -1)[:, :, index].transpose(1, 2)

        def block_input(_module, args):  # x: (B, H, W, C)
            if not _in_backward():
                x = args[0]
                self.captured["layout"] = (
                    int(x.shape[0]),
                    (int(x.shape[1]), int(x.shape[2])),
                    tuple(self.block.window_size),
                    tuple(self.block.shift_size),
                )
                self.token_grid = (int(x.shape[1]), int(x.shape[2]))

        return [
            self.hook_forward_start(self.model.patch_embed, image_grid=False),
            self.block.register_forward_pre_hook(block_input),
            self.hook_output(self.attn.qkv, "q", qk(0)),
            self.hook_output(self.attn.qkv, "k", qk(1)),
        ]

    def _shift_mask(self, feat_size: tuple[int, int]) -> Optional[torch.Tensor]:
        block = self.block
        if getattr(block, "dynamic_mask", False):
            dummy = torch.empty(1, feat_size[0], feat_size[1], 1, device=block.attn.qkv.weight.device)
            return block.get_attn_mask(dummy)
        return block.attn_mask

    def compute(self) -> torch.Tensor:
        batch, feat_size, window, shift = self.need("layout")
        q, k = self.need("q"), self.need("k")
        reason = self.non_global_reason(feat_size, window)
        if reason or q.shape[0] != batch:
            raise RuntimeError(
                f"ClassAttentionProbe: block {self.index} of SwinTransformer was not global in the last forward "
                f"({reason or 'several windows'}); use an input size for which this stage is one window"
            )
        attn = self.attn
        tokens = q.shape[-2]
        mask = self._shift_mask(feat_size) if any(shift) else None

        def addends(start: int, stop: int):
            index = attn.relative_position_index[start:stop].reshape(-1)
            bias = attn.relative_position_bias_table[index].view(stop - start, tokens, -1).permute(2, 0, 1)
            return [bias] if mask is None else [bias, mask[0, start:stop]]

        received = received_attention(q, k, scale=self.scale, logit_addends=addends)
        if any(shift):
            # The window holds the cyclically shifted map; timm rolls the output back by +shift.
            received = received.view(batch, *feat_size).roll(shifts=shift, dims=(1, 2)).reshape(batch, -1)
        return received

    @classmethod
    def infer_token_grid(cls, model: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
        from timm.models.swin_transformer import PatchMerging

        height, width = _patch_embed_grid(model.patch_embed, image_size)
        for layer in model.layers:
            if isinstance(layer.downsample, PatchMerging):  # pads odd sizes, then halves
                height, width = (height + 1) // 2, (width + 1) // 2
        return height, width


# --------------------------------------------------------------------------------------------
# registry
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


def _register_timm_families() -> None:
    try:
        from timm.models.cait import Cait
        from timm.models.pvt_v2 import PyramidVisionTransformerV2
        from timm.models.swin_transformer import SwinTransformer
        from timm.models.vision_transformer import VisionTransformer
        from timm.models.xcit import Xcit
    except ImportError:  # pragma: no cover - timm is a dependency; keep the package importable
        return
    register_attention_family(VisionTransformer, VisionTransformerAdapter)
    register_attention_family(Cait, CaitAdapter)
    register_attention_family(Xcit, XcitAdapter)
    register_attention_family(PyramidVisionTransformerV2, PvtV2Adapter)
    register_attention_family(SwinTransformer, SwinAdapter)


_register_timm_families()


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP runs the wrapped module itself, so hooks on it see every forward. (DataParallel runs
    # per-device replicas, whose captures would overwrite each other: not supported.)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return _unwrap(model.module)
    # torch.compile wraps the model: its structure (hence its token grid) is the original's.
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, nn.Module):
        return _unwrap(original)
    return model


def _adapter_class(model) -> type[AttentionAdapter]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for cls in type(_unwrap(model)).__mro__:
        if cls in _FAMILIES:
            return _FAMILIES[cls]
    known = ", ".join(sorted(c.__name__ for c in _FAMILIES)) or "none"
    raise TypeError(
        f"model is a {type(model).__name__}, which ClassAttentionProbe does not know; supported families: "
        f"{known}. Register one with transmix_kernels.register_attention_family({type(model).__name__}, "
        f"adapter) where adapter subclasses transmix_kernels.probe.AttentionAdapter"
    )


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def infer_token_grid(model: nn.Module, image_size: Union[int, tuple[int, int]]) -> tuple[int, int]:
    """(gh, gw) of the token set the probe's attention covers, for ``image_size`` (int or (H, W)).

    ViT / DeiT / CaiT: the patch grid (``patch_embed``'s rule, dynamic padding included); XCiT:
    the output of its strided convolution stem; PVTv2 / Swin: the last stage's resolution.
    """
    size = _as_size("image_size", image_size)
    return tuple(int(s) for s in _adapter_class(model).infer_token_grid(_unwrap(model), size))


class ClassAttentionProbe:
    """Capture a timm model's class attention during its normal forward pass.

    ``source``: "last" (default), an int block index (see the module docstring for what it counts
    per family; Python convention) or "rollout" (ViT / DeiT: attention rollout over all blocks,
    residual 0.5). Hooks attach on construction; :meth:`remove` (or leaving a ``with`` block)
    detaches them. After each forward pass:

    - :meth:`attention` -> (B, gh * gw) float32 probabilities over the patch tokens (rows sum
      to 1), detached; class-token models: the class token's row, heads averaged; models
      without a class token: the attention each token receives (mean over queries and heads);
    - :attr:`token_grid` -> (gh, gw) of those tokens;
    - :meth:`class_query_keys` -> (q_cls (B, heads, D), k (B, heads, N_total, D), scale,
      num_prefix_tokens) for class-token sources, else None (for the fused CUDA path).

    The probe keeps detached views of q / k of the probed block(s) until the next forward (no
    copies, nothing N x N); in training autograd holds them anyway. Under ``torch.no_grad`` a
    rollout probe keeps every block's q and k alive until the next forward.

    Example::

        with ClassAttentionProbe(model, source=5) as probe:   # DeiT-S: Table 1's d = 6
            logits = model(images)
            lam = tk.transmix_lambda(probe.attention(), token_mask, lam_area)
    """

    def __init__(self, model: nn.Module, source: Source = "last") -> None:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            # Hooks that keep tensors do not capture from inside a compiled graph (checked with
            # the eager and aot_eager backends): refuse rather than return stale or no attention.
            raise TypeError(
                "ClassAttentionProbe needs the eager model, not a torch.compile wrapper: its hooks do not "
                "capture inside a compiled graph. Attach it to the uncompiled model (model._orig_mod) and run "
                "that, or compile only parts of the model that do not hold the probed attention"
            )
        adapter_cls = _adapter_class(model)
        _check_source(source)
        self._adapter = adapter_cls(_unwrap(model), source)
        self._handles: list[RemovableHandle] = self._adapter.attach()
        self.source = source

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
        if not self._adapter.captured:
            raise RuntimeError(
                "ClassAttentionProbe: no attention captured yet; run a forward pass of the model first"
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
        return f"ClassAttentionProbe(family={self.family}, source={self.source!r}, {state})"


__all__ = [
    "AttentionAdapter",
    "ClassAttentionProbe",
    "infer_token_grid",
    "received_attention",
    "register_attention_family",
]
