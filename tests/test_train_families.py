"""The per-family ImageNet configs train with TransMix, and transmix-visualize draws Figure 1.

Each family config is run as written except for what a CPU test must shrink: the embedded shapes
data at 64 px, batch 4, one training step, one val batch. Every batch is forced to CutMix
(``--mixup-switch-prob 1``) because that is the path under test: the probe reads the step's own
attention and TransMix's label differs from the area label.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("yaml")
pytest.importorskip("matplotlib")

from transmix_train.build import build_run  # noqa: E402
from transmix_train.checkpoint import save_checkpoint  # noqa: E402
from transmix_train.config import parse_args  # noqa: E402
from transmix_train.distributed import init_processes  # noqa: E402
from transmix_train.main import main as train_main, run_training  # noqa: E402
from transmix_train.visualize import compute_figure, main as visualize_main  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "python" / "configs"
IMAGE_SIZE = 64
# create_model keywords for 64 px inputs: models with a fixed position embedding or window layout
# are told the size; PVTv2 takes any size (convolutional patch embedding, no img_size argument).
FAMILIES = {
    "deit_tiny_patch16_224": {"img_size": IMAGE_SIZE},
    "deit_small_patch16_224": {"img_size": IMAGE_SIZE},
    "deit_base_patch16_224": {"img_size": IMAGE_SIZE},
    "deit_small_distilled_patch16_224": {"img_size": IMAGE_SIZE},
    "cait_xxs24_224": {"img_size": IMAGE_SIZE},
    "xcit_small_12_p16_224": {"img_size": IMAGE_SIZE},
    "pvt_v2_b2": {},
    "swin_tiny_patch4_window7_224": {"img_size": IMAGE_SIZE},
}


# The paper's recipe per model (TRANSMIX.md; drop path from each family's official code or paper):
# weight decay, warmup epochs, epochs, drop path, CutMix switch probability.
RECIPE = {
    "deit_tiny_patch16_224": (0.03, 20, 300, 0.1, 0.5),
    "deit_small_patch16_224": (0.03, 20, 300, 0.1, 0.5),
    "deit_base_patch16_224": (0.05, 5, 300, 0.1, 0.8),
    "deit_small_distilled_patch16_224": (0.03, 20, 300, 0.1, 0.5),
    "cait_xxs24_224": (0.03, 20, 400, 0.05, 0.5),
    "xcit_small_12_p16_224": (0.03, 20, 400, 0.05, 0.5),
    "pvt_v2_b2": (0.03, 20, 300, 0.1, 0.5),
    "swin_tiny_patch4_window7_224": (0.03, 20, 300, 0.2, 0.5),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_config_holds_the_paper_recipe(name):
    args = parse_args(["--config", str(CONFIGS / f"{name}.yaml")])
    per_model = (args.weight_decay, args.warmup_epochs, args.epochs, args.drop_path, args.mixup_switch_prob)
    assert per_model == RECIPE[name]
    # lr 1e-3 at the paper's global batch of 1024 (8 processes x batch_size), whatever base it is written in.
    assert args.batch_size * 8 == 1024
    assert args.lr is None and args.lr_base * 1024 / args.lr_base_size == pytest.approx(1e-3)
    shared = (args.opt, args.sched, args.warmup_lr, args.min_lr, args.smoothing, args.aa, args.reprob,
              args.mixup, args.cutmix, args.mix, args.transmix_ratio, args.mixup_mode)
    assert shared == ("adamw", "cosine", 1e-6, 1e-5, 0.1, "rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, "transmix", 0.5,
                      "batch")
    distilled = "distilled" in name
    assert (args.distillation_type == "hard") == distilled and (args.teacher is not None) == distilled


def test_every_family_config_is_tested():
    """A config added to python/configs without a test here fails (demo.yaml is the trainer's own)."""
    shipped = {path.stem for path in CONFIGS.glob("*.yaml")} - {"demo"}
    assert shipped == set(FAMILIES)


def _teacher_checkpoint(folder: Path) -> Path:
    """A small DeiT teacher in transmix-train's checkpoint layout (hard distillation needs one)."""
    from transmix_train.model import build_model

    args = {"model": "deit_tiny_patch16_224", "drop": 0.0, "drop_path": 0.0,
            "model_kwargs": {"img_size": IMAGE_SIZE, "depth": 1, "embed_dim": 48, "num_heads": 2}}
    teacher = build_model(argparse.Namespace(**args), 10)
    return save_checkpoint({"state_dict": teacher.state_dict(), "arch": args["model"], "args": args, "epoch": 0},
                           folder / "teacher.pth")


def _family_argv(name: str, output: Path) -> list[str]:
    argv = [
        "--config", str(CONFIGS / f"{name}.yaml"),
        "--data", "shapes", "--img-size", str(IMAGE_SIZE), "--train-size", "8", "--val-size", "4",
        "--batch-size", "4", "--workers", "0", "--device", "cpu", "--epochs", "1",
        "--limit-train-batches", "1", "--limit-val-batches", "1", "--log-interval", "1",
        "--mixup-switch-prob", "1.0",  # every batch CutMix: the attention-reweighted path
        "--output", str(output),
    ]
    kwargs = FAMILIES[name]
    if kwargs:
        argv += ["--model-kwargs", *(f"{key}={value}" for key, value in kwargs.items())]
    return argv


class _Recorder:
    """Wraps the run's mixer and loss to keep what one training step saw: the mix state, the
    probe's attention at loss time (the training forward's) and the targets the loss got."""

    def __init__(self, run) -> None:
        self.seen: dict = {}
        self._mixer, self._criterion, self._probe = run.mixing.mixer, run.criterion, run.probe
        run.mixing.mixer, run.criterion = self.mix, self.loss

    def mix(self, images, labels):
        images, state = self._mixer(images, labels)
        self.seen.setdefault("mix", state)
        return images, state

    def loss(self, images, outputs, targets):
        value = self._criterion(images, outputs, targets)
        if "targets" not in self.seen:
            self.seen.update(targets=targets.detach().clone(), attention=self._probe.attention().clone(),
                             loss=float(value.detach()))
        return value


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_config_trains_with_transmix(name, tmp_path):
    argv = _family_argv(name, tmp_path / "run")
    args = parse_args(argv)
    # The file's recipe survives the test's overrides: the model, TransMix on, the paper's ratio.
    assert (args.model, args.mix, args.transmix_ratio, args.smoothing) == (name, "transmix", 0.5, 0.1)
    if args.distillation_type != "none":
        args.teacher = str(_teacher_checkpoint(tmp_path))
    run = build_run(args, init_processes("cpu", None), lambda message: None)
    assert run.probe is not None, "TransMix must attach the class-attention probe"
    if args.distillation_type != "none":
        assert run.criterion.teacher is not None and run.criterion.kind == "hard"
    recorder = _Recorder(run)
    run_training(run, lambda message: None)
    run.probe.remove()

    mix, attention, targets = recorder.seen["mix"], recorder.seen["attention"], recorder.seen["targets"]
    assert mix.kind == "cutmix"
    assert math.isfinite(recorder.seen["loss"])
    assert torch.isfinite(attention).all() and torch.allclose(attention.sum(1), torch.ones(len(attention)))
    # The loss got exactly the targets of this attention, and the attention moved the label.
    torch.testing.assert_close(targets, mix.targets(attention))
    lam, lam_area = mix.lambdas(attention), mix.lam_area
    assert ((lam > 0) & (lam < 1)).all(), f"degenerate TransMix lam {lam.tolist()}"
    assert (lam - lam_area).abs().max() > 1e-4, f"lam {lam.tolist()} equals lam_area {lam_area.tolist()}"

    output = tmp_path / "run"
    for written in ("last.pth", "metrics.csv", "config.yaml"):
        assert (output / written).is_file(), f"{written} was not written"
    # mmap: the test reads two keys, not the weights (a DeiT-B checkpoint with AdamW state is ~1 GB).
    checkpoint = torch.load(output / "last.pth", map_location="cpu", weights_only=True, mmap=True)
    assert checkpoint["arch"] == name and checkpoint["args"]["model"] == name


# ------------------------------------------------------------------------------- transmix-visualize
@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint made by a real (tiny, 1-epoch) transmix-train run on the embedded shapes."""
    output = tmp_path_factory.mktemp("visualize") / "run"
    train_main([
        "--data", "shapes", "--img-size", "32", "--train-size", "16", "--val-size", "8", "--batch-size", "8",
        "--epochs", "1", "--warmup-epochs", "0", "--workers", "0", "--device", "cpu", "--output", str(output),
    ])
    return output / "last.pth"


def test_visualize_writes_figure_png(trained_checkpoint, tmp_path, capsys):
    png = tmp_path / "fig1.png"
    assert visualize_main(["--checkpoint", str(trained_checkpoint), "--index-a", "2", "--lam", "0.5",
                           "--output", str(png), "--dpi", "40"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "TransMix lam" in capsys.readouterr().out


def test_visualize_label_follows_attention_outside_box(trained_checkpoint):
    """The figure's numbers, re-derived from its own attention map and box by the formula."""
    from transmix_train.visualize import load_model
    from transmix_kernels.data import make_shapes

    model, _, _ = load_model(str(trained_checkpoint))
    images, _ = make_shapes(2, 32, seed=5)
    figure = compute_figure(model, images, lam=0.55, seed=3, ratio=0.5)
    gh, gw = figure.attention.shape
    y0, y1, x0, x1 = figure.box
    rows = (torch.arange(gh) * 32 // gh).view(-1, 1)  # nearest resize: each token's top-left pixel
    cols = (torch.arange(gw) * 32 // gw).view(1, -1)
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    expected_attn = float((figure.attention * ~inside).sum() / figure.attention.sum())
    assert figure.lam_attn == pytest.approx(expected_attn, abs=1e-6)
    assert figure.lam_area == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 32**2, abs=1e-6)
    assert figure.lam == pytest.approx(0.5 * figure.lam_area + 0.5 * expected_attn, abs=1e-6)
    assert torch.equal(figure.mixed[:, y0:y1, x0:x1], images[1, :, y0:y1, x0:x1])


@pytest.mark.parametrize("argv, flag", [
    (["--checkpoint", "{missing}"], "--checkpoint"),
    (["--checkpoint", "{ckpt}", "--index-a", "100000"], "--index-a"),
    (["--checkpoint", "{ckpt}", "--index-b", "-1"], "--index-b"),
    (["--checkpoint", "{ckpt}", "--lam", "1.5"], "--lam"),
    (["--checkpoint", "{ckpt}", "--image-a", "{missing}"], "--image-a"),
], ids=["missing-checkpoint", "index-out-of-range", "negative-index", "lam", "missing-image"])
def test_visualize_bad_input_names_the_argument(argv, flag, trained_checkpoint, tmp_path, capsys, monkeypatch):
    import transmix_train.visualize as visualize

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the bad argument was refused")

    monkeypatch.setattr(visualize, "rebuild_model", no_model)
    values = {"missing": str(tmp_path / "nope.pth"), "ckpt": str(trained_checkpoint)}
    argv = [item.format(**values) for item in argv] + ["--output", str(tmp_path / "out.png")]
    with pytest.raises(SystemExit) as exit_info:
        visualize_main(argv)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_visualize_attention_source_the_probe_cannot_read(trained_checkpoint, tmp_path, capsys):
    """Checked on the rebuilt model (the block count is the checkpoint's), before any image is drawn."""
    png = tmp_path / "out.png"
    with pytest.raises(SystemExit) as exit_info:
        visualize_main(["--checkpoint", str(trained_checkpoint), "--attn-source", "99", "--output", str(png)])
    assert exit_info.value.code == 2
    assert "--attn-source 99" in capsys.readouterr().err
    assert not png.exists()


def test_visualize_image_files(trained_checkpoint, tmp_path, capsys):
    """Files of another size and aspect than the model's input go through the run's eval transform."""
    from PIL import Image

    for name, colour in (("a.png", (200, 40, 40)), ("b.png", (40, 40, 200))):
        Image.new("RGB", (48, 40), colour).save(tmp_path / name)
    png = tmp_path / "fig1.png"
    assert visualize_main(["--checkpoint", str(trained_checkpoint), "--image-a", str(tmp_path / "a.png"),
                           "--image-b", str(tmp_path / "b.png"), "--label-a", "3", "--output", str(png),
                           "--dpi", "40"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "broken.png").write_text("not an image")
    with pytest.raises(SystemExit):
        visualize_main(["--checkpoint", str(trained_checkpoint), "--image-a", str(tmp_path / "broken.png"),
                        "--output", str(tmp_path / "other.png")])
    assert "--image-a" in capsys.readouterr().err
