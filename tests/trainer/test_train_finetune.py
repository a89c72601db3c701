"""Starting weights (--pretrained, --pretrained-path, --initial-checkpoint), fine-tuning as timm does
it (new head, resampled position embeddings, --layer-decay), DeiT's teacher by name
(--teacher-model with --teacher-path / --teacher-pretrained), and the fine-tune config.

Every weights file is made here: a tiny timm DeiT saved as .safetensors and as .pth, and a real
transmix-train checkpoint from a one-epoch tiny run. No network: the hub flags are tested offline.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import sklearn  # noqa: F401  (the digits data: a missing extra fails here, never skips)
import timm
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.loss import SoftTargetCrossEntropy

from train_tiny import TINY, read_metrics
from transmix_train.build import build_run
from transmix_train.config import default_config_path, parse_args
from transmix_train.distributed import init_processes
from transmix_train.main import main, run_training

# The packaged configs, found as transmix-train finds its default one.
CONFIGS = default_config_path().parent
TINY_VIT = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)  # TINY's model at any size and class count
HEAD = ("head.weight", "head.bias")


def _tiny_vit(img_size: int, num_classes: int, **kwargs) -> torch.nn.Module:
    return timm.create_model("deit_tiny_patch16_224", img_size=img_size, num_classes=num_classes,
                             **{**TINY_VIT, **kwargs})


def _save(state: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def _build(argv: list[str], output: Path):
    return build_run(parse_args([*argv, "--output", str(output)]), init_processes("cpu", None), lambda message: None)


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A transmix-train checkpoint: one tiny epoch on digits at 16 px (10 classes), with EMA."""
    output = tmp_path_factory.mktemp("pretrain") / "run"
    main([*TINY, "--epochs", "1", "--model-ema", "--model-ema-decay", "0.5", "--output", str(output)])
    return output / "last.pth"


def _file_weights(kind: str, folder: Path, trained_checkpoint: Path) -> tuple[Path, dict]:
    """(the file, the state dict it holds): a 32 px, 1000-class timm model, or the trained checkpoint."""
    if kind == "checkpoint":
        checkpoint = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
        return trained_checkpoint, checkpoint["state_dict_ema"]  # timm's load_state_dict prefers EMA weights
    state = _tiny_vit(32, 1000).state_dict()
    return _save(state, folder / f"weights.{kind}"), state


@pytest.mark.parametrize("kind", ["safetensors", "pth", "checkpoint"])
def test_pretrained_path_fine_tunes_with_new_head_and_resampled_pos_embed(kind, tmp_path, trained_checkpoint):
    path, state = _file_weights(kind, tmp_path, trained_checkpoint)
    # Another size and another class count than the file's: synthetic data, 7 classes; 24 px when the
    # file is 32 px (grid 8 -> 6), 32 px when it is the 16 px checkpoint (grid 4 -> 8).
    size = 32 if kind == "checkpoint" else 24
    argv = [*TINY, "--data", "synthetic", "--num-classes", "7", "--img-size", str(size), "--train-size", "32",
            "--val-size", "16", "--model-kwargs", f"img_size={size}", "--epochs", "1", "--pretrained-path", str(path)]
    run = _build(argv, tmp_path / "run")
    loaded = run.module.state_dict()

    for key, tensor in state.items():
        if key not in (*HEAD, "pos_embed"):
            assert torch.equal(loaded[key], tensor), f"{key} is not the file's"
    assert loaded["head.weight"].shape == (7, 32) and loaded["head.bias"].shape == (7,)
    grid = size // 4
    expected = resample_abs_pos_embed(state["pos_embed"], new_size=(grid, grid), num_prefix_tokens=1)
    assert loaded["pos_embed"].shape == (1, 1 + grid * grid, 32)
    torch.testing.assert_close(loaded["pos_embed"], expected)

    run_training(run, lambda message: None)
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 1 and float(rows[0]["train_loss"]) > 0


def test_same_class_count_keeps_the_head(tmp_path):
    state = _tiny_vit(32, 10).state_dict()
    path = _save(state, tmp_path / "w.safetensors")
    run = _build([*TINY, "--pretrained-path", str(path)], tmp_path / "run")  # digits: 10 classes, 16 px
    for key in HEAD:
        assert torch.equal(run.module.state_dict()[key], state[key]), f"{key} was replaced"


def test_initial_checkpoint_loads_every_key(tmp_path):
    state = _tiny_vit(16, 10).state_dict()  # exactly TINY's model on digits
    path = _save(state, tmp_path / "w.pth")
    run = _build([*TINY, "--initial-checkpoint", str(path)], tmp_path / "run")
    for key, tensor in state.items():
        assert torch.equal(run.module.state_dict()[key], tensor), f"{key} is not the file's"


def test_layer_decay_reaches_the_optimizer(tmp_path):
    run = _build([*TINY, "--layer-decay", "0.5", "--warmup-epochs", "0", "--lr", "1e-3"], tmp_path / "run")
    # timm's layer ids for depth 2: 0 = embeddings, 1-2 = blocks, 3 = head; scale 0.5 ** (3 - id).
    scales = {}
    for group in run.optimizer.param_groups:
        names = {name for name, p in run.module.named_parameters() if any(p is q for q in group["params"])}
        for name in names:
            scales[name] = group["lr_scale"]
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])
    assert scales["head.weight"] == 1.0 and scales["blocks.1.attn.qkv.weight"] == 0.5
    assert scales["blocks.0.attn.qkv.weight"] == 0.25 and scales["pos_embed"] == 0.125


def _teacher_file(folder: Path, favourite: int) -> Path:
    """Weights of timm's tiny test_resnet for 10 classes, biased to always predict ``favourite``."""
    teacher = timm.create_model("test_resnet", num_classes=10)
    state = teacher.state_dict()
    state["fc.bias"] = torch.full((10,), -50.0)
    state["fc.bias"][favourite] = 50.0
    return _save(state, folder / "teacher.safetensors")


def test_teacher_by_name_drives_the_distillation_loss(tmp_path):
    path = _teacher_file(tmp_path, favourite=7)
    argv = [*TINY, "--model", "deit_tiny_distilled_patch16_224", "--distillation-type", "hard",
            "--distillation-alpha", "0.3", "--teacher-model", "test_resnet", "--teacher-path", str(path)]
    run = _build(argv, tmp_path / "run")
    reference = timm.create_model("test_resnet", num_classes=10).eval()
    reference.load_state_dict(timm.models.load_state_dict(str(path)))
    for key, tensor in reference.state_dict().items():
        assert torch.equal(run.criterion.teacher.state_dict()[key], tensor), f"teacher {key} is not the file's"

    torch.manual_seed(0)
    images, targets = torch.randn(4, 3, 16, 16), torch.softmax(torch.randn(4, 10), dim=1)
    outputs = run.module(images)
    loss = run.criterion(images, outputs, targets)
    assert reference(images).argmax(1).tolist() == [7] * 4
    by_hand = 0.7 * SoftTargetCrossEntropy()(outputs[0], targets) + 0.3 * F.cross_entropy(outputs[1],
                                                                                          torch.full((4,), 7))
    torch.testing.assert_close(loss, by_hand)


def _expect_error(argv: list[str], named: str, tmp_path: Path, capsys) -> None:
    output = tmp_path / "run"
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output", str(output)])
    assert time.monotonic() - started < 20, "the error took long to come"
    message = f"{exit_info.value.code} {capsys.readouterr().err}"
    assert named in message, message
    assert not output.exists(), "a bad configuration left an output folder behind"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and empty caches: what CI and this machine are."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def test_pretrained_offline_fails_at_once_naming_the_way_out(tmp_path, capsys, offline):
    _expect_error([*TINY, "--pretrained"], "--pretrained: the pretrained weights of 'deit_tiny_patch16_224'",
                  tmp_path, capsys)
    _expect_error([*TINY, "--pretrained"], "pass the file with --pretrained-path FILE", tmp_path, capsys)
    teacher = [*TINY, "--model", "deit_tiny_distilled_patch16_224", "--distillation-type", "hard",
               "--teacher-model", "test_resnet", "--teacher-pretrained"]
    _expect_error(teacher, "--teacher-pretrained: the pretrained weights of 'test_resnet'", tmp_path, capsys)
    _expect_error(teacher, "pass the file with --teacher-path FILE", tmp_path, capsys)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("weights")
    garbage = folder / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    return {
        "garbage": garbage,
        "deeper": _save(_tiny_vit(16, 10, depth=3).state_dict(), folder / "deeper.safetensors"),
        "bigger": _save(_tiny_vit(32, 10).state_dict(), folder / "bigger.pth"),
        "teacher": _teacher_file(folder, favourite=1),
        "teacher1000": _save(timm.create_model("test_resnet").state_dict(), folder / "teacher1000.pth"),
    }


DISTILLED = ["--model", "deit_tiny_distilled_patch16_224", "--distillation-type", "hard"]
BAD_WEIGHTS = {
    "path-missing": (["--pretrained-path", "/nonexistent/w.pth"], "--pretrained-path /nonexistent/w.pth: no such file"),
    "path-garbage": (["--pretrained-path", "{garbage}"], "garbage.pth: not a readable weights file"),
    "path-unfit": (["--pretrained-path", "{deeper}"], "deeper.safetensors: the weights do not fit --model"),
    "initial-missing": (["--initial-checkpoint", "/nonexistent/w.pth"], "--initial-checkpoint /nonexistent/w.pth"),
    "initial-unfit": (["--initial-checkpoint", "{bigger}"], "bigger.pth: cannot be loaded into --model"),
    "teacher-name": ([*DISTILLED, "--teacher-model", "regnety_1600", "--teacher-path", "{teacher}"],
                     "--teacher-model 'regnety_1600': not a timm model name"),
    "teacher-no-weights": ([*DISTILLED, "--teacher-model", "test_resnet"],
                           "--teacher-model test_resnet: needs its weights from exactly one of"),
    "teacher-path-alone": ([*DISTILLED, "--teacher-path", "{teacher}"], "--teacher-path gives the weights of"),
    "teacher-both": ([*DISTILLED, "--teacher", "{teacher}", "--teacher-model", "test_resnet", "--teacher-path",
                      "{teacher}"], "--teacher-model: give either --teacher CKPT"),
    "teacher-path-missing": ([*DISTILLED, "--teacher-model", "test_resnet", "--teacher-path", "/nonexistent/t.pth"],
                             "--teacher-path /nonexistent/t.pth: no such file"),
    "teacher-path-unfit": ([*DISTILLED, "--teacher-model", "test_resnet", "--teacher-path", "{bigger}"],
                           "bigger.pth: the weights do not fit --teacher-model 'test_resnet'"),
    "teacher-classes": ([*DISTILLED, "--teacher-model", "test_resnet", "--teacher-path", "{teacher1000}"],
                        "predict 1000 classes, the data has 10"),
    "distill-without-teacher": (DISTILLED, "needs --teacher CKPT or --teacher-model NAME"),
}


@pytest.mark.parametrize("case", sorted(BAD_WEIGHTS))
def test_bad_weights_are_named_before_writing(case, tmp_path, capsys, weight_files):
    extra, named = BAD_WEIGHTS[case]
    argv = [*TINY, *(arg.format(**weight_files) for arg in extra)]
    _expect_error(argv, named, tmp_path, capsys)


def test_resume_does_not_read_the_pretrained_file_again(tmp_path):
    state = _tiny_vit(16, 10).state_dict()
    path = _save(state, tmp_path / "w.safetensors")
    output = tmp_path / "run"
    main([*TINY, "--epochs", "2", "--stop-after-epochs", "1", "--pretrained-path", str(path), "--output", str(output)])
    path.unlink()  # the resume's checkpoint holds the weights: the file is not needed any more
    main(["--resume", str(output / "last.pth")])
    assert [row["epoch"] for row in read_metrics(output)] == ["0", "1"]


FINETUNE_CONFIG = CONFIGS / "deit_base_patch16_384_finetune.yaml"


def test_finetune_config_holds_deits_recipe():
    args = parse_args(["--config", str(FINETUNE_CONFIG)])
    assert (args.model, args.img_size, args.pretrained_path) == ("deit_base_patch16_384", 384,
                                                                 "/path/to/deit_base_patch16_224/best.pth")
    # DeiT README: lr 5e-6 at a global batch of 512 (8 processes x batch_size here), wd 1e-8, 30 epochs, min lr 5e-6.
    assert args.batch_size * 8 == 512 and args.lr is None
    assert args.lr_base * 512 / args.lr_base_size == pytest.approx(5e-6)
    assert (args.weight_decay, args.epochs, args.min_lr) == (1e-8, 30, 5e-6)
    # DeiT main.py defaults the README command keeps.
    assert (args.warmup_epochs, args.warmup_lr, args.drop_path, args.aug_repeats, args.sched_on_updates) == \
        (5, 1e-6, 0.1, 3, False)
    assert (args.aa, args.reprob, args.mixup, args.cutmix, args.mixup_switch_prob, args.smoothing) == \
        ("rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 0.5, 0.1)


def test_finetune_config_trains_from_a_weights_file(tmp_path):
    """The config as written, shrunk to a tiny model and the digits: its recipe runs in this trainer."""
    path = _save(_tiny_vit(32, 1000).state_dict(), tmp_path / "w.safetensors")
    argv = ["--config", str(FINETUNE_CONFIG), *TINY, "--model", "deit_tiny_patch16_224", "--data", "digits",
            "--epochs", "1", "--pretrained-path", str(path), "--output", str(tmp_path / "run")]
    main(argv)
    row = read_metrics(tmp_path / "run")[-1]
    assert float(row["lr"]) > 0 and float(row["train_loss"]) > 0
