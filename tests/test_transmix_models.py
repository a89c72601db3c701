"""A TransMix training step on unmodified timm models of every family: mix, forward with the
probe (fused attention left on), attention-weighted targets, backward."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from timm.loss import SoftTargetCrossEntropy
from tiny_models import BUILDERS, IMAGE, _images

import transmix_kernels as tk

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
    mixed, mix = transmix(images, labels)
    assert mixed is images and mix.kind == "cutmix"

    with tk.ClassAttentionProbe(model) as probe:
        logits = model(mixed)
        targets = mix.targets(probe)
        attention = probe.attention()
        assert mix.token_grid == probe.token_grid, "TransMix inferred a grid the model does not use"

    # The same targets, assembled from the public ops and the probe's attention.
    lam = tk.transmix_lambda(attention, mix.token_mask, mix.lam_area)
    assert_close("targets", targets, tk.mix_targets(labels, lam, NUM_CLASSES), atol=1e-6)
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
