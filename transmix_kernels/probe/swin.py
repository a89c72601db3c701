"""Swin (``timm.models.swin_transformer.SwinTransformer``): no class token.

The map is the attention each token receives (mean over query tokens and heads, relative
position bias included) of a block whose input is exactly one window, i.e. global attention; at
224 px with window 7 that is the last stage (7 x 7). An int source counts every
``layers[s].blocks[i]`` in forward order.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..class_attention_lambda import received_attention
from .base import AttentionAdapter, Source, in_backward, patch_embed_grid


class SwinAdapter(AttentionAdapter):
    """Received attention of one single-window ``layers[s].blocks[i]``.

    timm clamps the window to the feature size and drops the shift when one window covers the
    stage (``always_partition=False``, the default). With ``always_partition=True`` the shift
    stays: the probe then adds the shift mask, like the model, and rolls the result back to
    image order.
    """

    family = "SwinTransformer"
    rollout_reason = (
        "it has no class token, it attends within local windows, and its stages merge 2x2 tokens "
        "(PatchMerging), so no single token set runs through every block"
    )

    def __init__(self, model: nn.Module, source: Source) -> None:
        super().__init__(model, source)
        blocks = [blk for layer in model.layers for blk in layer.blocks]
        self.index = self.pick_block(blocks, "blocks of model.layers[*].blocks")
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
            if not in_backward():
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

        height, width = patch_embed_grid(model.patch_embed, image_size)
        for layer in model.layers:
            if isinstance(layer.downsample, PatchMerging):  # pads odd sizes, then halves
                height, width = (height + 1) // 2, (width + 1) // 2
        return height, width


__all__ = ["SwinAdapter"]
