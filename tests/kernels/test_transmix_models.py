"""A TransMix training step on unmodified timm models of every family: mix, forward with the
probe (fused attention left on), attention-weighted targets, backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, assert_equal
from timm.loss import SoftTargetCrossEntropy
from tiny_models import BUILDERS, IMAGE, _images

import transmix_kernels as tk
from transmix_kernels import reference

NUM_CLASSES = 5


def _fused_flags(model):
    return {name: module.fused_attn for name, module in model.named_modules() if hasattr(module, "fused_attn")}


@pytest.mark.parametrize("mode", ["batch", "elem"])
@pytest.mark.parametrize("family", list(BUILDERS))
def test_transmix_training_step(seed, family, mode):
    model = BUILDERS[family]().train()
    fused_before = _fused_flags(model)
    images = _images(IMAGE[family], batch=4)
    labels = torch.randint(0, NUM_CLASSES, (4,))
    # The token grid comes from the model (patch embedding or last global stage).
    transmix = tk.TransMix(NUM_CLASSES, mixup_alpha=0.0, cutmix_alpha=1.0, mode=mode, model=model, seed=3)
    original = images.clone()
    mixed, mix = transmix(images, labels)
    assert mixed is images and mix.kind == "cutmix"
    assert_equal("pasted images", mixed, reference.cutmix_paste(original, mix.boxes, mix.partner)[0])

    with tk.ClassAttentionProbe(model) as probe:
        logits = model(mixed)
        targets = mix.targets(probe)
        attention = probe.attention()
        grid = probe.token_grid
        assert mix.token_grid == grid, "TransMix inferred a grid the model does not use"

    # The paper's rule, re-derived here: pixel box mask -> nearest resize to the model's grid,
    # A's attention share w1 / (w1 + w2), blended half and half with the area share.
    height, width = mixed.shape[-2:]
    ys, xs = torch.arange(height).view(1, -1, 1), torch.arange(width).view(1, 1, -1)
    b = mix.boxes.long()
    pixel = ((ys >= b[:, 0, None, None]) & (ys < b[:, 1, None, None]) & (xs >= b[:, 2, None, None])
             & (xs < b[:, 3, None, None])).float().unsqueeze(1)
    token = F.interpolate(pixel, size=grid, mode="nearest").flatten(1)
    w1, w2 = (attention * (1 - token)).sum(1), (attention * token).sum(1)
    area = 1 - pixel.flatten(1).mean(1)
    lam = 0.5 * area + 0.5 * w1 / (w1 + w2)
    off = 0.1 / NUM_CLASSES
    onehot = torch.full((4, NUM_CLASSES), off).scatter_(1, labels.view(-1, 1), 1 - 0.1 + off)
    want = lam.view(-1, 1) * onehot + (1 - lam.view(-1, 1)) * onehot[mix.partner]
    assert_close("targets", targets, want, atol=2e-6)
    assert_close("target rows sum to 1", targets.sum(1), torch.ones(4), atol=1e-6)

    loss = SoftTargetCrossEntropy()(logits, targets)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    assert _fused_flags(model) == fused_before, "the attention path of the model was switched"


def test_targets_from_a_probe_that_does_not_match_the_mix(seed):
    model = BUILDERS["vit"]().train()
    images = _images(IMAGE["vit"], batch=4)
    labels = torch.randint(0, NUM_CLASSES, (4,))
    transmix = tk.TransMix(NUM_CLASSES, mixup_alpha=0.0, cutmix_alpha=1.0, model=model, seed=0)
    mixed, mix = transmix(images, labels)
    with tk.ClassAttentionProbe(model) as probe:
        with pytest.raises(RuntimeError, match="no forward pass"):
            mix.targets(probe)
        model(_images(IMAGE["vit"], batch=3))  # another batch size
        with pytest.raises(ValueError, match="batch size 3 but this MixState mixed 4"):
            mix.targets(probe)
        model(mixed)
        assert mix.targets(probe).shape == (4, NUM_CLASSES)
        # A batch mixed for another token grid than the model's.
        _, other = tk.TransMix(NUM_CLASSES, mixup_alpha=0.0, token_grid=(3, 3), seed=0)(images.clone(), labels)
        with pytest.raises(ValueError, match="token grid"):
            other.targets(probe)
    with pytest.raises(ValueError, match="attention has batch size 2"):
        mix.targets(torch.rand(2, mix.token_grid[0] * mix.token_grid[1]).softmax(-1))


def test_compiled_model_grid(seed):
    """torch.compile(model): the token grid is inferred through the wrapper (the probe on compiled
    models, in a TransMix step of every family: tests/kernels/test_probe_compile.py)."""
    model = BUILDERS["vit"]()
    compiled = torch.compile(model, backend="eager")
    assert tk.infer_token_grid(compiled, IMAGE["vit"]) == tk.infer_token_grid(model, IMAGE["vit"])
