"""ClassAttentionProbe on tiny random-init timm models of every supported family.

The reference for every check is timm's own naive attention path: a deep copy of the model with
``fused_attn`` switched off everywhere, where a forward hook on ``attn_drop`` (applied right after
the softmax) records the probability matrix. The probe itself runs on the untouched model.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import timm
import torch
from conftest import assert_close
from torch import nn

import transmix_kernels as tk
from transmix_kernels import probe as probe_mod
from transmix_kernels.class_attention_lambda import class_attention_row, received_attention
from tiny_models import BUILDERS, IMAGE, _images, cait, pvt, swin, vit, xcit

# The sharpened tiny models give probabilities from ~2e-4 to ~0.3 and logits up to ~10, so fp32
# rounding of the logits alone moves a probability by ~1e-6 relative; measured worst case on this
# CPU: 2.1e-7 absolute, 1.7e-6 relative (both paths fp32, same q and k).
ATOL, RTOL = 1e-6, 1e-5


# ------------------------------------------------------------------------------------------
# tiny models (built inside tests: no import-time work)
# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# the naive-path reference
# ------------------------------------------------------------------------------------------


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


def rollout(probs_per_block: list[torch.Tensor], prefix: int) -> torch.Tensor:
    """Abnar & Zuidema with the full matrices (float64): A' = 0.5 A + 0.5 I, product, row 0."""
    result = None
    for probs in probs_per_block:
        a = probs.mean(1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype)
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    row = result[:, 0, prefix:]
    return row / row.sum(-1, keepdim=True)


def _probe_attention(model, images, source="last"):
    with tk.ClassAttentionProbe(model, source=source) as probe:
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


@pytest.mark.parametrize("family", ["vit", "deit_distilled"])
def test_rollout_matches_naive(seed, family):
    model = BUILDERS[family]()
    images = _images(48)
    attn, grid = _probe_attention(model, images, "rollout")
    probs = naive_probabilities(model, images)
    prefix = model.num_prefix_tokens
    expected = rollout([probs[f"blocks.{i}.attn"] for i in range(len(model.blocks))], prefix)
    assert grid == (6, 6)
    assert_close(f"{family} rollout", attn, expected, atol=ATOL, rtol=RTOL)


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


# ------------------------------------------------------------------------------------------
# the model is untouched
# ------------------------------------------------------------------------------------------


UNCHANGED_CASES = [(family, "last") for family in BUILDERS] + [("vit", "rollout"), ("deit_distilled", "rollout")]


@pytest.mark.parametrize("family,source", UNCHANGED_CASES, ids=[f"{f}-{s}" for f, s in UNCHANGED_CASES])
def test_outputs_unchanged(seed, family, source):
    model = BUILDERS[family]()
    images = _images(IMAGE[family])
    fused = {n: m.fused_attn for n, m in model.named_modules() if hasattr(m, "fused_attn")}
    forwards = {n: m.forward for n, m in model.named_modules()}
    with torch.no_grad():
        before = model(images)
        with tk.ClassAttentionProbe(model, source=source) as probe:
            during = model(images)
            probe.attention()
        after = model(images)
    assert torch.equal(before, during) and torch.equal(before, after)
    assert fused == {n: m.fused_attn for n, m in model.named_modules() if hasattr(m, "fused_attn")}
    assert all(m.forward == forwards[n] for n, m in model.named_modules())


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", list(BUILDERS))
def test_training_step(seed, family):
    """train mode: forward, attention, backward; gradients identical to a run without the probe."""
    model = BUILDERS[family]().train()
    images = _images(IMAGE[family])
    target = torch.randint(0, 5, (images.shape[0],))

    def step():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = nn.functional.cross_entropy(model(images), target)
        return loss

    step().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with tk.ClassAttentionProbe(model) as probe:
        loss = step()
        attn = probe.attention()
        assert not attn.requires_grad and attn.grad_fn is None
        loss.backward()
        assert_close("row sums", attn.sum(-1), torch.ones(images.shape[0]), atol=1e-6)
        assert torch.equal(probe.attention(), attn)  # still readable after backward
    probed = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert plain.keys() == probed.keys()
    for name in plain:
        assert torch.equal(plain[name], probed[name]), name


def test_grad_checkpointing_recompute_does_not_replace_captures(seed):
    model = vit().train()
    model.set_grad_checkpointing(True)
    images = _images(48)
    with tk.ClassAttentionProbe(model) as probe:
        out = model(images)
        q_cls, k, _, _ = probe.class_query_keys()
        before = probe.attention().clone()
        out.sum().backward()
        q_after, k_after, _, _ = probe.class_query_keys()
        assert q_after.data_ptr() == q_cls.data_ptr() and k_after.data_ptr() == k.data_ptr()
        assert torch.equal(probe.attention(), before)


# ------------------------------------------------------------------------------------------
# lifecycle and the fused-path accessors
# ------------------------------------------------------------------------------------------


def test_attach_remove_and_context_manager(seed):
    model = vit()
    bare = _hook_count(model)
    probe = tk.ClassAttentionProbe(model)
    assert _hook_count(model) > bare and probe.attached
    with pytest.raises(RuntimeError, match="forward pass"):
        probe.attention()
    with pytest.raises(RuntimeError, match="forward pass"):
        probe.class_query_keys()
    model(_images(48))
    probe.attention()
    probe.remove()
    probe.remove()  # idempotent
    assert _hook_count(model) == bare and not probe.attached
    with pytest.raises(RuntimeError, match="removed"):
        probe.attention()
    with tk.ClassAttentionProbe(model, source=1) as probe:
        assert _hook_count(model) > bare
    assert _hook_count(model) == bare


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


@pytest.mark.parametrize("family", ["vit", "deit_distilled", "cait", "xcit"])
def test_class_query_keys(seed, family):
    model = BUILDERS[family]()
    images = _images(48)
    with tk.ClassAttentionProbe(model) as probe:
        with torch.no_grad():
            model(images)
        q_cls, k, scale, prefix = probe.class_query_keys()
        heads = 2
        assert q_cls.shape == (3, heads, 16) and k.shape == (3, heads, 36 + prefix, 16)
        assert prefix == model.num_prefix_tokens and scale == pytest.approx(16 ** -0.5)
        assert not q_cls.requires_grad and not k.requires_grad
        row = class_attention_row(q_cls, k, scale=scale, num_prefix_tokens=prefix)
        assert_close("class_attention_row(class_query_keys())", row, probe.attention(), atol=1e-7, rtol=1e-6)


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


@pytest.mark.parametrize("family,source", [("vit", "rollout"), ("pvt", "last"), ("swin", "last")])
def test_class_query_keys_is_none_without_a_class_row(seed, family, source):
    model = BUILDERS[family]()
    with tk.ClassAttentionProbe(model, source=source) as probe:
        with torch.no_grad():
            model(_images(IMAGE[family]))
        assert probe.class_query_keys() is None


# ------------------------------------------------------------------------------------------
# memory: nothing O(N^2) is held
# ------------------------------------------------------------------------------------------


def _held_tensors(root) -> list[torch.Tensor]:
    """Every tensor reachable from the probe's own objects (the model's modules excluded)."""
    found, seen, stack = [], set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, nn.Module):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, dict):
            stack.extend(itertools.chain(obj.keys(), obj.values()))
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif type(obj).__module__.startswith("transmix_kernels"):
            stack.extend(vars(obj).values())
    return found


MEMORY_CASES = [
    # (id, builder, image, source, tokens per attention row): each small enough that a head dim
    # or channel count stays below N, so an N x N buffer cannot hide behind a (N, C) one.
    ("vit-last", lambda: vit(img=96), 96, "last", 145),
    ("vit-rollout", lambda: vit(img=96), 96, "rollout", 145),
    ("cait-last", lambda: cait(img=96), 96, "last", 145),
    ("pvt-last", lambda: pvt(embed_dims=(8, 8, 16, 16)), 256, "last", 64),
    ("swin-last", lambda: swin(img=64, window=8, embed_dim=8, depths=(1, 1), num_heads=(1, 2)), 64, "last", 64),
]


@pytest.mark.parametrize("case", MEMORY_CASES, ids=[c[0] for c in MEMORY_CASES])
def test_no_quadratic_tensor_held(seed, case):
    _, build, size, source, tokens = case
    model = build()
    images = _images(size, batch=2)
    with tk.ClassAttentionProbe(model, source=source) as probe:
        with torch.no_grad():
            model(images)
        probe.attention()
        held = _held_tensors(probe)
        assert held, "the probe should hold the captured q / k views"
        quadratic = images.shape[0] * tokens * tokens * 4
        for t in held:
            big_dims = sum(1 for s in t.shape if s >= tokens)
            assert big_dims <= 1, f"held tensor of shape {tuple(t.shape)} has two token dimensions"
            assert t.untyped_storage().nbytes() < quadratic, f"held storage of {tuple(t.shape)} is O(N^2)"


# ------------------------------------------------------------------------------------------
# token grids
# ------------------------------------------------------------------------------------------

GRID_CASES = [
    ("vit-dynamic", lambda: vit(dynamic_img_size=True), (48, 64)),
    ("vit-dynamic-pad", lambda: vit(dynamic_img_size=True, dynamic_img_pad=True), (44, 60)),
    ("xcit", lambda: xcit(), (48, 80)),
    ("pvt", pvt, (96, 160)),
    ("pvt-odd", pvt, (100, 70)),
    ("swin", swin, 64),
]


@pytest.mark.parametrize("case", GRID_CASES, ids=[c[0] for c in GRID_CASES])
def test_infer_token_grid_matches_the_forward(seed, case):
    _, build, size = case
    model = build()
    images = _images(size, batch=1)
    with tk.ClassAttentionProbe(model) as probe:
        with torch.no_grad():
            model(images)
        grid = probe.token_grid
        assert probe.attention().shape == (1, grid[0] * grid[1])
    assert tk.infer_token_grid(model, tuple(images.shape[-2:])) == grid


def test_infer_token_grid_static_sizes():
    assert tk.infer_token_grid(vit(img=48), 48) == (6, 6)
    assert tk.infer_token_grid(cait(), (48, 48)) == (6, 6)
    assert tk.infer_token_grid(swin(), 64) == (4, 4)
    assert tk.infer_token_grid(pvt(), 224) == (7, 7)
    with pytest.raises(ValueError, match="image_size"):
        tk.infer_token_grid(vit(), (48,))
    with pytest.raises(TypeError, match="register_attention_family"):
        tk.infer_token_grid(nn.Linear(2, 2), 48)


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
    monkeypatch.setattr(probe_mod, "_FAMILIES", dict(probe_mod._FAMILIES))
    with pytest.raises(TypeError, match="register_attention_family"):
        tk.ClassAttentionProbe(_TinyMixer())

    @tk.register_attention_family(_TinyMixer)
    class TinyAdapter(probe_mod.AttentionAdapter):
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


def test_unknown_model_names_the_supported_families():
    with pytest.raises(TypeError) as err:
        tk.ClassAttentionProbe(nn.Sequential(nn.Linear(2, 2)))
    message = str(err.value)
    for name in ("VisionTransformer", "Cait", "Xcit", "PyramidVisionTransformerV2", "SwinTransformer",
                 "register_attention_family"):
        assert name in message
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        tk.ClassAttentionProbe("vit")


@pytest.mark.parametrize("source", ["first", "Last", 1.5, True, None, "0"])
def test_bad_source(source):
    with pytest.raises(ValueError, match="source"):
        tk.ClassAttentionProbe(vit(), source=source)


@pytest.mark.parametrize("family,source", [("vit", 3), ("vit", -4), ("cait", 2), ("xcit", -3), ("swin", 4), ("pvt", 5)])
def test_source_index_out_of_range(family, source):
    model = BUILDERS[family]()
    bare = _hook_count(model)
    with pytest.raises(ValueError, match=f"source={source} is out of range"):
        tk.ClassAttentionProbe(model, source=source)
    assert _hook_count(model) == bare  # validated before any hook


@pytest.mark.parametrize(
    "family,reason",
    [("cait", "patch blocks"), ("xcit", "channels"), ("pvt", "merge tokens"), ("swin", "windows")],
)
def test_rollout_rejected_where_undefined(family, reason):
    with pytest.raises(ValueError, match=f"rollout.*{reason}"):
        tk.ClassAttentionProbe(BUILDERS[family](), source="rollout")


def test_rollout_needs_a_class_token():
    with pytest.raises(ValueError, match="class_token=False"):
        tk.ClassAttentionProbe(vit(class_token=False, global_pool="avg"), source="rollout")


def test_non_global_layers_rejected():
    # window 2 on a 4x4 last stage: four windows.
    with pytest.raises(ValueError, match=r"not global: its 4x4 tokens are split into 2x2 windows; .*\[\]"):
        tk.ClassAttentionProbe(swin(window=2))
    with pytest.raises(ValueError, match=r"not global.*one global window at the model's img_size: \[2, 3\]"):
        tk.ClassAttentionProbe(swin(), source=0)
    with pytest.raises(ValueError, match=r"sr_ratio 8 > 1.*blocks with global attention: \[3, 4\]"):
        tk.ClassAttentionProbe(pvt(), source=0)
    with pytest.raises(ValueError, match="linear attention"):
        tk.ClassAttentionProbe(pvt(linear=True))


def test_swin_input_with_several_windows_is_an_error_at_read_time(seed):
    model = swin(strict_img_size=False)
    with tk.ClassAttentionProbe(model) as probe:
        with torch.no_grad():
            model(_images(128, batch=1))  # last stage 8x8 with window 4: four windows
        with pytest.raises(RuntimeError, match="not global"):
            probe.attention()


def test_masked_vit_attention_is_an_error_at_read_time(seed):
    model = vit()
    with tk.ClassAttentionProbe(model) as probe:
        with torch.no_grad():
            model.forward_features(_images(48), attn_mask=torch.zeros(37, 37))
        with pytest.raises(RuntimeError, match="attention mask"):
            probe.attention()
