"""Backend choice: each op's declared backends, the one resolver, TransMix honouring its impl in
every op it calls, and the one fallback policy for a missing compiled extension."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from conftest import assert_equal, device_for
from tiny_models import IMAGE, _images, vit

import transmix_kernels as tk
from transmix_kernels import _ext
from transmix_kernels._dispatch import HAS_TRITON, TRITON_INTERPRET, Op, dispatch, resolve_backend
from transmix_kernels.boxes import BOXES
from transmix_kernels.class_attention_lambda import CLASS_ATTENTION_LAMBDA, CLASS_ATTENTION_ROW
from transmix_kernels.cutmix_paste import PASTE, PASTE_INPLACE
from transmix_kernels.qk_rollout import QK_ROLLOUT
from transmix_kernels.rollout import ROLLOUT
from transmix_kernels.transmix_lambda import LAMBDA_TARGETS

paste_module = sys.modules["transmix_kernels.cutmix_paste"]
lambda_module = sys.modules["transmix_kernels.transmix_lambda"]

CPU = torch.device("cpu")


# --- what each op declares ---------------------------------------------------------------------

EVERY = {"triton", "extension", "torch", "reference", "op"}
DECLARED = {
    # id: (op, its backends)
    "cutmix_paste": (PASTE, EVERY),
    "cutmix_paste-inplace": (PASTE_INPLACE, EVERY),
    "transmix_lambda": (LAMBDA_TARGETS, EVERY - {"extension"}),
    "class_attention_lambda": (CLASS_ATTENTION_LAMBDA, EVERY - {"extension"}),
    "class_attention_row": (CLASS_ATTENTION_ROW, EVERY - {"extension"}),
    "rollout_from_qk": (QK_ROLLOUT, EVERY - {"extension"}),
    "attention_rollout": (ROLLOUT, EVERY - {"triton"}),
    "sample_boxes": (BOXES, {"torch", "reference"}),
}


@pytest.mark.parametrize("op, backends", DECLARED.values(), ids=DECLARED.keys())
def test_each_op_declares_its_backends(op, backends):
    assert set(op.kernels) == backends
    assert (op.registered is not None) == ("op" in backends)
    assert (op.extension is not None) == ("extension" in backends)


@pytest.mark.parametrize("op, backends", DECLARED.values(), ids=DECLARED.keys())
def test_every_impl_resolves_to_a_declared_backend(op, backends):
    impls = [impl for impl in op.impls if impl != "triton" or TRITON_INTERPRET]
    for tracing in (False, True):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.compiler, "is_compiling", lambda: tracing)
            assert {resolve_backend(impl, CPU, op) for impl in impls} <= backends, f"tracing={tracing}"


class _RecordedOp:
    """Stands in for a torch.library op: records the kernels registered on it."""

    def __init__(self):
        self.kernels: list[tuple[str, object]] = []

    def register_kernel(self, device_type):
        return lambda fn: self.kernels.append((device_type, fn))


def test_declaring_an_op_registers_its_triton_kernel_for_cuda():
    def triton_kernel():  # pragma: no cover - never run
        pass

    registered = _RecordedOp()
    op = Op("demo", torch=print, reference=print, triton=triton_kernel, registered=registered)
    assert registered.kernels == ([("cuda", triton_kernel)] if HAS_TRITON else [])
    assert op.kernels["op"] is registered and op.kernels["triton"] is triton_kernel
    without_triton = _RecordedOp()
    Op("demo", torch=print, reference=print, registered=without_triton)
    assert without_triton.kernels == []


def test_dispatch_runs_the_named_backend(monkeypatch):
    ran = []
    for backend in ("torch", "reference"):
        monkeypatch.setitem(BOXES.kernels, backend, lambda *args, backend=backend, **kwargs: ran.append(backend))
    dispatch(BOXES, "reference", torch.rand(2), 5, 5)
    dispatch(BOXES, "torch", torch.rand(2), 5, 5, minmax=None)
    assert ran == ["reference", "torch"]


# --- the resolver -------------------------------------------------------------------------------

RESOLVED = {
    # id: (impl, op, tracing, backend)
    "auto-eager-lambda": ("auto", LAMBDA_TARGETS, False, "torch"),
    "auto-tracing-lambda": ("auto", LAMBDA_TARGETS, True, "op"),
    "auto-tracing-paste": ("auto", PASTE, True, "op"),
    "auto-tracing-boxes-not-an-op": ("auto", BOXES, True, "torch"),
    "torch-paste": ("torch", PASTE, False, "torch"),
    "reference-paste": ("reference", PASTE, False, "reference"),
    "reference-rollout": ("reference", ROLLOUT, False, "reference"),
}


@pytest.mark.parametrize("impl, op, tracing, backend", RESOLVED.values(), ids=RESOLVED.keys())
def test_resolver(monkeypatch, impl, op, tracing, backend):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: tracing)
    assert resolve_backend(impl, CPU, op) == backend


@pytest.mark.parametrize("op", [PASTE, PASTE_INPLACE, ROLLOUT], ids=["paste", "paste-inplace", "rollout"])
def test_resolver_auto_prefers_the_extension_on_cpu(op):
    want = "extension" if _ext.has_kernel(op.extension.function, CPU) else "torch"
    assert resolve_backend("auto", CPU, op) == want


@pytest.mark.skipif(not TRITON_INTERPRET, reason="impl='triton' on CPU tensors needs the interpreter")
def test_resolver_triton_without_a_kernel_runs_the_torch_path():
    assert resolve_backend("triton", CPU, LAMBDA_TARGETS) == "triton"
    assert resolve_backend("triton", CPU, BOXES) == "torch"


@pytest.mark.parametrize("impl, op, match", [
    ("triton", ROLLOUT, r"attention_rollout has no Triton kernel \(impl='triton'\); use impl in \('auto', 'torch'"),
    ("cuda", PASTE, r"impl must be one of \('auto', 'triton', 'torch', 'reference'\), got 'cuda'"),
    ("native", PASTE, r"impl must be one of"),
    ("op", LAMBDA_TARGETS, r"impl must be one of"),
], ids=["rollout-triton", "unknown", "native-is-internal", "op-is-internal"])
def test_resolver_rejects(impl, op, match):
    with pytest.raises(ValueError, match=match):
        resolve_backend(impl, CPU, op)


# --- TransMix and MixState run the backend their impl names -------------------------------------

SPIED = {"paste": PASTE_INPLACE, "lambda": LAMBDA_TARGETS, "class_attention": CLASS_ATTENTION_LAMBDA}


@pytest.fixture
def ran(monkeypatch) -> list[str]:
    """"<op>:<backend>" of the backends that ran, in order (each declared kernel wrapped by a spy)."""
    calls: list[str] = []

    def spy(name, original):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        return wrapper

    for label, op in SPIED.items():
        for backend, kernel in list(op.kernels.items()):
            monkeypatch.setitem(op.kernels, backend, spy(f"{label}:{backend}", kernel))
    return calls


def expected_backend(impl: str, device: torch.device, op) -> str:
    if impl == "auto":
        extension = op.extension
        if device.type == "cpu" and extension is not None and _ext.has_kernel(extension.function, CPU):
            return "extension"
        return "triton" if device.type == "cuda" else "torch"
    return impl


@pytest.mark.parametrize("impl", ["auto", "torch", "triton", "reference"])
def test_transmix_honours_impl(seed, ran, impl):
    device = device_for(impl)
    if impl == "triton" and device.type == "cpu" and not TRITON_INTERPRET:
        pytest.skip("impl='triton' on CPU tensors needs the interpreter")
    model = vit().to(device)
    images = _images(IMAGE["vit"], batch=4).to(device)
    labels = torch.randint(0, 5, (4,), device=device)
    transmix = tk.TransMix(5, mixup_alpha=0.0, cutmix_alpha=1.0, mode="elem", model=model, seed=0, impl=impl)
    lam_backend = expected_backend(impl, device, LAMBDA_TARGETS)
    run = f"lambda:{lam_backend}"

    mixed, mix = transmix(images, labels)
    assert ran == [f"paste:{expected_backend(impl, device, PASTE_INPLACE)}"], "paste"
    ran.clear()
    mix.targets()
    assert ran == [run], "area targets"
    ran.clear()
    mix.targets(torch.rand(4, 2, 36, device=device).softmax(-1))
    assert ran == [run], "attention-tensor targets"
    ran.clear()
    with tk.ClassAttentionProbe(model) as probe:
        model(mixed)
        mix.targets(probe)
    assert ran == [f"class_attention:{lam_backend}", run], "probe targets"


# --- one fallback policy for a missing extension --------------------------------------------------


def _fallback_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "falls back" in str(w.message)]


def test_missing_extension_warns_once_for_every_op(seed, missing_extension):
    """The CPU paste and rollout fall back alike: one warning in all, naming the reason, the first
    op and the caller's line; the results are the PyTorch path's."""
    images = torch.randn(4, 3, 9, 11)
    boxes = torch.tensor([[0, 9, 0, 11], [2, 2, 1, 5], [1, 6, 3, 10], [4, 9, 0, 3]], dtype=torch.int32)
    attentions = [torch.rand(2, 3, 7, 7).softmax(-1) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mixed, token_mask = tk.cutmix_paste(images, boxes, token_grid=(3, 3))
        tk.cutmix_paste(images.clone(), boxes, inplace=True)
        tk.TransMix(5, mixup_alpha=0.0, mode="elem", seed=0)(images.clone(), torch.randint(0, 5, (4,)))
        tk.attention_rollout(attentions)
    messages = _fallback_warnings(caught)
    assert len(messages) == 1, messages
    assert "simulated: no _C here" in messages[0] and "cutmix_paste falls back" in messages[0]
    assert [w.filename for w in caught if "falls back" in str(w.message)] == [__file__], "should point at the caller"
    want, want_mask = tk.cutmix_paste(images, boxes, token_grid=(3, 3), impl="torch")
    assert_equal("mixed", mixed, want)
    assert_equal("token_mask", token_mask, want_mask)


class _ExtensionWithoutPaste:
    """An extension built from sources older than the compiled CPU paste."""

    @staticmethod
    def build_info():
        return {"built_with_cuda": False}

    @staticmethod
    def attention_rollout_row(*args):  # pragma: no cover - present only to be found
        raise AssertionError("not called by this test")


def test_extension_without_the_op_falls_back_with_the_reason(seed, monkeypatch):
    monkeypatch.setattr(_ext, "_LOADED", _ext._Loaded(_ExtensionWithoutPaste, None))
    monkeypatch.setattr(_ext, "_FALLBACK_WARNED", set())
    images = torch.randn(2, 3, 5, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mixed, _ = tk.cutmix_paste(images, torch.tensor([1, 4, 0, 3]))
    messages = _fallback_warnings(caught)
    assert len(messages) == 1 and "has no function cutmix_paste_cpu_" in messages[0], messages
    assert_equal("mixed", mixed, tk.cutmix_paste(images, torch.tensor([1, 4, 0, 3]), impl="torch")[0])


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_explicit_impl_never_warns(seed, missing_extension, impl):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tk.cutmix_paste(torch.randn(2, 3, 5, 5), torch.tensor([1, 4, 0, 3]), impl=impl)
        tk.TransMix(5, mixup_alpha=0.0, seed=0, impl=impl)(torch.randn(2, 3, 5, 5), torch.randint(0, 5, (2,)))
        tk.attention_rollout([torch.rand(2, 3, 7, 7).softmax(-1)], impl=impl)


# --- the registered ops' own CPU bodies --------------------------------------------------------

B_OP = 6


def _op_cases():
    lam, target, partner = torch.rand(B_OP, dtype=torch.float64), torch.randint(0, 5, (B_OP,)), torch.randperm(B_OP)
    attn, mask = torch.rand(B_OP, 2, 9).softmax(-1), (torch.rand(B_OP, 9) < 0.5).float()
    images, box = torch.randn(B_OP, 3, 8, 8), torch.tensor([1, 5, 2, 6])
    return {
        "targets-only": (lambda_module._lambda_targets_op, (None, None, lam, target, partner, 5, 0.0, 0.1)),
        "lambda-and-targets": (lambda_module._lambda_targets_op, (attn, mask, lam.float(), target, partner, 5, 0.5, 0.1)),
        "lambda-only": (lambda_module._lambda_targets_op, (attn, mask, lam.float(), None, None, 5, 0.5, 0.1)),
        "paste-no-grid": (paste_module._cutmix_paste_op, (images, box, partner, 0, 0)),
        "paste-grid": (paste_module._cutmix_paste_op, (images, box, partner, 2, 2)),
        "paste-inplace-no-grid": (paste_module._cutmix_paste_inplace_op, (images.clone(), box, partner, 0, 0, 4, 4)),
    }


@pytest.mark.parametrize("case", list(_op_cases()))
def test_registered_ops_pass_opcheck(seed, case):
    """Schema, fake implementation and aliasing of the ops whose CPU bodies pick their kernel with
    auto_backend (and may return NumPy-backed tensors)."""
    op, args = _op_cases()[case]
    torch.library.opcheck(op, args)
