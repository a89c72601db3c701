"""CaiT and XCiT: class-attention blocks (``timm.models.cait.ClassAttn``).

In these blocks the class token is the only query; its keys are [class token, patch tokens].
An int source counts the class-attention blocks: ``Cait.blocks_token_only`` (the patch blocks
before them carry no class token) and ``Xcit.cls_attn_blocks`` (the XCA blocks before them mix
channels, not tokens). Neither has a rollout.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..class_attention_lambda import class_attention_row
from .base import AttentionAdapter, Source, conv_out, normalise, patch_embed_grid


class _ClassAttnAdapter(AttentionAdapter):
    """The class token's row of one ``ClassAttn`` block of ``model.<blocks_attr>``."""

    blocks_attr = ""

    def __init__(self, model: nn.Module, source: Source) -> None:
        super().__init__(model, source)
        from timm.models.cait import ClassAttn

        blocks = getattr(model, self.blocks_attr, None) or []
        self.index = self.pick_block(blocks, f"class-attention blocks of model.{self.blocks_attr}")
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
        q_cls, k, scale, prefix = self.class_query_keys()
        self.check_grid(k.shape[-2] - prefix)
        return normalise(class_attention_row(q_cls, k, scale=scale, num_prefix_tokens=prefix))


class CaitAdapter(_ClassAttnAdapter):
    family = "Cait"
    blocks_attr = "blocks_token_only"
    rollout_reason = (
        "its patch blocks (model.blocks) carry no class token, which joins only in the class-attention "
        "blocks, so no single token set with a class token runs through every block"
    )

    @classmethod
    def infer_token_grid(cls, model: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
        return patch_embed_grid(model.patch_embed, image_size)


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
            height, width = conv_out(height, conv, 0), conv_out(width, conv, 1)
        return height, width


__all__ = ["CaitAdapter", "XcitAdapter"]
