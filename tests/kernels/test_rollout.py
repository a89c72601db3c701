"""attention_rollout: class-token attention rollout from every block's attention probabilities.

The expected values are reference.attention_rollout in float64 on the same input values: full
(B, N, N) layers with an explicit identity, explicit row renormalisation and the matrix product
built block by block (not the vector trick the fast paths use). Every fast path accumulates in
fp32 from the given values, so one tolerance holds for every input dtype; for bf16/fp16 the
tests also check the STYLE rule against plain PyTorch computing at that precision.

Paths: "extension" is impl="auto" with the compiled kernel (skipped where it is not built; the
PyTorch path is disabled so auto cannot silently fall back), "torch" is the vectorised vector
chain; "reference" is checked where the semantics are pinned down by hand.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import transmix_kernels as tk
from conftest import assert_close
from transmix_kernels import _ext, reference
from transmix_kernels import rollout as rollout_mod

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FUSIONS = ("mean", "max", "min")
# Map entries are ~1/N, products of L stochastic matrices; fp32 accumulation gives ~1e-6 relative
# (the fp32 reference itself is off by up to 2.6e-6 on these cases).
ATOL, RTOL = 1e-9, 1e-5

# (layers, batch, heads, tokens): odd N, L = 1 and several, batches that take both CPU schedules.
SHAPES = {
    "L1-B2-H3-N17": (1, 2, 3, 17),
    "L4-B3-H2-N50": (4, 3, 2, 50),
    "L12-B1-H6-N37": (12, 1, 6, 37),
}


def make_attentions(layers, batch, heads, tokens, *, dtype=torch.float32, device="cpu", kind="softmax"):
    """Fresh random attention probabilities (softmax rows), or positive rows that do not sum to 1."""
    shape = (layers, batch, heads, tokens, tokens)
    if kind == "softmax":
        stack = (torch.randn(shape) * 3.0).softmax(-1)
    else:
        stack = torch.rand(shape) + 0.05
    return [a.to(device=device, dtype=dtype).contiguous() for a in stack.unbind(0)]


def rollout_fp64(attentions, **kwargs):
    return reference.attention_rollout([a.double().cpu() for a in attentions], **kwargs)


@pytest.fixture(params=["extension", "torch"])
def impl(request, device, monkeypatch):
    if request.param == "extension":
        if not _ext.supports(device):
            pytest.skip(f"transmix_kernels._C not built for {device.type} ({_ext.unavailable_reason(device)})")

        def forbidden(*args, **kwargs):
            raise AssertionError("impl='auto' ran the PyTorch path although the extension is built")

        monkeypatch.setitem(rollout_mod.ROLLOUT.kernels, "torch", forbidden)
        return "auto"
    return "torch"


def needs_extension(device: torch.device):
    if not _ext.supports(device):
        pytest.skip(f"transmix_kernels._C not built for {device.type}")
    return _ext.extension()


# --- parity with the reference ---------------------------------------------------------------


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("residual", [0.0, 0.5, 0.9], ids=lambda r: f"r{r}")
@pytest.mark.parametrize("prefix", [1, 2], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_row_matches_reference(seed, device, impl, shape, prefix, residual, fusion):
    attentions = make_attentions(*shape, device=device)
    kwargs = dict(residual=residual, head_fusion=fusion, num_prefix_tokens=prefix)
    out = tk.attention_rollout(attentions, impl=impl, **kwargs)
    assert out.dtype == torch.float32 and out.device.type == device.type
    assert out.shape == (shape[1], shape[3] - prefix)
    assert_close("rollout map", out, rollout_fp64(attentions, **kwargs), atol=ATOL, rtol=RTOL)
    assert_close("map sums", out.sum(-1), torch.ones(shape[1]), atol=0, rtol=2e-6)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("residual", [0.0, 0.5, 1.0], ids=lambda r: f"r{r}")
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_full_matches_reference(seed, device, impl, shape, residual, fusion):
    attentions = make_attentions(*shape, device=device)
    kwargs = dict(residual=residual, head_fusion=fusion)
    out = tk.attention_rollout(attentions, full=True, impl=impl, **kwargs)
    assert out.dtype == torch.float32 and out.shape == (shape[1], shape[3], shape[3])
    assert_close("rollout", out, rollout_fp64(attentions, full=True, **kwargs), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("full", [False, True], ids=["row", "full"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_rows_not_summing_to_one_are_renormalised(seed, device, impl, fusion, full):
    attentions = make_attentions(3, 2, 4, 23, device=device, kind="unnormalised")
    kwargs = dict(residual=0.3, head_fusion=fusion, num_prefix_tokens=1, full=full)
    out = tk.attention_rollout(attentions, impl=impl, **kwargs)
    assert_close("rollout", out, rollout_fp64(attentions, **kwargs), atol=ATOL, rtol=RTOL)


def plain_low_precision(attentions, residual, full):
    """The textbook computation done by plain PyTorch in the inputs' own dtype (the STYLE yardstick)."""
    rollout = None
    for a in attentions:
        mixed = (1 - residual) * a.mean(1) + residual * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        mixed = mixed / mixed.sum(-1, keepdim=True)
        rollout = mixed if rollout is None else torch.bmm(mixed, rollout)
    if full:
        return rollout.float()
    row = rollout[:, 0, 1:]
    return (row / row.sum(-1, keepdim=True)).float()


@pytest.mark.parametrize("full", [False, True], ids=["row", "full"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_input_dtypes_accumulate_in_fp32(seed, device, impl, dtype, full):
    exact = make_attentions(6, 2, 6, 41, device=device)
    attentions = [a.to(dtype) for a in exact]
    out = tk.attention_rollout(attentions, full=full, impl=impl)
    assert out.dtype == torch.float32
    # Against the same (rounded) input values the only error is fp32 accumulation.
    assert_close("rollout", out, rollout_fp64(attentions, full=full), atol=ATOL, rtol=RTOL)
    if dtype != torch.float32:
        # Against the unrounded values: at most twice what plain PyTorch at this precision loses.
        truth = rollout_fp64(exact, full=full)
        ours = (out.double().cpu() - truth).abs().max().item()
        plain = (plain_low_precision(attentions, 0.5, full).double().cpu() - truth).abs().max().item()
        assert ours <= 2 * plain, f"error {ours:.3g} vs plain {dtype} PyTorch {plain:.3g}"


def test_known_values_by_hand(device):
    """One block, one head, N = 3: A'[0] = (0.5 * [.2, .3, .5] + 0.5 * e_0) = [.6, .15, .25]."""
    attention = torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]], device=device).view(1, 1, 3, 3)
    expected = torch.tensor([[0.375, 0.625]])  # [.15, .25] / .4
    for impl in ("auto", "torch", "reference"):
        out = tk.attention_rollout([attention], impl=impl)
        assert_close(f"map ({impl})", out, expected, atol=1e-7, rtol=0)
    # Two blocks: e_0 @ A'_2 @ A'_1 with A'_2 = A'_1 = A'; row 0 of A'^2 is [.6,.15,.25] @ A'.
    layer = 0.5 * attention[0, 0].double().cpu() + 0.5 * torch.eye(3, dtype=torch.float64)
    row = layer[0] @ layer
    for impl in ("auto", "torch", "reference"):
        out = tk.attention_rollout([attention, attention], impl=impl, num_prefix_tokens=0)
        assert_close(f"two-block map ({impl})", out, (row / row.sum()).view(1, 3), atol=1e-7, rtol=0)


@pytest.mark.parametrize("path", ["auto", "torch", "reference"])
def test_residual_one_is_identity(device, path):
    """r = 1: every A'_l = I exactly, so the product is I and the class row is e_0."""
    attentions = make_attentions(3, 2, 2, 9, device=device)
    full = tk.attention_rollout(attentions, residual=1.0, full=True, impl=path)
    assert torch.equal(full.cpu(), torch.eye(9).expand(2, 9, 9))
    with_class = tk.attention_rollout(attentions, residual=1.0, num_prefix_tokens=0, impl=path)
    assert torch.equal(with_class.cpu(), torch.eye(9)[0].expand(2, 9))
    # No patch mass at all: the patch renormalisation is 0 / 0, NaN as documented.
    assert torch.isnan(tk.attention_rollout(attentions, residual=1.0, impl=path)).all()


def test_empty_batch(device, impl):
    attentions = make_attentions(2, 0, 3, 11, device=device)
    assert tk.attention_rollout(attentions, impl=impl).shape == (0, 10)
    assert tk.attention_rollout(attentions, impl=impl, full=True).shape == (0, 11, 11)


# --- the extension itself ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_extension_matches_torch_path_deit_shape(seed, device, dtype):
    """DeiT-S tokens and heads (N = 197, 6 heads), the case the kernels are tuned for."""
    needs_extension(device)
    attentions = make_attentions(3, 2, 6, 197, dtype=dtype, device=device)
    for full in (False, True):
        ext = tk.attention_rollout(attentions, full=full, impl="auto")
        ours = tk.attention_rollout(attentions, full=full, impl="torch")
        assert_close(f"extension vs torch (full={full})", ext, ours, atol=ATOL, rtol=RTOL)


def test_extension_is_deterministic(seed, device):
    """Fixed row chunks, no atomics: the same bits every call and, on the CPU, for any thread count."""
    module = needs_extension(device)
    attentions = make_attentions(5, 3, 4, 45, device=device)
    first = module.attention_rollout_row(attentions, 0.5, "mean", 1)
    assert torch.equal(first, module.attention_rollout_row(attentions, 0.5, "mean", 1))
    if device.type == "cpu":
        threads = torch.get_num_threads()
        try:
            for count in (1, 2, 3):
                torch.set_num_threads(count)
                assert torch.equal(first, module.attention_rollout_row(attentions, 0.5, "mean", 1)), count
        finally:
            torch.set_num_threads(threads)


def test_extension_layer_is_renormalised(seed, device):
    module = needs_extension(device)
    attention = make_attentions(1, 2, 3, 19, device=device, kind="unnormalised")[0]
    layer = module.rollout_layer(attention, 0.25, "max")
    fused = attention.double().amax(1).cpu()
    expected = 0.75 * fused + 0.25 * torch.eye(19, dtype=torch.float64)
    assert_close("A'", layer, expected / expected.sum(-1, keepdim=True), atol=ATOL, rtol=RTOL)


def test_non_contiguous_inputs(seed, device, impl):
    attentions = make_attentions(3, 2, 3, 21, device=device)
    # The same values stored transposed: a view whose last dimension is not unit-stride.
    views = [a.transpose(-1, -2).contiguous().transpose(-1, -2) for a in attentions]
    assert not views[0].is_contiguous()
    out = tk.attention_rollout(views, impl=impl)
    assert torch.equal(out, tk.attention_rollout(attentions, impl=impl))


def test_tuple_input(seed, device, impl):
    attentions = make_attentions(2, 2, 3, 13, device=device)
    assert torch.equal(tk.attention_rollout(tuple(attentions), impl=impl), tk.attention_rollout(attentions, impl=impl))


@pytest.mark.parametrize("path", ["auto", "torch", "reference"])
def test_inputs_untouched_and_grad_free(seed, device, path):
    attentions = [a.requires_grad_(True) for a in make_attentions(3, 2, 3, 15, device=device)]
    before = [a.detach().clone() for a in attentions]
    for full in (False, True):
        out = tk.attention_rollout(attentions, full=full, impl=path)
        assert not out.requires_grad
    for k, (a, b) in enumerate(zip(attentions, before)):
        assert torch.equal(a.detach(), b), f"attentions[{k}] was modified"


# --- fallback and build info -------------------------------------------------------------------


def test_fallback_warns_once_and_matches_torch_path(seed, missing_extension):
    attentions = make_attentions(3, 2, 3, 17)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [tk.attention_rollout(attentions) for _ in range(3)]
        full = tk.attention_rollout(attentions, full=True)
    fallback = [w for w in caught if issubclass(w.category, RuntimeWarning) and "falls back" in str(w.message)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    assert "simulated: no _C here" in str(fallback[0].message)
    assert fallback[0].filename == __file__, "the warning should point at the caller"
    expected = rollout_mod._rollout_torch(attentions, 0.5, "mean", 1, False)
    for out in outs:
        assert torch.equal(out, expected)
    assert torch.equal(full, rollout_mod._rollout_torch(attentions, 0.5, "mean", 1, True))
    info = _ext.build_info()
    assert info["extension"].startswith("missing (ImportError: simulated")
    assert "PyTorch" in info["extension fallback"]


def test_explicit_torch_impl_never_warns(seed, missing_extension):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tk.attention_rollout(make_attentions(2, 2, 3, 9), impl="torch")


def test_cuda_tensors_fall_back_when_built_without_cuda(monkeypatch):
    class CpuOnly:
        @staticmethod
        def build_info():
            return {"built_with_cuda": False}

    monkeypatch.setattr(_ext, "_LOADED", _ext._Loaded(CpuOnly, None))
    assert _ext.supports(torch.device("cpu"))
    assert not _ext.supports(torch.device("cuda"))
    assert "without CUDA" in _ext.unavailable_reason(torch.device("cuda"))


def test_build_info_describes_the_extension():
    info = _ext.build_info()
    if _ext.extension() is None:
        assert info["extension"].startswith("missing")
        return
    assert info["extension"] == "available"
    assert info["extension torch_version"] == torch.__version__.split("+")[0]
    assert info["extension matches running torch"] is True
    assert isinstance(info["extension built_with_cuda"], bool)


# --- bad inputs --------------------------------------------------------------------------------


def _good(n=7, **overrides):
    attentions = [torch.rand(2, 3, n, n).softmax(-1) for _ in range(2)]
    kwargs = dict(residual=0.5, head_fusion="mean", num_prefix_tokens=1, full=False, impl="auto")
    kwargs.update(overrides)
    return attentions, kwargs


BAD = {
    "not-a-list": (lambda: (torch.rand(1, 2, 3, 3), {}), TypeError, r"attentions must be a list or tuple"),
    "empty": (lambda: ([], {}), ValueError, r"attentions must be a non-empty list"),
    "not-a-tensor": (lambda: ([torch.rand(1, 2, 3, 3), "x"], {}), TypeError, r"attentions\[1\] must be a torch.Tensor"),
    "3d": (lambda: ([torch.rand(2, 3, 3)], {}), ValueError, r"attentions\[0\] must have 4 dimensions"),
    "not-square": (lambda: ([torch.rand(2, 3, 4, 5)], {}), ValueError, r"attentions\[0\] must have shape \(B, heads, N, N\)"),
    "shape-mismatch": (
        lambda: ([torch.rand(2, 3, 5, 5), torch.rand(2, 3, 6, 6)], {}), ValueError,
        r"attentions\[1\] has shape \(2, 3, 6, 6\) but attentions\[0\] has \(2, 3, 5, 5\)",
    ),
    "fp64": (lambda: ([torch.rand(1, 2, 3, 3, dtype=torch.float64)], {}), TypeError, r"attentions\[0\] must have dtype in"),
    "int": (lambda: ([torch.ones(1, 2, 3, 3, dtype=torch.int64)], {}), TypeError, r"attentions\[0\] must have dtype in"),
    "dtype-mismatch": (
        lambda: ([torch.rand(1, 2, 3, 3), torch.rand(1, 2, 3, 3).half()], {}), TypeError,
        r"attentions\[1\] has dtype torch.float16 but attentions\[0\] has torch.float32",
    ),
    "residual-negative": (lambda: _good(residual=-0.1), ValueError, r"residual must be in \[0.0, 1.0\]"),
    "residual-above-one": (lambda: _good(residual=1.5), ValueError, r"residual must be in \[0.0, 1.0\]"),
    "residual-nan": (lambda: _good(residual=float("nan")), ValueError, r"residual must be in"),
    "residual-str": (lambda: _good(residual="0.5"), TypeError, r"residual must be a number"),
    "head-fusion": (lambda: _good(head_fusion="sum"), ValueError, r"head_fusion must be one of \('mean', 'max', 'min'\)"),
    "prefix-negative": (lambda: _good(num_prefix_tokens=-1), ValueError, r"num_prefix_tokens must be in \[0, N\) = \[0, 7\)"),
    "prefix-is-n": (lambda: _good(num_prefix_tokens=7), ValueError, r"num_prefix_tokens must be in \[0, N\)"),
    "prefix-bool": (lambda: _good(num_prefix_tokens=True), TypeError, r"num_prefix_tokens must be an int"),
    "full-str": (lambda: _good(full="yes"), TypeError, r"full must be a bool"),
    "impl-triton": (lambda: _good(impl="triton"), ValueError, r"attention_rollout has no Triton kernel .*'auto', 'torch', 'reference'"),
    "impl-unknown": (lambda: _good(impl="cpp"), ValueError, r"impl must be one of \('auto', 'torch', 'reference'\)"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_inputs(case):
    make, error, message = case
    attentions, kwargs = make()
    tensors = attentions if isinstance(attentions, list) else [attentions]
    before = [t.clone() for t in tensors if isinstance(t, torch.Tensor)]
    with pytest.raises(error, match=message):
        tk.attention_rollout(attentions, **kwargs)
    after = [t for t in tensors if isinstance(t, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch():
    with pytest.raises(ValueError, match=r"attentions\[1\] must be on cpu"):
        tk.attention_rollout([torch.rand(1, 2, 3, 3), torch.rand(1, 2, 3, 3, device="cuda")])


EXT_BAD = {
    "empty": (lambda: ([], 0.5, "mean", 1), ValueError, "non-empty list"),
    "non-contiguous": (lambda: ([torch.rand(1, 2, 5, 5).transpose(-1, -2)], 0.5, "mean", 1), ValueError, "contiguous"),
    "fp64": (lambda: ([torch.rand(1, 2, 5, 5, dtype=torch.float64)], 0.5, "mean", 1), TypeError, "float32, bfloat16 or float16"),
    "dtype-mismatch": (lambda: ([torch.rand(1, 2, 5, 5), torch.rand(1, 2, 5, 5).half()], 0.5, "mean", 1), TypeError, r"attentions\[1\] has dtype"),
    "shape-mismatch": (lambda: ([torch.rand(1, 2, 5, 5), torch.rand(1, 2, 4, 4)], 0.5, "mean", 1), ValueError, r"attentions\[1\] has shape"),
    "not-square": (lambda: ([torch.rand(1, 2, 5, 4)], 0.5, "mean", 1), ValueError, r"shape \(B, heads, N, N\)"),
    "residual": (lambda: ([torch.rand(1, 2, 5, 5)], 1.5, "mean", 1), ValueError, r"residual must be in \[0, 1\]"),
    "head-fusion": (lambda: ([torch.rand(1, 2, 5, 5)], 0.5, "sum", 1), ValueError, "head_fusion must be one of"),
    "prefix": (lambda: ([torch.rand(1, 2, 5, 5)], 0.5, "mean", 5), ValueError, r"num_prefix_tokens must be in \[0, N\)"),
}


@pytest.mark.parametrize("case", EXT_BAD.values(), ids=EXT_BAD.keys())
def test_extension_checks_before_launch(case):
    """The C++ entry points check for themselves (TORCH_CHECK_VALUE / _TYPE), for direct callers."""
    module = needs_extension(torch.device("cpu"))
    make, error, message = case
    with pytest.raises(error, match=message):
        module.attention_rollout_row(*make())


# --- torch.library -------------------------------------------------------------------------------


@pytest.mark.parametrize("full", [False, True], ids=["row", "full"])
def test_opcheck(seed, device, full):
    attentions = make_attentions(2, 2, 3, 11, device=device)
    torch.library.opcheck(rollout_mod._attention_rollout_op, (attentions, 0.5, "mean", 1, full))


@pytest.mark.slow
def test_torch_compile_fullgraph(seed):
    attentions = make_attentions(3, 2, 3, 17)
    compiled = torch.compile(lambda attns: tk.attention_rollout(attns, head_fusion="max"), fullgraph=True)
    assert_close("compiled", compiled(attentions), rollout_fp64(attentions, head_fusion="max"), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("prefix", [0, 1, 2], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("path", ["auto", "torch", "reference"])
def test_block_order_class_row_and_prefix_columns(seed, device, path, prefix):
    """The documented semantics, written out on two different blocks: rollout = A'_2 @ A'_1 with
    attentions[0] as block 1, A'_l = (1 - r) * mean_h A_l + r * I with rows renormalised; the map
    is row 0 (the class token) on the columns >= num_prefix_tokens, divided by its sum."""
    residual = 0.3
    first, second = make_attentions(2, 1, 2, 6, device=device, kind="unnormalised")

    def layer(attention):
        mixed = (1 - residual) * attention[0].double().cpu().mean(0) + residual * torch.eye(6, dtype=torch.float64)
        return mixed / mixed.sum(-1, keepdim=True)

    product = layer(second) @ layer(first)
    assert (product - layer(first) @ layer(second)).abs().max() > 1e-3, "pick blocks whose order matters"
    full = tk.attention_rollout([first, second], residual=residual, full=True, impl=path)
    assert_close("rollout", full[0], product, atol=ATOL, rtol=RTOL)
    row = product[0, prefix:]
    amap = tk.attention_rollout([first, second], residual=residual, num_prefix_tokens=prefix, impl=path)
    assert_close("map", amap[0], row / row.sum(), atol=ATOL, rtol=RTOL)
