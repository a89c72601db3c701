"""Class attention from q and k (fused) against materialising the attention, at DeiT-S shapes.

Groups (one per case and device), providers side by side:

* lambda: ``class_attention_lambda`` (fused: triton on CUDA, torch path everywhere) vs the row
  softmax materialised then ``tk.transmix_lambda`` vs the official code's way (the full
  (B, heads, N, N) attention matrix, row 0 taken) vs the reference twin.
* row: ``class_attention_row`` vs the reference twin.
* rollout (12 blocks): ``rollout_from_qk`` vs full matrices + ``tk.attention_rollout`` (when the
  extension is built) vs the reference twin (matrix products).

Run: ``python -m pytest benchmarks/bench_class_attention.py --benchmark-group-by=group``.
CUDA rows record peak memory in extra_info.
"""

from __future__ import annotations

import pytest
import torch

import transmix_kernels as tk
from transmix_kernels import reference

from conftest import bench_devices

BATCH, HEADS, TOKENS, HEAD_DIM, BLOCKS = 64, 6, 197, 64, 12  # DeiT-S at 224 px
SCALE = HEAD_DIM ** -0.5
# (device, dtype): on CUDA bf16 (the autocast case) and fp32 (IEEE products in the Triton kernels).
TARGETS = ([("cpu", torch.float32)] if "cpu" in bench_devices() else []) + (
    [("cuda", torch.bfloat16), ("cuda", torch.float32)] if "cuda" in bench_devices() else []
)
TARGET_IDS = [f"{device}-{str(dtype)[6:]}" for device, dtype in TARGETS]


def timm_qk(batch, device, dtype, seed=0):
    """q and k as timm leaves them: views into one (B, N, 3, heads, D) projection output."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(batch, TOKENS, 3, HEADS, HEAD_DIM, generator=gen).to(device=device, dtype=dtype)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k


def run(benchmark, fn, device, rounds):
    def call():
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    if device == "cuda":
        call()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        benchmark.extra_info["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)


LAMBDA_PROVIDERS = ["fused-triton", "fused-torch", "row-softmax+transmix_lambda", "full-attention+transmix_lambda", "reference"]


@pytest.mark.parametrize("provider", LAMBDA_PROVIDERS)
@pytest.mark.parametrize("device,dtype", TARGETS, ids=TARGET_IDS)
def test_lambda(benchmark, device, dtype, provider):
    if provider == "fused-triton" and device != "cuda":
        pytest.skip("Triton runs on CUDA only (the CPU interpreter is not a benchmark)")
    q, k = timm_qk(BATCH, device, dtype)
    q_cls = q[:, :, 0]
    token_mask = (torch.rand(BATCH, TOKENS - 1, device=device) < 0.4).float()
    lam_area = torch.rand(BATCH, device=device)
    benchmark.group = f"lambda B{BATCH} H{HEADS} N{TOKENS} D{HEAD_DIM} {str(dtype)[6:]} {device}"
    if provider.startswith("fused"):
        impl = provider.split("-")[1]
        fn = lambda: tk.class_attention_lambda(q_cls, k, token_mask, lam_area, scale=SCALE, impl=impl)  # noqa: E731
    elif provider == "row-softmax+transmix_lambda":
        def fn():
            attn = torch.softmax(torch.matmul(q_cls.unsqueeze(2), k.transpose(-1, -2)).squeeze(2) * SCALE, -1)
            return tk.transmix_lambda(attn[..., 1:], token_mask, lam_area)
    elif provider == "full-attention+transmix_lambda":
        def fn():  # what the official code keeps: the whole attention matrix of the block
            attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * SCALE, -1)
            return tk.transmix_lambda(attn[:, :, 0, 1:], token_mask, lam_area)
    else:
        fn = lambda: reference.class_attention_lambda(q_cls, k, token_mask, lam_area, scale=SCALE)  # noqa: E731
    run(benchmark, fn, device, rounds=10)


@pytest.mark.parametrize("provider", ["fused-triton", "fused-torch", "reference"])
@pytest.mark.parametrize("device,dtype", TARGETS, ids=TARGET_IDS)
def test_row(benchmark, device, dtype, provider):
    if provider == "fused-triton" and device != "cuda":
        pytest.skip("Triton runs on CUDA only")
    q, k = timm_qk(BATCH, device, dtype)
    q_cls = q[:, :, 0]
    benchmark.group = f"row B{BATCH} H{HEADS} N{TOKENS} D{HEAD_DIM} {str(dtype)[6:]} {device}"
    if provider == "reference":
        fn = lambda: reference.class_attention_row(q_cls, k, scale=SCALE)  # noqa: E731
    else:
        impl = provider.split("-")[1]
        fn = lambda: tk.class_attention_row(q_cls, k, scale=SCALE, impl=impl)  # noqa: E731
    run(benchmark, fn, device, rounds=10)


@pytest.mark.parametrize("provider", ["fused-triton", "fused-torch", "attention_rollout", "reference"])
@pytest.mark.parametrize("device,dtype", TARGETS, ids=TARGET_IDS)
def test_rollout(benchmark, device, dtype, provider):
    if provider == "fused-triton" and device != "cuda":
        pytest.skip("Triton runs on CUDA only")
    if provider == "attention_rollout" and not hasattr(tk, "attention_rollout"):
        pytest.skip("tk.attention_rollout (C++ extension) not available")
    # The CPU reference multiplies 12 (N x N) matrices per sample: a small batch keeps it short.
    batch = BATCH if device == "cuda" else 8
    pairs = [timm_qk(batch, device, dtype, seed=layer) for layer in range(BLOCKS)]
    queries, keys = [q for q, _ in pairs], [k for _, k in pairs]
    benchmark.group = f"rollout L{BLOCKS} B{batch} H{HEADS} N{TOKENS} D{HEAD_DIM} {str(dtype)[6:]} {device}"
    if provider.startswith("fused"):
        impl = provider.split("-")[1]
        fn = lambda: tk.rollout_from_qk(queries, keys, scale=SCALE, impl=impl)  # noqa: E731
    elif provider == "attention_rollout":
        def fn():  # the attention matrices a naive model would have kept, then the extension op
            attns = [torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * SCALE, -1) for q, k in zip(queries, keys)]
            return tk.attention_rollout(attns, residual=0.5)
    else:
        fn = lambda: reference.rollout_from_qk(queries, keys, scale=SCALE)  # noqa: E731
    run(benchmark, fn, device, rounds=5 if device == "cpu" else 20)
