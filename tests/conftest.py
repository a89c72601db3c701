"""Shared test plumbing: interpreter switch, seeds, NaN poisoning, informative comparisons."""

from __future__ import annotations

import math
import os

import pytest
import torch


def pytest_configure(config):
    # Without a GPU the Triton kernels run under the interpreter; Triton reads this when the
    # kernels are decorated, i.e. before transmix_kernels is first imported by a test module.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


CUDA = torch.cuda.is_available()


def device_for(impl: str) -> torch.device:
    """Where a test of `impl` puts its tensors: Triton runs on the GPU when there is one (the
    GPU check runs the suite without the interpreter), else on the CPU under the interpreter."""
    return torch.device("cuda" if (CUDA and impl in ("triton", "auto")) else "cpu")


@pytest.fixture
def seed() -> int:
    torch.manual_seed(20221118)
    return 20221118


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture
def poison_empty(monkeypatch):
    """Make torch.empty / empty_like / empty_strided return NaN-filled (or -1 for ints) memory so
    an element a kernel never writes fails the comparison (fla's poison_torch_memory idea)."""

    def poisoned(fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            out.fill_(float("nan") if out.is_floating_point() else -1)
            return out

        return wrapper

    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, poisoned(getattr(torch, name)))
    yield


@pytest.fixture
def missing_extension(monkeypatch):
    """The package as if transmix_kernels._C had failed to import, with no fallback warned yet."""
    from transmix_kernels import _ext

    monkeypatch.setattr(_ext, "_LOADED", _ext._Loaded(None, ImportError("simulated: no _C here")))
    monkeypatch.setattr(_ext, "_FALLBACK_WARNED", set())


def lambda_fp64(attn: torch.Tensor, token_mask: torch.Tensor, lam_area: torch.Tensor, ratio: float) -> torch.Tensor:
    """The rule in float64: lam_attn = sum a (1 - m) / sum a (lam_area where the mass is unusable)."""
    a = attn.double()
    a = a.mean(1) if a.dim() == 3 else a
    m = token_mask.double()
    outside, mass = (a * (1 - m)).sum(1), a.sum(1)
    lam_area = lam_area.double()
    usable = torch.isfinite(mass) & (mass > 0) & torch.isfinite(outside)
    lam_attn = torch.where(usable, outside / torch.where(usable, mass, torch.ones_like(mass)), lam_area)
    return ratio * lam_area + (1 - ratio) * lam_attn


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, *, atol: float = 0.0, rtol: float = 0.0) -> None:
    """allclose with a message naming the tensor, the worst element, its index and the failing share.

    |actual - expected| <= atol + rtol * |expected| where expected is finite. A non-finite element
    on either side passes only on exact equality (equal infinities, or NaN at the same place in
    both, which never happens in our outputs): NaN against a number fails, and so does any
    number against NaN or an infinity, whatever the tolerances.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    err = (a - e).abs()
    same = (a == e) | (torch.isnan(a) & torch.isnan(e))
    finite = torch.isfinite(a) & torch.isfinite(e)
    excess = err - (atol + rtol * e.abs())
    bad = ~same & (~finite | (excess > 0))
    if bool(bad.any()):
        # Non-finite mismatches rank worst; NaN scores would break argmax.
        score = torch.where(bad, torch.nan_to_num(torch.where(finite, excess, math.inf), posinf=math.inf), -1.0)
        flat = int(torch.argmax(score))
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
        share = float(bad.double().mean())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} elements ({share:.2%}) exceed atol={atol:g}, rtol={rtol:g}; "
            f"worst at index {idx}: actual {a.flatten()[flat].item()!r}, expected {e.flatten()[flat].item()!r}, "
            f"|diff| {err.flatten()[flat].item():.3g}"
        )


def assert_equal(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bitwise equality (data movement ops); same dtype required."""
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != expected {expected.dtype}"
    assert_close(name, actual, expected, atol=0.0, rtol=0.0)
