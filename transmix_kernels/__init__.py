"""transmix-kernels: fused, exact TransMix for timm vision transformers.

TransMix (Chen et al., CVPR 2022) is CutMix whose label weights are re-weighted by the
transformer's own class attention on the mixed image::

    lam_attn[b] = sum_j a[b, j] * (1 - m[b, j]) / sum_j a[b, j]
    lam[b]      = ratio * lam_area[b] + (1 - ratio) * lam_attn[b]

Every op takes ``impl="auto" | "triton" | "torch" | "reference"``.
"""

from . import reference

# Mixing: boxes, paste, label weights, and the timm-Mixup drop-in.
from .boxes import sample_boxes
from .cutmix_paste import cutmix_paste
from .mask_paste import mask_paste
from .transmix_lambda import mix_targets, transmix_lambda, transmix_targets
from .mixer import MixState, TransMix
from .mixpro import MixPro, MixProState
from .tokenmix import TokenMix, TokenMixState

# Attention: the probe on timm models, the fused class-attention lambda, rollout.
from .class_attention_lambda import class_attention_lambda, class_attention_row
from .qk_rollout import rollout_from_qk
from .rollout import attention_rollout
from .probe import ClassAttentionProbe, infer_token_grid, register_attention_family

# `tk.info()`: versions, backends and how the extension was built (`python -m transmix_kernels.info`).
from ._info import info

__version__ = "0.1.0"

__all__ = [
    "ClassAttentionProbe",
    "MixPro",
    "MixProState",
    "MixState",
    "TokenMix",
    "TokenMixState",
    "TransMix",
    "attention_rollout",
    "class_attention_lambda",
    "class_attention_row",
    "cutmix_paste",
    "infer_token_grid",
    "info",
    "mask_paste",
    "mix_targets",
    "reference",
    "register_attention_family",
    "rollout_from_qk",
    "sample_boxes",
    "transmix_lambda",
    "transmix_targets",
]
