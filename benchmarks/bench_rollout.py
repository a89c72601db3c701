"""Attention rollout's class-token map at DeiT-S shape (B=8, 6 heads, N=197, 12 blocks).

Providers side by side per (dtype, device):

* extension (ours): ``tk.attention_rollout`` with the compiled C++/CUDA kernel (the vector chain
  e_0 @ A'_L @ ... @ A'_1, heads fused, residual and renormalisation in the same read);
* torch-vector-chain (same algorithm, plain PyTorch): ``impl="torch"``, the same chain in
  vectorised PyTorch (head mean, bmv): the strongest baseline;
* naive-chained-bmm (naive approach, O(L N^3)): ``reference.attention_rollout``, the full
  (B, N, N) product built block by block with bmm, then its class row (what Abnar & Zuidema's
  code and most ViT-explainability repositories do).

Run: ``pytest benchmarks/bench_rollout.py --benchmark-only``. CUDA rows record the peak extra
memory in extra_info.
"""

from __future__ import annotations

import pytest
import torch

import transmix_kernels as tk
from transmix_kernels import _ext, reference

from conftest import bench_devices, record_cuda_peak, sync

BATCH, HEADS, TOKENS, BLOCKS = 8, 6, 197, 12
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ["extension", "torch-vector-chain", "naive-chained-bmm"]


def _attentions(device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(BLOCKS, BATCH, HEADS, TOKENS, TOKENS, generator=gen) * 3.0
    return [a.to(device=device, dtype=dtype).contiguous() for a in logits.softmax(-1).unbind(0)]


def _provider(name: str):
    if name == "extension":
        return lambda attns: tk.attention_rollout(attns, impl="auto")
    if name == "torch-vector-chain":
        return lambda attns: tk.attention_rollout(attns, impl="torch")
    return lambda attns: reference.attention_rollout(attns)


@pytest.mark.parametrize("device", bench_devices())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("provider", PROVIDERS)
def test_rollout_row(benchmark, record, provider, dtype, device):
    device = torch.device(device)
    if provider == "extension" and not _ext.supports(device):
        pytest.skip(f"transmix_kernels._C not built for {device.type}: {_ext.unavailable_reason(device)}")
    attentions = _attentions(device, dtype)
    dtype_name = str(dtype).replace("torch.", "")
    record(f"rollout-row B{BATCH}-h{HEADS}-N{TOKENS}-L{BLOCKS} {dtype_name} {device.type}", provider, device)
    fn = _provider(provider)

    def run():
        out = fn(attentions)
        sync(device)
        return out

    record_cuda_peak(benchmark, run, device)
    rounds = 50 if device.type == "cuda" else (8 if provider == "naive-chained-bmm" else 20)
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=2)
