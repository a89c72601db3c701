"""Plain PyTorch twins of every fast op: same signatures, written for clarity, not speed.

They follow the official TransMix code: a full (B, 1, H, W) pixel mask, a full partner copy of
the batch, the token mask by ``F.interpolate(mode="nearest")`` and separate sums. Tests and
benchmarks compare the fused kernels against these. Inputs are assumed valid: the public ops
validate before dispatching here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import flipped_partner

__all__ = [
    "attention_rollout",
    "box_pixel_mask",
    "class_attention_lambda",
    "class_attention_row",
    "cutmix_paste",
    "draw_box_randoms",
    "mask_paste",
    "mix_targets",
    "rollout_from_qk",
    "sample_boxes",
    "transmix_lambda",
]


def draw_box_randoms(
    batch: int, device: torch.device, minmax: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """Uniform [0, 1) float64 draws that place the boxes: (2, B) centres, or (4, B) sizes + corners.

    The fast path (``boxes.sample_boxes``) and this twin consume the same draws, so one generator
    state gives the same boxes in both.
    """
    return torch.rand((4 if minmax else 2, batch), generator=generator, device=device, dtype=torch.float64)


def sample_boxes(
    lam: torch.Tensor,
    height: int,
    width: int,
    *,
    minmax: tuple[float, float] | None = None,
    correct_lam: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's rand_bbox / rand_bbox_minmax, one sample at a time, from the same random draws."""
    batch = lam.shape[0]
    draws = draw_box_randoms(batch, lam.device, minmax is not None, generator)
    rows, lam_area = [], []
    for b in range(batch):
        if minmax is None:
            # Arithmetic in lam's own precision, as timm does (float64 per batch, float32 per element).
            ratio = torch.sqrt(1 - lam[b])
            cut_h, cut_w = int(height * ratio), int(width * ratio)
            cy = int(draws[0][b] * height)
            cx = int(draws[1][b] * width)
            y0, y1 = min(max(cy - cut_h // 2, 0), height), min(max(cy + (cut_h + 1) // 2, 0), height)
            x0, x1 = min(max(cx - cut_w // 2, 0), width), min(max(cx + (cut_w + 1) // 2, 0), width)
        else:
            lo_h, hi_h = int(height * minmax[0]), int(height * minmax[1])
            lo_w, hi_w = int(width * minmax[0]), int(width * minmax[1])
            cut_h = lo_h + int(draws[0][b] * (hi_h - lo_h))
            cut_w = lo_w + int(draws[1][b] * (hi_w - lo_w))
            y0 = int(draws[2][b] * (height - cut_h + 1))
            x0 = int(draws[3][b] * (width - cut_w + 1))
            y1, x1 = y0 + cut_h, x0 + cut_w
        rows.append([y0, y1, x0, x1])
        if correct_lam or minmax is not None:
            lam_area.append(1.0 - (y1 - y0) * (x1 - x0) / float(height * width))
        else:
            lam_area.append(float(lam[b]))
    boxes = torch.tensor(rows, dtype=torch.int32, device=lam.device).view(batch, 4)
    return boxes, torch.tensor(lam_area, dtype=torch.float64, device=lam.device).float()


def box_pixel_mask(boxes: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """(B, 1, H, W) bool: True inside each sample's half-open box [y0, y1) x [x0, x1)."""
    boxes = boxes.expand(batch, 4) if boxes.dim() == 1 else boxes
    ys = torch.arange(height, device=boxes.device).view(1, height, 1)
    xs = torch.arange(width, device=boxes.device).view(1, 1, width)
    y0, y1, x0, x1 = (boxes[:, i].long().view(-1, 1, 1) for i in range(4))
    return ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)).unsqueeze(1)


def cutmix_paste(
    images: torch.Tensor,
    boxes: torch.Tensor,
    partner: torch.Tensor | None = None,
    *,
    token_grid: tuple[int, int] | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Official-style paste: a full partner copy of the batch and a full pixel mask."""
    batch, _, height, width = images.shape
    if partner is None:
        partner = flipped_partner(batch, images.device)
    mask = box_pixel_mask(boxes, batch, height, width)
    mixed = torch.where(mask, images[partner], images)
    token_mask = None
    if token_grid is not None:
        token_mask = F.interpolate(mask.float(), size=tuple(token_grid), mode="nearest").flatten(1)
    if inplace:
        images.copy_(mixed)
        mixed = images
    return mixed, token_mask


def mask_paste(
    images: torch.Tensor,
    mask: torch.Tensor,
    partner: torch.Tensor | None = None,
    *,
    token_grid: tuple[int, int] | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Paste from a (B, gh, gw) cell mask, official style: pixel (y, x) takes the value of cell
    (y // (H // gh), x // (W // gw)) in a full (B, 1, H, W) pixel mask, a full partner copy of the
    batch is selected under it, and the token mask is the nearest resize of the pixel mask."""
    batch, _, height, width = images.shape
    if partner is None:
        partner = flipped_partner(batch, images.device)
    cell_rows = torch.arange(height, device=images.device) // (height // mask.shape[1])
    cell_cols = torch.arange(width, device=images.device) // (width // mask.shape[2])
    pixel_mask = (mask != 0)[:, cell_rows][:, :, cell_cols].unsqueeze(1)
    mixed = torch.where(pixel_mask, images[partner], images)
    if inplace:
        mixed = images.copy_(mixed)
    if token_grid is None:
        return mixed, None
    return mixed, F.interpolate(pixel_mask.float(), size=tuple(token_grid), mode="nearest").flatten(1)


def transmix_lambda(
    attn: torch.Tensor,
    token_mask: torch.Tensor,
    lam_area: torch.Tensor,
    *,
    ratio: float = 0.5,
) -> torch.Tensor:
    """lam = ratio * lam_area + (1 - ratio) * (attention share outside the box), per sample.

    A row whose attention mass is zero or not finite carries no information: lam_attn falls
    back to lam_area there.
    """
    a = attn.float()
    if a.dim() == 3:
        a = a.mean(1)
    m = token_mask.float()
    outside = (a * (1.0 - m)).sum(1)
    mass = a.sum(1)
    lam_area = lam_area.float()
    usable = torch.isfinite(mass) & (mass > 0) & torch.isfinite(outside)
    lam_attn = torch.where(usable, outside / torch.where(usable, mass, torch.ones_like(mass)), lam_area)
    return ratio * lam_area + (1.0 - ratio) * lam_attn


def mix_targets(
    target: torch.Tensor,
    lam: torch.Tensor,
    num_classes: int,
    *,
    partner: torch.Tensor | None = None,
    smoothing: float = 0.1,
) -> torch.Tensor:
    """timm's mixup_target with a per-sample lam: lam * y1 + (1 - lam) * y1[partner]."""
    batch = target.shape[0]
    if partner is None:
        partner = flipped_partner(batch, target.device)
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    y1 = torch.full((batch, num_classes), off, device=target.device).scatter_(1, target.view(-1, 1), on)
    y2 = y1[partner]
    # (1 - lam) in lam's own precision, then float32: bit-identical to timm for float64 lam.
    lam_self = lam.float().view(-1, 1)
    lam_other = (1 - lam).float().view(-1, 1)
    return y1 * lam_self + y2 * lam_other


def _class_attention_probs(q_cls: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, heads, N_total) softmax(q_cls k^T * scale), at least float32 (float64 stays float64)."""
    dtype = torch.promote_types(k.dtype, torch.float32)
    logits = torch.einsum("bhd,bhnd->bhn", q_cls.to(dtype), k.to(dtype)) * scale
    return torch.softmax(logits, dim=-1)


def class_attention_lambda(
    q_cls: torch.Tensor,
    k: torch.Tensor,
    token_mask: torch.Tensor,
    lam_area: torch.Tensor,
    *,
    scale: float,
    num_prefix_tokens: int = 1,
    ratio: float = 0.5,
) -> torch.Tensor:
    """Materialise the class-token attention row, drop the prefix tokens, then transmix_lambda."""
    attn = _class_attention_probs(q_cls, k, scale)[..., num_prefix_tokens:]
    return transmix_lambda(attn, token_mask, lam_area, ratio=ratio)


def class_attention_row(
    q_cls: torch.Tensor, k: torch.Tensor, *, scale: float, num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Head mean of the class-to-patch probabilities, renormalised over the patch tokens."""
    a = _class_attention_probs(q_cls, k, scale)[..., num_prefix_tokens:].mean(1)
    return (a / a.sum(-1, keepdim=True)).float()


def rollout_from_qk(
    queries,
    keys,
    *,
    scale: float,
    residual: float = 0.5,
    num_prefix_tokens: int = 1,
    attn_bias=None,
) -> torch.Tensor:
    """Attention rollout the textbook way: full (N, N) matrices, multiplied as matrices.

    A'_l = (1 - residual) * mean_h softmax(q_l k_l^T * scale + bias_l) + residual * I, rows
    renormalised; R = A'_L @ ... @ A'_1; the class token's row of R on the patch columns,
    renormalised over the patches.
    """
    dtype = torch.promote_types(keys[0].dtype, torch.float32)
    rollout = None
    for layer, (q, k) in enumerate(zip(queries, keys)):
        logits = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
        if attn_bias is not None and attn_bias[layer] is not None:
            logits = logits + attn_bias[layer].to(dtype)
        attn = torch.softmax(logits, dim=-1).mean(1)
        eye = torch.eye(attn.shape[-1], dtype=dtype, device=attn.device)
        mixed = (1.0 - residual) * attn + residual * eye
        mixed = mixed / mixed.sum(-1, keepdim=True)
        rollout = mixed if rollout is None else torch.matmul(mixed, rollout)
    row = rollout[:, 0, num_prefix_tokens:]
    return (row / row.sum(-1, keepdim=True)).float()


def attention_rollout(
    attentions,
    *,
    residual: float = 0.5,
    head_fusion: str = "mean",
    num_prefix_tokens: int = 1,
    full: bool = False,
) -> torch.Tensor:
    """Attention rollout as Abnar & Zuidema's code does it: every layer as a full (B, N, N) matrix,
    the product built up block by block (rollout_l = A'_l @ rollout_{l-1}), the class row taken last.

    A_l = fusion over heads; A'_l = (1 - residual) * A_l + residual * I with rows renormalised;
    R = A'_L @ ... @ A'_1; map = R[:, 0, num_prefix_tokens:] renormalised over the patches.
    float64 inputs are kept in float64 (the tests' high-precision reference); the result is float32.
    """
    dtype = torch.promote_types(attentions[0].dtype, torch.float32)
    fuse = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}[head_fusion]
    rollout = None
    for attention in attentions:
        fused = fuse(attention.to(dtype))
        eye = torch.eye(fused.shape[-1], dtype=dtype, device=fused.device)
        mixed = (1.0 - residual) * fused + residual * eye
        mixed = mixed / mixed.sum(-1, keepdim=True)
        rollout = mixed if rollout is None else torch.bmm(mixed, rollout)
    if full:
        return rollout.float()
    row = rollout[:, 0, num_prefix_tokens:]
    return (row / row.sum(-1, keepdim=True)).float()
