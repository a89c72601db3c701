"""A DeiT-S training step (mix + forward + targets + loss + backward + AdamW step) three ways,
eager and with ``torch.compile(model)``:

* ``transmix`` (ours): fused attention left on, :class:`tk.ClassAttentionProbe` recomputes the
  class row from the q and k the model computed anyway (O(B * heads * N) extra memory);
* ``naive-last-block`` (naive / official approach): the last block on the naive softmax path, a
  clone of its whole (B, heads, N, N) probability matrix kept for the labels;
* ``plain-cutmix`` (floor): the same mixing with area labels, no attention at all.

Synthetic data. CPU: batch 4, float32 (a step takes most of a second on two cores). CUDA:
batch 256 under bf16 autocast, where the goal is TransMix within 1 % of plain CutMix in time
and within 2 MB in peak memory. extra_info: ``first_call_s`` (the first step, compilation
included), and on CUDA ``peak_mib`` (``torch.cuda.max_memory_allocated`` over one step) and
``peak_extra_mib`` (the peak above what was allocated before the step: weights, optimizer).
The compiled cases are marked ``slow`` (compilation takes about a minute per provider on a
2-core CPU; ``-m "not slow"`` leaves them out). If the probe refuses a compiled model, the
compiled ``transmix`` case is skipped with the probe's message.

The attention-guided family (``test_family_step``, eager, the demo's model and batch): the same
step with each mixer of the family side by side, every batch mixed by the method itself (no
Mixup switch), so the step times differ only by what each mixer costs:

* ``plain-cutmix``: ``tk.TransMix`` CutMix boxes, area labels (the reference);
* ``transmix``: the same boxes, labels from the probe's class attention;
* ``mixpro``: ``tk.MixPro`` MaskMix (16 px cells) with PAL (probe + the forward's logits);
* ``tokenmix``: ``tk.TokenMix`` block token masks, teacher-free labels (TransMix's rule on the probe).

On the CPU, extra_info also holds ``mix_ms`` and ``targets_ms``: medians over the rounds of the
mixer call and of the label call inside the step (timed with ``perf_counter``; not on CUDA, where
the synchronisations would change the step being measured).
"""

from __future__ import annotations

import contextlib
import time

import pytest
import timm
import torch
from timm.loss import SoftTargetCrossEntropy

import transmix_kernels as tk

from conftest import bench_devices, record_cuda_peak, sync

NUM_CLASSES = 1000
# The two models: DeiT-S at 224 px (ImageNet's), and the trainer demo's DeiT (patch 8, depth 6,
# width 128 at 32 px, 10 classes), whose steps are what a CPU run of transmix-train spends its time on.
ARCHS = {
    "deit_s": dict(name="deit_small_patch16_224", kwargs={}, size=224, classes=NUM_CLASSES),
    "demo": dict(name="deit_tiny_patch16_224", size=32, classes=10,
                 kwargs=dict(img_size=32, patch_size=8, embed_dim=128, depth=6, num_heads=4)),
}
PROVIDERS = ["transmix", "naive-last-block", "plain-cutmix"]
COMPILE = [pytest.param(False, id="eager"), pytest.param(True, id="compiled", marks=pytest.mark.slow)]


def batch_and_dtype(device: torch.device, arch: str = "deit_s") -> tuple[int, torch.dtype]:
    if arch == "demo":  # the demo's batch
        return 64, (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return (256, torch.bfloat16) if device.type == "cuda" else (4, torch.float32)


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def naive_last_block(model):
    """The official TransMix way: last block un-fused, its probabilities cloned on every forward.

    Returns a callable giving the (B, N - prefix) head-averaged class row of the last forward.
    """
    attn = model.blocks[-1].attn
    attn.fused_attn = False
    kept = {}
    attn.attn_drop.register_forward_hook(lambda _m, _a, out: kept.__setitem__("probs", out.detach().clone()))
    return lambda: kept["probs"][:, :, 0, model.num_prefix_tokens:].mean(1)


def label_source(provider: str, model, net):
    """mix -> soft targets for ``provider``; ``net`` is what runs (``model`` or its compiled wrapper)."""
    if provider == "naive-last-block":
        class_row = naive_last_block(model)
        return lambda mix: mix.targets(class_row())
    if provider == "plain-cutmix":
        return lambda mix: mix.targets()
    try:
        probe = tk.ClassAttentionProbe(net)
    except (TypeError, RuntimeError) as err:
        if net is model:
            raise
        pytest.skip(f"ClassAttentionProbe refuses the compiled model: {err}")
    return lambda mix: mix.targets(probe)


def make_step(provider: str, device: torch.device, compiled: bool, dtype: torch.dtype, arch: str = "deit_s"):
    torch.manual_seed(0)
    spec = ARCHS[arch]
    model = timm.create_model(spec["name"], pretrained=False, num_classes=spec["classes"], **spec["kwargs"])
    model = model.to(device).train()
    transmix = tk.TransMix(spec["classes"], mixup_alpha=0.0, cutmix_alpha=1.0, model=model, seed=0)
    net = torch.compile(model) if compiled else model
    labels_of = label_source(provider, model, net)
    criterion = SoftTargetCrossEntropy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(images, labels):
        images, mix = transmix(images, labels)
        with autocast(device, dtype):
            loss = criterion(net(images), labels_of(mix))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return loss

    return step


@pytest.mark.parametrize("device", bench_devices())
@pytest.mark.parametrize("compiled", COMPILE)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_train_step(benchmark, record, arch, provider, compiled, device):
    device = torch.device(device)
    batch, dtype = batch_and_dtype(device, arch)
    step = make_step(provider, device, compiled, dtype, arch)
    size, classes = ARCHS[arch]["size"], ARCHS[arch]["classes"]
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)
    mode = "compiled" if compiled else "eager"
    record(f"{arch}-train-step B{batch} {str(dtype)[6:]} {mode} {device.type}", provider, device)

    start = time.perf_counter()
    step(images.clone(), labels)
    benchmark.extra_info["first_call_s"] = time.perf_counter() - start
    record_cuda_peak(benchmark, lambda: step(images.clone(), labels), device)
    rounds = 20 if device.type == "cuda" or arch == "demo" else 5
    benchmark.pedantic(step, setup=lambda: ((images.clone(), labels), {}), rounds=rounds, warmup_rounds=1)


FAMILY = ["plain-cutmix", "transmix", "mixpro", "tokenmix"]
# What each family provider is, written into extra_info["kind"] (conftest's kinds name the others).
FAMILY_KINDS = {
    "mixpro": "attention-guided family: MaskMix + PAL",
    "tokenmix": "attention-guided family: block token masks, attention labels",
}


def family_mixer(provider: str, model, classes: int):
    """(mixer, labels(mix, probe, logits)) of a family provider; every batch is mixed by the method."""
    if provider == "mixpro":
        mixer = tk.MixPro(classes, mask_size=16, maskmix_prob=1.0, model=model, seed=0)
        return mixer, lambda mix, probe, logits: mix.targets(probe, logits=logits.detach())
    if provider == "tokenmix":
        mixer = tk.TokenMix(classes, mixup_alpha=0.0, min_tokens=1, model=model, seed=0)
        return mixer, lambda mix, probe, logits: mix.targets(probe)
    mixer = tk.TransMix(classes, mixup_alpha=0.0, cutmix_alpha=1.0, model=model, seed=0)
    if provider == "plain-cutmix":
        return mixer, lambda mix, probe, logits: mix.targets()
    return mixer, lambda mix, probe, logits: mix.targets(probe)


def make_family_step(provider: str, device: torch.device, dtype: torch.dtype, timings: dict):
    torch.manual_seed(0)
    spec = ARCHS["demo"]
    model = timm.create_model(spec["name"], pretrained=False, num_classes=spec["classes"], **spec["kwargs"])
    model = model.to(device).train()
    mixer, labels_of = family_mixer(provider, model, spec["classes"])
    probe = tk.ClassAttentionProbe(model) if provider != "plain-cutmix" else None
    criterion = SoftTargetCrossEntropy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    timed = device.type == "cpu"

    def step(images, labels):
        start = time.perf_counter()
        images, mix = mixer(images, labels)
        mixed = time.perf_counter()
        with autocast(device, dtype):
            logits = model(images)
            before = time.perf_counter()
            targets = labels_of(mix, probe, logits)
            after = time.perf_counter()
            loss = criterion(logits, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if timed:
            timings.setdefault("mix", []).append(mixed - start)
            timings.setdefault("targets", []).append(after - before)
        return loss

    return step


@pytest.mark.parametrize("device", bench_devices())
@pytest.mark.parametrize("mode", ["eager"])  # gpu_check.sh's training stages select by "eager" / "compiled"
@pytest.mark.parametrize("provider", FAMILY)
def test_family_step(benchmark, record, provider, mode, device):
    device = torch.device(device)
    batch, dtype = batch_and_dtype(device, "demo")
    timings: dict[str, list[float]] = {}
    step = make_family_step(provider, device, dtype, timings)
    size, classes = ARCHS["demo"]["size"], ARCHS["demo"]["classes"]
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)
    record(f"demo-family-step B{batch} {str(dtype)[6:]} {mode} {device.type}", provider, device)
    if provider in FAMILY_KINDS:
        benchmark.extra_info["kind"] = FAMILY_KINDS[provider]

    start = time.perf_counter()
    step(images.clone(), labels)
    benchmark.extra_info["first_call_s"] = time.perf_counter() - start
    record_cuda_peak(benchmark, lambda: step(images.clone(), labels), device)
    timings.clear()
    benchmark.pedantic(step, setup=lambda: ((images.clone(), labels), {}), rounds=20, warmup_rounds=1)
    for name, values in timings.items():
        benchmark.extra_info[f"{name}_ms"] = 1e3 * sorted(values)[len(values) // 2]
