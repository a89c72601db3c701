"""Tiny random-init timm models of the five supported families (shared by the model tests).

Built inside tests (no import-time work). q/k weights are sharpened so attention is far from
uniform: a wrong head average or prefix would otherwise hide in near-uniform rows.
"""

from __future__ import annotations

import timm
import torch
from timm.models.pvt_v2 import PyramidVisionTransformerV2
from torch import nn


def _sharpen(model: nn.Module) -> nn.Module:
    """Scale the q / k projections: timm's init (std 0.02) gives near-uniform attention, which
    would let a wrong head average or a wrong prefix slip through."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ("qkv", "q", "k", "kv"):
                module.weight.mul_(12.0)
    return model.eval()


def _timm(name: str, **kwargs) -> nn.Module:
    return _sharpen(timm.create_model(name, pretrained=False, num_classes=5, **kwargs))


def vit(img=48, **kw):
    args = dict(img_size=img, patch_size=8, embed_dim=32, depth=3, num_heads=2)
    return _timm("vit_tiny_patch16_224", **{**args, **kw})


def deit_distilled(img=48):
    return _timm("deit_tiny_distilled_patch16_224", img_size=img, patch_size=8, embed_dim=32, depth=3, num_heads=2)


def cait(img=48):
    return _timm("cait_xxs24_224", img_size=img, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def xcit(img=48):
    return _timm("xcit_nano_12_p8_224", img_size=img, embed_dim=32, depth=1, num_heads=2)


def pvt(**kw):
    args = dict(depths=(1, 1, 1, 2), embed_dims=(8, 8, 16, 16), num_heads=(1, 1, 2, 2), mlp_ratios=(2, 2, 2, 2))
    return _sharpen(PyramidVisionTransformerV2(num_classes=5, **{**args, **kw}))


def swin(img=64, window=4, **kw):
    # 64 px, patch 4: stages at 16x16, 8x8, 4x4; window 4 makes the last stage one window.
    args = dict(img_size=img, window_size=window, embed_dim=16, depths=(1, 1, 2), num_heads=(1, 2, 2))
    return _timm("swin_tiny_patch4_window7_224", **{**args, **kw})


BUILDERS = {"vit": vit, "deit_distilled": deit_distilled, "cait": cait, "xcit": xcit, "pvt": pvt, "swin": swin}
IMAGE = {"vit": 48, "deit_distilled": 48, "cait": 48, "xcit": 48, "pvt": 96, "swin": 64}


def _images(size, batch=3) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, h, w)
