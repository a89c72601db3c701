"""Bad input to the mixing ops and tk.TransMix: the right exception, a message naming the argument,
raised before any work (the backends are replaced by tripwires) and the caller's tensors unchanged."""

from __future__ import annotations

import sys

import pytest
import torch

import transmix_kernels as tk

from transmix_kernels.boxes import BOXES
from transmix_kernels.cutmix_paste import PASTE, PASTE_INPLACE
from transmix_kernels.transmix_lambda import LAMBDA_TARGETS

mixer_module = sys.modules["transmix_kernels.mixer"]
dispatch_module = sys.modules["transmix_kernels._dispatch"]

B, C, H, W, K, N = 4, 3, 9, 11, 7, 6


@pytest.fixture
def inputs(seed):
    """Valid inputs; each case spoils one of them."""
    return {
        "images": torch.randn(B, C, H, W),
        "boxes": torch.tensor([[0, 9, 0, 11], [2, 2, 1, 5], [1, 6, 3, 10], [4, 9, 0, 3]], dtype=torch.int32),
        "partner": torch.randperm(B),
        "attn": torch.softmax(torch.randn(B, 2, N), -1),
        "token_mask": (torch.rand(B, N) < 0.5).float(),
        "lam": torch.rand(B, dtype=torch.float64),
        "target": torch.randint(0, K, (B,)),
    }


@pytest.fixture
def no_work(monkeypatch):
    """Tripwires on every backend entry point: a check that runs after work started fails the test."""

    def tripwire(*args, **kwargs):
        raise AssertionError("work started before the inputs were validated")

    for op in (PASTE, PASTE_INPLACE, LAMBDA_TARGETS, BOXES):
        for backend in op.kernels:
            monkeypatch.setitem(op.kernels, backend, tripwire)
    monkeypatch.setattr(mixer_module.TransMix, "_mix", tripwire)


def paste(t, **kw):
    args = {"images": t["images"], "boxes": t["boxes"], "partner": t["partner"], **kw}
    return tk.cutmix_paste(args.pop("images"), args.pop("boxes"), args.pop("partner"), **args)


def boxes_with(t, row, values):
    b = t["boxes"].clone()
    b[row] = torch.tensor(values)
    return b


def lam_args(t, **kw):
    args = {"attn": t["attn"], "token_mask": t["token_mask"], "lam_area": t["lam"], **kw}
    return args.pop("attn"), args.pop("token_mask"), args.pop("lam_area"), args


def tlambda(t, **kw):
    attn, mask, lam, rest = lam_args(t, **kw)
    return tk.transmix_lambda(attn, mask, lam, **rest)


def ttargets(t, **kw):
    attn, mask, lam, rest = lam_args(t, **kw)
    target, num_classes = rest.pop("target", t["target"]), rest.pop("num_classes", K)
    return tk.transmix_targets(attn, mask, lam, target, num_classes, **rest)


def mtargets(t, **kw):
    args = {"target": t["target"], "lam": t["lam"], "num_classes": K, **kw}
    return tk.mix_targets(args.pop("target"), args.pop("lam"), args.pop("num_classes"), **args)


def sboxes(t, **kw):
    args = {"lam": t["lam"], "height": H, "width": W, **kw}
    return tk.sample_boxes(args.pop("lam"), args.pop("height"), args.pop("width"), **args)


def mixer_call(t, images=None, target=None, **kw):
    mixer = tk.TransMix(K, seed=0, **{"patch_size": 3, **kw})
    return mixer(t["images"] if images is None else images, t["target"] if target is None else target)


def case(call, exc, match, id):
    return pytest.param(call, exc, match, id=id)


CASES = [
    # ---------------------------------------------------------------- cutmix_paste
    case(lambda t: paste(t, images=t["images"][0]), ValueError, r"images must have 4 dimensions", "paste-images-rank"),
    case(lambda t: paste(t, images=t["images"].to(torch.uint8)), TypeError, r"images must have dtype", "paste-images-int"),
    case(lambda t: paste(t, images=t["images"].double()), TypeError, r"images must have dtype", "paste-images-f64"),
    case(lambda t: paste(t, images=t["images"].numpy()), TypeError, r"images must be a torch.Tensor", "paste-images-numpy"),
    case(lambda t: paste(t, boxes=t["boxes"].float()), TypeError, r"boxes must have dtype", "paste-boxes-float"),
    case(lambda t: paste(t, boxes=t["boxes"][:, :3]), ValueError, r"boxes must have shape", "paste-boxes-3-cols"),
    case(lambda t: paste(t, boxes=torch.cat([t["boxes"], t["boxes"][:1]])), ValueError, r"boxes must have shape \(4, 4\)",
         "paste-boxes-batch"),
    case(lambda t: paste(t, boxes=t["boxes"].view(2, 2, 4)), ValueError, r"boxes must have 1 or 2 dimensions",
         "paste-boxes-rank"),
    case(lambda t: paste(t, boxes=boxes_with(t, 1, [2, H + 1, 1, 5])), ValueError, r"boxes must lie inside",
         "paste-boxes-below"),
    case(lambda t: paste(t, boxes=boxes_with(t, 3, [0, 2, -1, 5])), ValueError, r"boxes must lie inside",
         "paste-boxes-left"),
    case(lambda t: paste(t, boxes=torch.tensor([0, 3, 0, W + 2])), ValueError, r"boxes must lie inside",
         "paste-one-box-right"),
    case(lambda t: paste(t, boxes=boxes_with(t, 2, [6, 1, 3, 10])), ValueError, r"boxes must not be inverted",
         "paste-boxes-inverted-y"),
    case(lambda t: paste(t, boxes=boxes_with(t, 0, [0, 9, 8, 7])), ValueError, r"boxes must not be inverted",
         "paste-boxes-inverted-x"),
    case(lambda t: paste(t, partner=torch.tensor([0, 1, 2, B])), ValueError, r"partner must hold values in \[0, 4\)",
         "paste-partner-high"),
    case(lambda t: paste(t, partner=torch.tensor([0, -1, 2, 3])), ValueError, r"partner must hold values",
         "paste-partner-negative"),
    case(lambda t: paste(t, partner=t["partner"][:3]), ValueError, r"partner must have shape \(4,\)",
         "paste-partner-length"),
    case(lambda t: paste(t, partner=t["partner"].int()), TypeError, r"partner must have dtype", "paste-partner-int32"),
    case(lambda t: paste(t, partner=t["partner"].float()), TypeError, r"partner must have dtype", "paste-partner-float"),
    case(lambda t: paste(t, token_grid=(H + 1, 2)), ValueError, r"token_grid .* larger than the image",
         "paste-grid-too-large"),
    case(lambda t: paste(t, token_grid=(0, 3)), ValueError, r"token_grid must hold positive ints", "paste-grid-zero"),
    case(lambda t: paste(t, token_grid=5), ValueError, r"token_grid must be a \(gh, gw\) pair", "paste-grid-int"),
    case(lambda t: paste(t, inplace="yes"), TypeError, r"inplace must be a bool", "paste-inplace-type"),
    case(lambda t: paste(t, images=t["images"][..., ::2], boxes=t["boxes"].clamp(max=6), inplace=True), ValueError,
         r"inplace=True needs images contiguous", "paste-inplace-strided"),
    case(lambda t: paste(t, impl="cuda"), ValueError, r"impl must be one of", "paste-impl"),
    # ---------------------------------------------------------------- sample_boxes
    case(lambda t: sboxes(t, lam=t["lam"].view(2, 2)), ValueError, r"lam must have 1 dimensions", "boxes-lam-rank"),
    case(lambda t: sboxes(t, lam=t["target"]), TypeError, r"lam must have dtype", "boxes-lam-int"),
    case(lambda t: sboxes(t, lam=t["lam"] + 1.5), ValueError, r"lam must hold values in \[0, 1\]", "boxes-lam-high"),
    case(lambda t: sboxes(t, lam=t["lam"] * float("nan")), ValueError, r"lam must hold values", "boxes-lam-nan"),
    case(lambda t: sboxes(t, height=0), ValueError, r"height must be a positive int", "boxes-height"),
    case(lambda t: sboxes(t, width=2.5), ValueError, r"width must be a positive int", "boxes-width"),
    case(lambda t: sboxes(t, minmax=(0.8, 0.2)), ValueError, r"minmax", "boxes-minmax-order"),
    case(lambda t: sboxes(t, minmax=(0.2,)), ValueError, r"minmax must be a \(min, max\) pair", "boxes-minmax-len"),
    case(lambda t: sboxes(t, minmax=(-0.1, 0.5)), ValueError, r"minmax\[0\] must be in", "boxes-minmax-range"),
    case(lambda t: sboxes(t, height=3, minmax=(0.1, 0.2)), ValueError, r"minmax=.* empty range", "boxes-minmax-empty"),
    case(lambda t: sboxes(t, impl="fast"), ValueError, r"impl must be one of", "boxes-impl"),
    # ---------------------------------------------------------------- transmix_lambda / transmix_targets / mix_targets
    case(lambda t: tlambda(t, attn=t["attn"][None]), ValueError, r"attn must have 2 or 3 dimensions", "lambda-attn-rank"),
    case(lambda t: tlambda(t, attn=t["target"].view(B, 1).expand(B, N)), TypeError, r"attn must have dtype",
         "lambda-attn-int"),
    case(lambda t: tlambda(t, token_mask=t["token_mask"].long()), TypeError, r"token_mask must have dtype",
         "lambda-mask-int"),
    case(lambda t: tlambda(t, token_mask=t["token_mask"][None]), ValueError, r"token_mask must have 2 dimensions",
         "lambda-mask-rank"),
    case(lambda t: tlambda(t, token_mask=torch.cat([t["token_mask"], t["token_mask"][:1]])), ValueError,
         r"token_mask must have batch size 4", "lambda-mask-batch"),
    case(lambda t: tlambda(t, lam_area=t["lam"][:3]), ValueError, r"lam_area must have batch size 4", "lambda-lam-batch"),
    case(lambda t: tlambda(t, lam_area=t["lam"].half()), TypeError, r"lam_area must have dtype", "lambda-lam-fp16"),
    case(lambda t: tlambda(t, token_mask=t["token_mask"][:, :5]), ValueError,
         r"attn and token_mask must cover the same tokens", "lambda-token-count"),
    case(lambda t: tlambda(t, ratio=1.5), ValueError, r"ratio must be in \[0.0, 1.0\]", "lambda-ratio-high"),
    case(lambda t: tlambda(t, ratio="half"), TypeError, r"ratio must be a number", "lambda-ratio-type"),
    case(lambda t: tlambda(t, impl="cuda"), ValueError, r"impl must be one of", "lambda-impl"),
    case(lambda t: ttargets(t, attn=t["attn"][..., :5]), ValueError, r"attn and token_mask must cover", "targets-tokens"),
    case(lambda t: ttargets(t, smoothing=1.5), ValueError, r"smoothing must be in", "targets-smoothing"),
    case(lambda t: ttargets(t, ratio=-0.1), ValueError, r"ratio must be in", "targets-ratio"),
    case(lambda t: ttargets(t, target=t["target"].clamp(max=K - 1) + (torch.arange(B) == 2) * K), ValueError,
         r"target must hold values in \[0, 7\)", "targets-label-high"),
    case(lambda t: ttargets(t, partner=t["partner"][:2]), ValueError, r"partner must have shape", "targets-partner-len"),
    case(lambda t: ttargets(t, num_classes=0), ValueError, r"num_classes must be a positive int", "targets-classes"),
    case(lambda t: mtargets(t, target=t["target"] - K), ValueError, r"target must hold values", "mix-label-negative"),
    case(lambda t: mtargets(t, target=t["target"].int()), TypeError, r"target must have dtype", "mix-target-int32"),
    case(lambda t: mtargets(t, target=t["target"][:3]), ValueError, r"target must have shape \(4,\)", "mix-target-len"),
    case(lambda t: mtargets(t, num_classes=7.0), ValueError, r"num_classes must be a positive int", "mix-classes-float"),
    case(lambda t: mtargets(t, num_classes=True), ValueError, r"num_classes must be a positive int", "mix-classes-bool"),
    case(lambda t: mtargets(t, smoothing=-0.1), ValueError, r"smoothing must be in", "mix-smoothing"),
    case(lambda t: mtargets(t, partner=torch.tensor([3, 2, 1, 4])), ValueError, r"partner must hold values",
         "mix-partner-high"),
    case(lambda t: mtargets(t, partner=t["partner"].int()), TypeError, r"partner must have dtype", "mix-partner-int32"),
    case(lambda t: mtargets(t, lam=t["lam"].view(2, 2)), ValueError, r"lam must have 1 dimensions", "mix-lam-rank"),
    case(lambda t: mtargets(t, lam=t["target"]), TypeError, r"lam must have dtype", "mix-lam-int"),
    case(lambda t: mtargets(t, impl="gpu"), ValueError, r"impl must be one of", "mix-impl"),
    # ---------------------------------------------------------------- TransMix hyper-parameters
    case(lambda t: tk.TransMix(K, mixup_alpha=-1.0), ValueError, r"mixup_alpha must be a finite number", "tm-mixup-alpha"),
    case(lambda t: tk.TransMix(K, mixup_alpha=float("nan")), ValueError, r"mixup_alpha", "tm-mixup-alpha-nan"),
    case(lambda t: tk.TransMix(K, mixup_alpha="0.8"), TypeError, r"mixup_alpha must be a number", "tm-mixup-alpha-type"),
    case(lambda t: tk.TransMix(K, cutmix_alpha=-0.5), ValueError, r"cutmix_alpha must be", "tm-cutmix-alpha"),
    case(lambda t: tk.TransMix(K, mixup_alpha=0.0, cutmix_alpha=0.0), ValueError, r"mixup_alpha and cutmix_alpha",
         "tm-both-zero"),
    case(lambda t: tk.TransMix(K, mode="random"), ValueError, r"mode must be one of", "tm-mode"),
    case(lambda t: tk.TransMix(K, prob=1.5), ValueError, r"prob must be in", "tm-prob-high"),
    case(lambda t: tk.TransMix(K, prob=-0.1), ValueError, r"prob must be in", "tm-prob-negative"),
    case(lambda t: tk.TransMix(K, switch_prob=2), ValueError, r"switch_prob must be in", "tm-switch-prob"),
    case(lambda t: tk.TransMix(K, cutmix_minmax=(0.8, 0.2)), ValueError, r"cutmix_minmax must have min < max",
         "tm-minmax-order"),
    case(lambda t: tk.TransMix(K, cutmix_minmax=(0.2,)), ValueError, r"cutmix_minmax must be a \(min, max\) pair",
         "tm-minmax-len"),
    case(lambda t: tk.TransMix(K, cutmix_minmax=(0.2, 1.5)), ValueError, r"cutmix_minmax\[1\] must be in",
         "tm-minmax-range"),
    case(lambda t: tk.TransMix(0), ValueError, r"num_classes must be a positive int", "tm-classes-zero"),
    case(lambda t: tk.TransMix(-3), ValueError, r"num_classes", "tm-classes-negative"),
    case(lambda t: tk.TransMix(10.0), ValueError, r"num_classes", "tm-classes-float"),
    case(lambda t: tk.TransMix(K, label_smoothing=1.5), ValueError, r"label_smoothing must be in", "tm-smoothing"),
    case(lambda t: tk.TransMix(K, ratio=2), ValueError, r"ratio must be in", "tm-ratio"),
    case(lambda t: tk.TransMix(K, patch_size=0), ValueError, r"patch_size must be a positive int", "tm-patch-zero"),
    case(lambda t: tk.TransMix(K, patch_size=(4,)), ValueError, r"patch_size", "tm-patch-len"),
    case(lambda t: tk.TransMix(K, token_grid=(0, 3)), ValueError, r"token_grid must be", "tm-grid-zero"),
    case(lambda t: tk.TransMix(K, impl="gpu"), ValueError, r"impl must be one of", "tm-impl"),
    # ---------------------------------------------------------------- TransMix call
    case(lambda t: mixer_call(t, images=t["images"][0]), ValueError, r"images must have 4 dimensions", "call-images-rank"),
    case(lambda t: mixer_call(t, images=t["images"].to(torch.uint8)), TypeError, r"images must have dtype",
         "call-images-int"),
    case(lambda t: mixer_call(t, target=t["target"][:3]), ValueError, r"target must have shape \(4,\)",
         "call-target-len"),
    case(lambda t: mixer_call(t, target=t["target"].int()), TypeError, r"target must have dtype", "call-target-int32"),
    case(lambda t: mixer_call(t, target=t["target"] + K), ValueError, r"target must hold values", "call-label-high"),
    case(lambda t: mixer_call(t, images=t["images"][:0], target=t["target"][:0]), ValueError,
         r"images must hold at least one sample", "call-empty-batch"),
    case(lambda t: mixer_call(t, images=t["images"][:3], target=t["target"][:3], mode="pair"), ValueError,
         r"mode='pair' needs an even batch size", "call-pair-odd"),
    case(lambda t: mixer_call(t, token_grid=(H + 1, 2)), ValueError, r"token grid .* does not fit", "call-grid-large"),
    case(lambda t: mixer_call(t, patch_size=H + 3), ValueError, r"token grid .* does not fit", "call-patch-large"),
    case(lambda t: mixer_call(t, images=t["images"][..., ::2]), ValueError, r"images must be contiguous or channels_last",
         "call-images-strided"),
]


@pytest.mark.parametrize("call, exc, match", CASES)
def test_bad_input(inputs, no_work, call, exc, match):
    before = {name: value.clone() for name, value in inputs.items()}
    with pytest.raises(exc, match=match):
        call(inputs)
    for name, value in inputs.items():
        assert torch.equal(value, before[name]), f"{name} was modified by a call that failed"


@pytest.fixture
def mix_state(seed):
    x = torch.randn(B, C, H, W)
    _, mix = tk.TransMix(K, seed=0, patch_size=3, mixup_alpha=0.0, cutmix_alpha=1.0)(x, torch.randint(0, K, (B,)))
    assert mix.kind == "cutmix" and mix.token_grid == (3, 3)
    return mix


def test_targets_bad_attention(mix_state):
    attn = torch.softmax(torch.randn(B, 2, 9), -1)
    with pytest.raises(ValueError, match=r"attention has 8 patch tokens but the token grid is \(3, 3\)"):
        mix_state.targets(attn[..., :8])
    with pytest.raises(ValueError, match=r"batch size"):
        mix_state.targets(attn[:3])
    with pytest.raises(TypeError, match=r"targets\(\) takes None, an attention tensor"):
        mix_state.targets("attention")
    with pytest.raises(TypeError, match=r"attn must have dtype"):
        mix_state.targets((attn * 100).long())


TRITON_CALLS = {
    "cutmix_paste": lambda t: paste(t, impl="triton"),
    "sample_boxes": lambda t: sboxes(t, impl="triton"),
    "transmix_lambda": lambda t: tlambda(t, impl="triton"),
    "transmix_targets": lambda t: ttargets(t, impl="triton"),
    "mix_targets": lambda t: mtargets(t, impl="triton"),
    "TransMix": lambda t: mixer_call(t, impl="triton"),
}


@pytest.mark.parametrize("call", TRITON_CALLS.values(), ids=TRITON_CALLS.keys())
def test_triton_on_cpu_without_interpreter(monkeypatch, inputs, no_work, call):
    monkeypatch.setattr(dispatch_module, "TRITON_INTERPRET", False)
    before = {name: value.clone() for name, value in inputs.items()}
    with pytest.raises(RuntimeError, match=r"impl='triton' got CPU tensors"):
        call(inputs)
    for name, value in inputs.items():
        assert torch.equal(value, before[name]), f"{name} was modified by a call that failed"


VALID_CALLS = {
    "cutmix_paste": lambda t: paste(t),
    "cutmix_paste-inplace": lambda t: paste(t, inplace=True, impl="torch"),
    "sample_boxes": lambda t: sboxes(t),
    "transmix_lambda": lambda t: tlambda(t, impl="reference"),
    "transmix_targets": lambda t: ttargets(t),
    "mix_targets": lambda t: mtargets(t, impl="torch"),
    "TransMix": lambda t: mixer_call(t),
}


@pytest.mark.parametrize("call", VALID_CALLS.values(), ids=VALID_CALLS.keys())
def test_tripwires_are_armed(inputs, no_work, call):
    """The no_work fixture really catches work: valid input reaches a tripwire."""
    with pytest.raises(AssertionError, match="work started"):
        call(inputs)
