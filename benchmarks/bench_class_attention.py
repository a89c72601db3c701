"""Class attention from q and k (fused) against materialising the attention, at DeiT-S shapes.

Groups (one per case and device), providers side by side (kinds as in conftest.PROVIDER_KINDS):

* lambda: ``class_attention_lambda`` (ours: fused Triton on CUDA, our torch path everywhere)
  vs the same algorithm in plain PyTorch (the class row's softmax materialised, then
  ``tk.transmix_lambda``; and the reference twin, the row in float32 then the reference lambda)
  vs the official code's approach (the full (B, heads, N, N) attention matrix, row 0 taken).
* row: ``class_attention_row`` vs the reference twin (same algorithm, plain PyTorch).
* rollout (12 blocks): ``rollout_from_qk`` vs the naive approaches: every block's full
  attention matrix materialised, then ``tk.attention_rollout`` (the extension's vector chain);
  and the reference twin (full matrices multiplied as matrices, O(L N^3)).

Run: ``python -m pytest benchmarks/bench_class_attention.py --benchmark-only``.
CUDA rows record peak memory in extra_info.
"""

from __future__ import annotations

import pytest
import torch

import transmix_kernels as tk
from transmix_kernels import reference

from conftest import bench_devices, record_cuda_peak, sync

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


def full_attention(q, k):
    """The (B, heads, N, N) probabilities a model on the naive softmax path materialises."""
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * SCALE, -1)


def run(benchmark, fn, device, rounds):
    device = torch.device(device)

    def call():
        out = fn()
        sync(device)
        return out

    record_cuda_peak(benchmark, call, device)
    return benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)


def fused_or_skip(provider, device):
    """The impl of a fused provider ("fused-triton" -> "triton"); Triton is benchmarked on CUDA only."""
    if provider == "fused-triton" and device != "cuda":
        pytest.skip("Triton runs on CUDA only (the CPU interpreter is not a benchmark)")
    return provider.split("-")[1]


def lambda_fn(provider, q, k, token_mask, lam_area):
    q_cls = q[:, :, 0]
    if provider == "row-softmax+transmix_lambda":
        def fn():
            attn = torch.softmax(torch.matmul(q_cls.unsqueeze(2), k.transpose(-1, -2)).squeeze(2) * SCALE, -1)
            return tk.transmix_lambda(attn[..., 1:], token_mask, lam_area)
        return fn
    if provider == "full-attention+transmix_lambda":
        return lambda: tk.transmix_lambda(full_attention(q, k)[:, :, 0, 1:], token_mask, lam_area)
    if provider == "reference-row":
        return lambda: reference.class_attention_lambda(q_cls, k, token_mask, lam_area, scale=SCALE)
    impl = fused_or_skip(provider, str(q.device.type))
    return lambda: tk.class_attention_lambda(q_cls, k, token_mask, lam_area, scale=SCALE, impl=impl)


LAMBDA_PROVIDERS = [
    "fused-triton", "fused-torch", "row-softmax+transmix_lambda", "reference-row", "full-attention+transmix_lambda",
]


@pytest.mark.parametrize("provider", LAMBDA_PROVIDERS)
@pytest.mark.parametrize("device,dtype", TARGETS, ids=TARGET_IDS)
def test_lambda(benchmark, record, device, dtype, provider):
    q, k = timm_qk(BATCH, device, dtype)
    token_mask = (torch.rand(BATCH, TOKENS - 1, device=device) < 0.4).float()
    lam_area = torch.rand(BATCH, device=device)
    fn = lambda_fn(provider, q, k, token_mask, lam_area)
    record(f"lambda B{BATCH} H{HEADS} N{TOKENS} D{HEAD_DIM} {str(dtype)[6:]} {device}", provider, device)
    run(benchmark, fn, device, rounds=10)


@pytest.mark.parametrize("provider", ["fused-triton", "fused-torch", "reference-row"])
@pytest.mark.parametrize("device,dtype", TARGETS, ids=TARGET_IDS)
def test_row(benchmark, record, device, dtype, provider):
    q, k = timm_qk(BATCH, device, dtype)
    q_cls = q[:, :, 0]
    if provider == "reference-row":
        fn = lambda: reference.class_attention_row(q_cls, k, scale=SCALE)  # noqa: E731
    else:
        impl = fused_or_skip(provider, device)
        fn = lambda: tk.class_attention_row(q_cls, k, scale=SCALE, impl=impl)  # noqa: E731
    record(f"row B{BATCH} H{HEADS} N{TOKENS} D{HEAD_DIM} {str(dtype)[6:]} {device}", provider, device)
    run(benchmark, fn, device, rounds=10)


ROLLOUT_PROVIDERS = ["fused-triton", "fused-torch", "full-attention+attention_rollout", "reference-full-matrices"]


@pytest.mark.parametrize("provider", ROLLOUT_PROVIDERS)
@pytest.mark.parametrize("device,dtype", TARGETS, ids=TARGET_IDS)
def test_rollout(benchmark, record, device, dtype, provider):
    # The CPU reference multiplies 12 (N x N) matrices per sample: a small batch keeps it short.
    batch = BATCH if device == "cuda" else 8
    pairs = [timm_qk(batch, device, dtype, seed=layer) for layer in range(BLOCKS)]
    queries, keys = [q for q, _ in pairs], [k for _, k in pairs]
    if provider == "full-attention+attention_rollout":
        def fn():  # the attention matrices a naive model would have kept, then the rollout op
            return tk.attention_rollout([full_attention(q, k) for q, k in pairs], residual=0.5)
    elif provider == "reference-full-matrices":
        fn = lambda: reference.rollout_from_qk(queries, keys, scale=SCALE)  # noqa: E731
    else:
        impl = fused_or_skip(provider, device)
        fn = lambda: tk.rollout_from_qk(queries, keys, scale=SCALE, impl=impl)  # noqa: E731
    record(f"rollout L{BLOCKS} B{batch} H{HEADS} N{TOKENS} D{HEAD_DIM} {str(dtype)[6:]} {device}", provider, device)
    run(benchmark, fn, device, rounds=5 if device == "cpu" else 20)
