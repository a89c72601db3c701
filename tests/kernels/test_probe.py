"""ClassAttentionProbe against timm's own naive attention path, on tiny random-init timm models of
every supported family.

The reference is a deep copy of the model with ``fused_attn`` switched off everywhere, where a
forward hook on ``attn_drop`` (applied right after the softmax) records the probability matrix.
The probe itself runs on the untouched model.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import assert_close
from torch import nn

import transmix_kernels as tk
from transmix_kernels.class_attention_lambda import class_attention_row, received_attention
from transmix_kernels.probe import base as probe_base
from tiny_models import BUILDERS, IMAGE, _images, pvt, swin, vit

# The sharpened tiny models give probabilities from ~2e-4 to ~0.3 and logits up to ~10, so fp32
# rounding of the logits alone moves a probability by ~1e-6 relative; measured worst case on this
# CPU: 2.1e-7 absolute, 1.7e-6 relative (both paths fp32, same q and k).
ATOL, RTOL = 1e-6, 1e-5


def naive_probabilities(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """{attention module name: (B*, heads, N_query, N_key) softmax output} from timm's naive path."""
    naive = copy.deepcopy(model)
    recorded: dict[str, torch.Tensor] = {}
    switched = 0
    for name, module in naive.named_modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
            switched += 1
            module.attn_drop.register_forward_hook(
                lambda _m, _args, out, name=name: recorded.__setitem__(name, out.detach().double())
            )
    assert switched, "no attention module found"
    with torch.no_grad():
        naive_out = naive(images)
        fused_out = model(images)
    # Same model on both paths: the naive copy is a faithful stand-in.
    assert_close("naive vs fused logits", naive_out, fused_out, atol=1e-5, rtol=1e-5)
    return recorded


def class_row(probs: torch.Tensor, prefix: int) -> torch.Tensor:
    row = probs[:, :, 0, prefix:].mean(1)
    return row / row.sum(-1, keepdim=True)


def received(probs: torch.Tensor, prefix: int = 0) -> torch.Tensor:
    got = probs[:, :, prefix:, prefix:].mean(dim=(1, 2))
    return got / got.sum(-1, keepdim=True)


def rollout(probs_per_block: list[torch.Tensor], prefix: int, residual: float = 0.5) -> torch.Tensor:
    """Abnar & Zuidema with the full matrices (float64): A' = (1 - r) A + r I, product, row 0."""
    result = None
    for probs in probs_per_block:
        a = probs.mean(1)
        a = (1 - residual) * a + residual * torch.eye(a.shape[-1], dtype=a.dtype)
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    row = result[:, 0, prefix:]
    return row / row.sum(-1, keepdim=True)


def _probe_attention(model, images, source="last", **options):
    with tk.ClassAttentionProbe(model, source=source, **options) as probe:
        with torch.no_grad():
            model(images)
        return probe.attention(), probe.token_grid


# ------------------------------------------------------------------------------------------
# exactness vs the naive path
# ------------------------------------------------------------------------------------------

CLASS_CASES = [
    # (family, source, naive module name, num_prefix_tokens)
    ("vit", "last", "blocks.2.attn", 1),
    ("vit", 0, "blocks.0.attn", 1),
    ("vit", -2, "blocks.1.attn", 1),
    ("deit_distilled", "last", "blocks.2.attn", 2),
    ("deit_distilled", 1, "blocks.1.attn", 2),
    ("cait", "last", "blocks_token_only.1.attn", 1),
    ("cait", 0, "blocks_token_only.0.attn", 1),
    ("xcit", "last", "cls_attn_blocks.1.attn", 1),
    ("xcit", -2, "cls_attn_blocks.0.attn", 1),
]


@pytest.mark.parametrize("family,source,name,prefix", CLASS_CASES, ids=[f"{c[0]}-{c[1]}" for c in CLASS_CASES])
def test_class_token_row_matches_naive(seed, family, source, name, prefix):
    model = BUILDERS[family]()
    images = _images(IMAGE[family])
    attn, grid = _probe_attention(model, images, source)
    expected = class_row(naive_probabilities(model, images)[name], prefix)
    assert attn.dtype == torch.float32 and not attn.requires_grad
    assert grid == (6, 6)
    assert_close(f"{family} {source} class row", attn, expected, atol=ATOL, rtol=RTOL)
    assert_close("row sums", attn.sum(-1), torch.ones(attn.shape[0]), atol=1e-6)


def _swin_shifted_global():
    # always_partition keeps the window at 4 and the shift at 2 even where one window covers the
    # 4x4 stage: the last stage then attends within one shifted window under timm's shift mask.
    return swin(always_partition=True)


RECEIVED_CASES = [
    # (id, builder, image size, probe source, naive module name, prefix, expected grid, shift)
    ("pvt-last", pvt, 96, "last", "stages.3.blocks.1.attn", 0, (3, 3), None),
    ("pvt-4", pvt, (96, 128), 3, "stages.3.blocks.0.attn", 0, (3, 4), None),
    ("swin-last", swin, 64, "last", "layers.2.blocks.1.attn", 0, (4, 4), None),
    ("swin-2", swin, 64, 2, "layers.2.blocks.0.attn", 0, (4, 4), None),
    ("swin-shifted-window", _swin_shifted_global, 64, "last", "layers.2.blocks.1.attn", 0, (4, 4), (2, 2)),
    ("vit-no-class-token", lambda: vit(class_token=False, reg_tokens=2, global_pool="avg"), 48, "last",
     "blocks.2.attn", 2, (6, 6), None),
]


@pytest.mark.parametrize("case", RECEIVED_CASES, ids=[c[0] for c in RECEIVED_CASES])
def test_received_attention_matches_naive(seed, case):
    _, build, size, source, name, prefix, grid, shift = case
    model = build()
    images = _images(size)
    attn, token_grid = _probe_attention(model, images, source)
    probs = naive_probabilities(model, images)[name]
    assert probs.shape[0] == images.shape[0], "the probed layer must be a single window"
    expected = received(probs, prefix)
    if shift is not None:  # the naive matrix is in shifted-window order; timm rolls back by +shift
        expected = expected.view(-1, *grid).roll(shifts=shift, dims=(1, 2)).reshape(expected.shape[0], -1)
    assert token_grid == grid
    assert_close(f"{case[0]} received attention", attn, expected, atol=ATOL, rtol=RTOL)


def test_swin_single_window_drops_the_shift():
    """timm clamps the window to a 4x4 stage and sets its shift to 0, so no mask is applied."""
    model = swin()
    last = model.layers[-1].blocks[-1]
    assert tuple(last.window_size) == (4, 4) and tuple(last.shift_size) == (0, 0) and last.attn_mask is None
    shifted = _swin_shifted_global().layers[-1].blocks[-1]
    assert tuple(shifted.shift_size) == (2, 2) and shifted.attn_mask is not None


ROLLOUT_CASES = [("vit", None), ("deit_distilled", None), ("vit", 0.0), ("vit", 0.8)]


@pytest.mark.parametrize("family,residual", ROLLOUT_CASES, ids=[f"{f}-residual-{r}" for f, r in ROLLOUT_CASES])
def test_rollout_matches_naive(seed, family, residual):
    """None: the default, the paper's 0.5; 0 is the plain attention product."""
    model = BUILDERS[family]()
    images = _images(48)
    options = {} if residual is None else {"rollout_residual": residual}
    attn, grid = _probe_attention(model, images, "rollout", **options)
    probs = naive_probabilities(model, images)
    prefix = model.num_prefix_tokens
    blocks = [probs[f"blocks.{i}.attn"] for i in range(len(model.blocks))]
    expected = rollout(blocks, prefix, 0.5 if residual is None else residual)
    assert grid == (6, 6)
    assert_close(f"{family} rollout (residual {residual})", attn, expected, atol=ATOL, rtol=RTOL)
    if residual is not None:  # the parameter reaches the math: another residual is another map
        other = rollout(blocks, prefix, 0.5)
        assert float((other - expected).abs().max()) > 100 * ATOL


def test_received_attention_chunking_is_exact(seed):
    model = pvt()
    with tk.ClassAttentionProbe(model) as probe:
        with torch.no_grad():
            model(_images(128))
        q, k = probe._adapter.need("q"), probe._adapter.need("k")
        whole = probe.attention()
    # 3 samples * 2 heads * 16 keys = 96 elements per query row: 100 makes one query per chunk.
    chunked = received_attention(q, k, scale=probe._adapter.scale, max_chunk_elements=100)
    assert_close("chunked received attention", chunked, whole, atol=1e-7, rtol=1e-6)


def test_each_forward_replaces_the_capture(seed):
    model = vit()
    first, second = _images(48, batch=2), _images(48, batch=4)
    with tk.ClassAttentionProbe(model) as probe:
        with torch.no_grad():
            model(first)
            a_first = probe.attention()
            model(second)
            a_second = probe.attention()
    assert a_first.shape == (2, 36) and a_second.shape == (4, 36)
    expected = class_row(naive_probabilities(model, second)["blocks.2.attn"], 1)
    assert_close("second forward", a_second, expected, atol=ATOL, rtol=RTOL)


def test_bfloat16_autocast_is_computed_in_float32(seed):
    model = vit()
    with tk.ClassAttentionProbe(model) as probe:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(_images(48))
            attn = probe.attention()  # read inside the autocast region on purpose
        q_cls, k, scale, prefix = probe.class_query_keys()
    assert q_cls.dtype == torch.bfloat16 and attn.dtype == torch.float32
    logits = torch.einsum("bhd,bhnd->bhn", q_cls.double(), k.double()) * scale
    expected = logits.softmax(-1)[:, :, prefix:].mean(1)
    expected = expected / expected.sum(-1, keepdim=True)
    assert_close("bf16 q/k, fp32 attention", attn, expected, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------------------
# registry and bad input
# ------------------------------------------------------------------------------------------


class _TinyMixer(nn.Module):
    """Not a timm model: a class token and one timm Attention, for the registry test."""

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 16, 8, stride=8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 16))
        self.attn = timm.layers.Attention(16, num_heads=2)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.attn(x)[:, 0]


def test_register_attention_family(seed, monkeypatch):
    monkeypatch.setattr(probe_base, "_FAMILIES", dict(probe_base._FAMILIES))
    with pytest.raises(TypeError, match="register_attention_family"):
        tk.ClassAttentionProbe(_TinyMixer())

    @tk.register_attention_family(_TinyMixer)
    class TinyAdapter(tk.probe.AttentionAdapter):
        family = "TinyMixer"

        def attach(self):
            return [
                self.hook_forward_start(self.model.patch_embed),
                self.hook_output(self.model.attn.q_norm, "q", lambda t: t),
                self.hook_output(self.model.attn.k_norm, "k", lambda t: t),
            ]

        def compute(self):
            q, k = self.need("q"), self.need("k")
            self.check_grid(k.shape[-2] - 1)
            return class_attention_row(q[:, :, 0], k, scale=self.model.attn.scale)

        @classmethod
        def infer_token_grid(cls, model, image_size):
            return image_size[0] // 8, image_size[1] // 8

    model = _TinyMixer().eval()
    images = _images(32)
    with tk.ClassAttentionProbe(model) as probe:
        with torch.no_grad():
            model(images)
        assert probe.family == "TinyMixer" and probe.token_grid == (4, 4)
        attn = probe.attention()
    expected = class_row(naive_probabilities(model, images)["attn"], 1)
    assert_close("registered family", attn, expected, atol=ATOL, rtol=RTOL)
    with pytest.raises(TypeError, match="AttentionAdapter"):
        tk.register_attention_family(_TinyMixer, object)
    with pytest.raises(TypeError, match="model_type"):
        tk.register_attention_family("VisionTransformer", TinyAdapter)
