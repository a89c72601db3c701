"""ClassAttentionProbe's contract on tiny timm models: the model is untouched, training and
checkpointing work, nothing O(N^2) is held, token grids, lifecycle, and bad input."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import assert_close
from torch import nn

import transmix_kernels as tk
from transmix_kernels.class_attention_lambda import class_attention_row
from tiny_models import BUILDERS, IMAGE, _images, cait, pvt, swin, vit, xcit


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


def test_model_without_class_attention_blocks():
    model = cait()
    model.blocks_token_only = nn.ModuleList()
    with pytest.raises(ValueError, match="no class-attention blocks of model.blocks_token_only"):
        tk.ClassAttentionProbe(model)


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


BAD_RESIDUALS = [
    (1.0, ValueError, "below 1"),
    (-0.1, ValueError, r"rollout_residual must be in \[0.0, 1.0\]"),
    (float("nan"), ValueError, "rollout_residual"),
    ("0.5", TypeError, "rollout_residual must be a number"),
    (True, TypeError, "rollout_residual must be a number"),
]


@pytest.mark.parametrize("value,error,match", BAD_RESIDUALS, ids=[repr(v[0]) for v in BAD_RESIDUALS])
def test_bad_rollout_residual(value, error, match):
    model = vit()
    bare = _hook_count(model)
    with pytest.raises(error, match=match):
        tk.ClassAttentionProbe(model, source="rollout", rollout_residual=value)
    assert _hook_count(model) == bare  # validated before any hook


def test_rollout_residual_is_kept_and_shown():
    with tk.ClassAttentionProbe(vit(), "rollout", rollout_residual=0.25) as probe:
        assert probe.rollout_residual == 0.25 and "rollout_residual=0.25" in repr(probe)
    with tk.ClassAttentionProbe(vit()) as probe:
        assert probe.rollout_residual == 0.5 and "rollout_residual" not in repr(probe)


def _qk(batch=2, heads=2, tokens=5, dim=4, dtype=torch.float32):
    return torch.randn(batch, heads, tokens, dim, dtype=dtype), torch.randn(batch, heads, tokens, dim, dtype=dtype)


BAD_RECEIVED = [
    ("q-not-a-tensor", lambda q, k: dict(q=q.tolist(), k=k, scale=0.5), TypeError, "q must be a torch.Tensor"),
    ("q-3d", lambda q, k: dict(q=q[0], k=k, scale=0.5), ValueError, "q must have 4 dimensions"),
    ("q-int", lambda q, k: dict(q=q.long(), k=k, scale=0.5), TypeError, "q must have dtype"),
    ("dtype-mismatch", lambda q, k: dict(q=q.half(), k=k, scale=0.5), TypeError, r"k must have dtype in \(float16\)"),
    ("heads-mismatch", lambda q, k: dict(q=q[:, :1], k=k, scale=0.5), ValueError, "k must have the shape of q"),
    ("tokens-mismatch", lambda q, k: dict(q=q[:, :, :3], k=k, scale=0.5), ValueError, "k must have the shape of q"),
    ("scale", lambda q, k: dict(q=q, k=k, scale=0.0), ValueError, "scale must be a positive"),
    ("prefix", lambda q, k: dict(q=q, k=k, scale=0.5, num_prefix_tokens=5), ValueError, "num_prefix_tokens"),
    ("addends", lambda q, k: dict(q=q, k=k, scale=0.5, logit_addends=[q]), TypeError, "logit_addends must be"),
    ("chunk", lambda q, k: dict(q=q, k=k, scale=0.5, max_chunk_elements=0), ValueError, "max_chunk_elements"),
]


@pytest.mark.parametrize("case", BAD_RECEIVED, ids=[c[0] for c in BAD_RECEIVED])
def test_received_attention_bad_input(case):
    _, make, error, match = case
    with pytest.raises(error, match=match):
        tk.probe.received_attention(**make(*_qk()))


@pytest.mark.parametrize("prefix", [0, 2], ids=["no-prefix", "prefix-2"])
def test_received_attention_with_addends_matches_float64(seed, prefix):
    """Odd sizes, a bias added to the logits, every query a chunk of its own."""
    q, k = _qk(batch=3, heads=3, tokens=7, dim=5, dtype=torch.bfloat16)
    bias = torch.randn(3, 7, 7)
    got = tk.probe.received_attention(
        q, k, scale=0.4, num_prefix_tokens=prefix, logit_addends=lambda a, b: [bias[:, a:b]], max_chunk_elements=1
    )
    probs = ((q.double() * 0.4) @ k.double().transpose(-2, -1) + bias.double()).softmax(-1)
    want = probs[:, :, prefix:, prefix:].mean(dim=(1, 2))
    assert_close("received attention", got, want / want.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)
