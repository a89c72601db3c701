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
  token *receives* (:func:`transmix_kernels.class_attention_lambda.received_attention`);
- ``source="rollout"`` (ViT / DeiT): the class-token row of attention rollout over all blocks
  (:func:`transmix_kernels.qk_rollout.rollout_from_qk`).

One module per family says what an int ``source`` counts there: :mod:`.vit` (ViT / DeiT),
:mod:`.class_attn` (CaiT, XCiT), :mod:`.pvt` (PVTv2), :mod:`.swin` (Swin). Other architectures:
subclass :class:`AttentionAdapter` (:mod:`.base`) and register it with
:func:`register_attention_family`; the five families are registered the same way.

The probe class and :func:`infer_token_grid` are :mod:`.probe`; this ``__init__`` registers the
timm families and re-exports.

Example::

    with tk.ClassAttentionProbe(model) as probe:
        logits = model(images)
        attn = probe.attention()          # (B, gh * gw) float32, rows sum to 1
        gh, gw = probe.token_grid
"""

from __future__ import annotations

from ..class_attention_lambda import received_attention
from .base import AttentionAdapter, register_attention_family
from .class_attn import CaitAdapter, XcitAdapter
from .probe import ClassAttentionProbe, infer_token_grid
from .pvt import PvtV2Adapter
from .swin import SwinAdapter
from .vit import VisionTransformerAdapter


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


__all__ = [
    "AttentionAdapter",
    "ClassAttentionProbe",
    "infer_token_grid",
    "received_attention",
    "register_attention_family",
]
