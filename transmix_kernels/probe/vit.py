"""ViT / DeiT (``timm.models.vision_transformer.VisionTransformer``, distilled included).

``model.blocks[i].attn`` is ``timm.layers.Attention``; its ``q_norm`` / ``k_norm`` outputs
(identity unless qk_norm) are exactly the q and k that SDPA (or the naive path) consumes. An int
source counts ``model.blocks`` (DeiT-S: Table 1's d = 6 of 12 is index 5).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..class_attention_lambda import class_attention_row, received_attention
from ..qk_rollout import rollout_from_qk
from .base import AttentionAdapter, Source, in_backward, normalise, patch_embed_grid, resolve_index


class VisionTransformerAdapter(AttentionAdapter):
    """Class-token row of one block, its rollout over all blocks, or (``class_token=False``) the
    attention each patch token receives."""

    family = "VisionTransformer"

    def __init__(self, model: nn.Module, source: Source) -> None:
        super().__init__(model, source)
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
            self.indices = [resolve_index(source, len(blocks), "blocks of model.blocks")]
        self.attns = [self._timm_attention(blocks, i) for i in self.indices]
        self.scale = float(self.attns[0].scale)
        if any(float(a.scale) != self.scale for a in self.attns):
            raise ValueError("source='rollout' needs the same attention scale in every block")

    @staticmethod
    def _timm_attention(blocks: list[nn.Module], index: int) -> nn.Module:
        from timm.layers import Attention

        attn = getattr(blocks[index], "attn", None)
        if not isinstance(attn, Attention):
            raise ValueError(
                f"model.blocks[{index}] has attention {type(attn).__name__}; the VisionTransformer adapter "
                f"reads timm.layers.Attention only (register an adapter for other block types)"
            )
        return attn

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
            if masked and not in_backward():
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
            pairs = [self._qk(i) for i in self.indices]
            self.check_grid(pairs[0][1].shape[-2] - self.num_prefix_tokens)
            rows = rollout_from_qk(
                [q for q, _ in pairs],
                [k for _, k in pairs],
                scale=self.scale,
                residual=self.rollout_residual,
                num_prefix_tokens=self.num_prefix_tokens,
            )
            return normalise(rows)
        q, k = self._qk(self.indices[0])
        self.check_grid(k.shape[-2] - self.num_prefix_tokens)
        if not self.has_class_token:
            return received_attention(q, k, scale=self.scale, num_prefix_tokens=self.num_prefix_tokens)
        row = class_attention_row(q[:, :, 0], k, scale=self.scale, num_prefix_tokens=self.num_prefix_tokens)
        return normalise(row)

    def class_query_keys(self):
        if self.source == "rollout" or not self.has_class_token:
            return None
        q, k = self._qk(self.indices[0])
        return q[:, :, 0], k, self.scale, self.num_prefix_tokens

    @classmethod
    def infer_token_grid(cls, model: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
        return patch_embed_grid(model.patch_embed, image_size)


__all__ = ["VisionTransformerAdapter"]
