"""PVTv2 (``timm.models.pvt_v2.PyramidVisionTransformerV2``): no class token.

The map is the attention each token receives (mean over query tokens and heads) of a block with
global attention: sr_ratio 1 and not linear, which at 224 px is the last stage (7 x 7). An int
source counts every ``stages[s].blocks[i]`` in forward order.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..class_attention_lambda import received_attention
from .base import AttentionAdapter, Source, conv_out, in_backward


class PvtV2Adapter(AttentionAdapter):
    """Received attention of one global ``stages[s].blocks[i].attn``."""

    family = "PyramidVisionTransformerV2"
    rollout_reason = (
        "it has no class token, its stages merge tokens (each stage starts with a strided patch embedding) "
        "and its spatial-reduction attention pools the keys, so no single token set runs through every block"
    )

    def __init__(self, model: nn.Module, source: Source) -> None:
        super().__init__(model, source)
        blocks = [blk for stage in model.stages for blk in stage.blocks]
        self.index = self.pick_block(blocks, "attention blocks of model.stages[*].blocks")
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

        def grid(_module, args):  # Attention.forward(x, feat_size)
            if not in_backward() and len(args) > 1:
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
            height, width = conv_out(height, conv, 0), conv_out(width, conv, 1)
        return height, width


__all__ = ["PvtV2Adapter"]
