"""A DeiT-S training step (TransMix mix + forward + targets + backward) three ways:

* ``transmix``: fused attention left on, :class:`tk.ClassAttentionProbe` recomputes the class
  row from q and k (O(B * heads * N) extra memory);
* ``naive-last-block``: the official code's approach: the last block on the naive softmax path
  and a clone of its whole (B, heads, N, N) probability matrix kept for the labels;
* ``plain-cutmix``: no attention at all (area labels): the floor both are measured against.

Time per step, and on CUDA the peak memory of the step (extra_info ``peak_mib``).
CPU: batch 4 (a DeiT-S step takes about a second on two cores); CUDA: batch 64.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.loss import SoftTargetCrossEntropy

import transmix_kernels as tk

from conftest import bench_devices, sync

NUM_CLASSES = 1000


def _naive_last_block(model):
    """The official TransMix way: last block un-fused, its probabilities cloned on every forward."""
    naive = copy.deepcopy(model)
    attn = naive.blocks[-1].attn
    attn.fused_attn = False
    kept = {}
    attn.attn_drop.register_forward_hook(lambda _m, _a, out: kept.__setitem__("probs", out.detach().clone()))
    return naive, lambda: kept["probs"][:, :, 0, naive.num_prefix_tokens:].mean(1)


def _step_fn(provider, model, transmix):
    criterion = SoftTargetCrossEntropy()
    if provider == "transmix":
        probe = tk.ClassAttentionProbe(model)

        def step(images, labels):
            images, mix = transmix(images, labels)
            loss = criterion(model(images), mix.targets(probe))
            loss.backward()
            return loss

        return model, step
    if provider == "naive-last-block":
        naive, class_row = _naive_last_block(model)

        def step(images, labels):
            images, mix = transmix(images, labels)
            logits = naive(images)
            loss = criterion(logits, mix.targets(class_row()))
            loss.backward()
            return loss

        return naive, step

    def step(images, labels):
        images, mix = transmix(images, labels)
        loss = criterion(model(images), mix.targets())
        loss.backward()
        return loss

    return model, step


@pytest.mark.parametrize("device", bench_devices())
@pytest.mark.parametrize("provider", ["transmix", "naive-last-block", "plain-cutmix"])
def test_deit_s_step(benchmark, record, provider, device):
    torch.manual_seed(0)
    batch = 64 if device == "cuda" else 4
    model = timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=NUM_CLASSES).to(device).train()
    transmix = tk.TransMix(NUM_CLASSES, mixup_alpha=0.0, cutmix_alpha=1.0, model=model, seed=0)
    model, step = _step_fn(provider, model, transmix)
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    record(f"deit_s-train-step B{batch} {device}", provider)

    def run(x, y):
        model.zero_grad(set_to_none=True)
        loss = step(x, y)
        sync(x.device)
        return loss

    if device == "cuda":
        run(images.clone(), labels)
        torch.cuda.reset_peak_memory_stats()
        run(images.clone(), labels)
        benchmark.extra_info["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    rounds = 20 if device == "cuda" else 3
    benchmark.pedantic(run, setup=lambda: ((images.clone(), labels), {}), rounds=rounds, warmup_rounds=1)
