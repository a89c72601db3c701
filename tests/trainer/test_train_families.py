"""The per-family ImageNet configs train with TransMix, and transmix-visualize draws Figure 1.

Each family config is run as written except for what a CPU test must shrink: the embedded shapes
data at 64 px, batch 4, one training step, one val batch. Every batch is forced to CutMix
(``--mixup-switch-prob 1``) with boxes that cover whole tokens (``--cutmix-minmax``) because that
is the path under test: the targets come from the attention of the step's own forward (checked
against a separate naive-attention forward of the same images and weights), and that attention
moves the label.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch
import matplotlib  # noqa: F401  (the train extra: a missing extra fails here, never skips)
import yaml

from transmix_train.build import build_run
from transmix_train.checkpoint import save_checkpoint
from transmix_train.config import default_config_path, parse_args
from transmix_train.distributed import init_processes
from transmix_train.main import main as train_main, run_training
from transmix_train.visualize import compute_figure, main as visualize_main

# The packaged configs, found as transmix-train finds its default one.
CONFIGS = default_config_path().parent
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


RECIPES = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"
# Keys of a config that are names or paths to fill in, not recipe numbers (docs/recipes.md says so).
NOT_RECIPE = {"model", "data", "workers", "teacher"}


def markdown_tables(path: Path) -> list[list[dict[str, str]]]:
    """Every table of a Markdown file, as rows of {header: cell} (cells hold no "|")."""
    tables: list[list[dict[str, str]]] = []
    header = None
    for line in path.read_text().splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            tables.append([])
        elif not set("".join(cells)) <= set("-: "):  # not the |---| line under the header
            tables[-1].append(dict(zip(header, cells)))
    return tables


def documented_recipe(name: str) -> dict:
    """{key: value} docs/recipes.md gives config ``name``: the shared table, then its row of the
    per-model table; each cell read as YAML reads the config file."""
    tables = markdown_tables(RECIPES)
    shared = next(table for table in tables if list(table[0])[:2] == ["key", "value"])
    per_model = next(table for table in tables if list(table[0])[0] == "config")
    cells = {row["key"]: row["value"] for row in shared}
    row = next(row for row in per_model if row["config"] == name)
    cells.update({key: cell for key, cell in row.items() if key not in ("config", "sources")})
    return {key: yaml.safe_load(cell) for key, cell in cells.items()}


def recipe_mismatches(path: Path, name: str) -> list[str]:
    """What config file ``path`` says differently from docs/recipes.md's recipe for ``name``
    (also a key the file sets that the document gives no source for)."""
    want = documented_recipe(name)
    unsourced = sorted(set(yaml.safe_load(path.read_text())) - NOT_RECIPE - set(want))
    args = parse_args(["--config", str(path)])
    wrong = [f"{key}: {getattr(args, key)!r} in the config, {value!r} in docs/recipes.md"
             for key, value in want.items() if getattr(args, key) != value]
    return [f"{key}: not in docs/recipes.md" for key in unsourced] + wrong


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_config_holds_the_documented_recipe(name):
    assert recipe_mismatches(CONFIGS / f"{name}.yaml", name) == []
    args = parse_args(["--config", str(CONFIGS / f"{name}.yaml")])
    # lr_base is the lr at lr_base_size images per step: the global batch of 8 processes.
    assert args.lr is None and args.batch_size * 8 == args.lr_base_size
    assert (args.teacher is not None) == (args.distillation_type != "none")


def test_a_wrong_number_in_a_config_fails(tmp_path):
    """The check above can fail: one changed number, one unsourced key."""
    config = (CONFIGS / "deit_small_patch16_224.yaml").read_text()
    assert "weight_decay: 0.03\n" in config
    tampered = tmp_path / "deit_small_patch16_224.yaml"
    tampered.write_text(config.replace("weight_decay: 0.03\n", "weight_decay: 0.05\nclip_grad: 1.0\n"))
    assert recipe_mismatches(tampered, "deit_small_patch16_224") == [
        "clip_grad: not in docs/recipes.md", "weight_decay: 0.05 in the config, 0.03 in docs/recipes.md"]


def test_recipes_document_every_family_config():
    per_model = next(table for table in markdown_tables(RECIPES) if list(table[0])[0] == "config")
    assert [row["config"] for row in per_model] == list(FAMILIES)


def test_every_family_config_is_tested():
    """A config added to transmix_train/configs without a test here fails (demo.yaml is the trainer's own)."""
    shipped = {path.stem for path in CONFIGS.glob("*.yaml")} - {"demo", "deit_base_patch16_384_finetune"}
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
        # Box sides of 30-70 % (19-45 px) always hold a whole 16 px token, so the attention moves
        # the label (a smaller box can miss every token and leave lam_attn at 1 whatever it is).
        "--cutmix-minmax", "0.3", "0.7",
        "--output", str(output),
    ]
    kwargs = FAMILIES[name]
    if kwargs:
        argv += ["--model-kwargs", *(f"{key}={value}" for key, value in kwargs.items())]
    return argv


class _Recorder:
    """Wraps the run's mixer and loss to keep what the first training step saw: the mixed images,
    the weights and the random state its forward ran with, the mix state, the probe's attention at
    loss time and the targets the loss got."""

    def __init__(self, run) -> None:
        self.seen: dict = {}
        self._module = run.module
        self._mixer, self._criterion, self._probe = run.mixing.mixer, run.criterion, run.probe
        run.mixing.mixer, run.criterion = self.mix, self.loss

    def mix(self, images, labels):
        images, state = self._mixer(images, labels)
        if "mix" not in self.seen:  # the forward comes next: nothing between draws random numbers
            self.seen.update(mix=state, images=images.detach().clone(), rng=torch.get_rng_state(),
                             weights={k: v.detach().clone() for k, v in self._module.state_dict().items()})
        return images, state

    def loss(self, images, outputs, targets):
        value = self._criterion(images, outputs, targets)
        if "targets" not in self.seen:
            self.seen.update(targets=targets.detach().clone(), attention=self._probe.attention().clone(),
                             loss=float(value.detach()))
        return value


def _attention_read(model: torch.nn.Module):
    """The attention module the probe reads at ``--attn-source last`` and how its map comes from
    the (B, heads, queries, keys) softmax probabilities: the class token's row over the patch
    keys, or (no class token) the attention each token receives, the mean over queries and heads."""
    from timm.models.cait import Cait
    from timm.models.pvt_v2 import PyramidVisionTransformerV2
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.xcit import Xcit

    if isinstance(model, VisionTransformer):  # DeiT, distilled too (two prefix tokens)
        prefix = model.num_prefix_tokens
        return model.blocks[-1].attn, lambda probs: probs[:, :, 0, prefix:].mean(1)
    if isinstance(model, (Cait, Xcit)):  # class attention: one query, the class token, then patches
        blocks = model.blocks_token_only if isinstance(model, Cait) else model.cls_attn_blocks
        return blocks[-1].attn, lambda probs: probs[:, :, 0, 1:].mean(1)
    if isinstance(model, PyramidVisionTransformerV2):
        return model.stages[-1].blocks[-1].attn, lambda probs: probs.mean((1, 2))
    if isinstance(model, SwinTransformer):  # at 64 px the last stage is one unshifted window
        return model.layers[-1].blocks[-1].attn, lambda probs: probs.mean((1, 2))
    raise AssertionError(f"no attention read for {type(model).__name__}")


def naive_step_attention(run, seen: dict) -> torch.Tensor:
    """(B, patches) attention of the recorded step's forward, recomputed apart from the probe
    once the run is over (its probe removed): the run's model back at the step's weights, its
    probed attention on timm's naive path (``fused_attn`` off, so the softmax probabilities exist;
    read as they enter ``attn_drop``), run on the step's mixed images from the step's random state
    (drop path draws the same masks)."""
    model = run.module
    model.load_state_dict(seen["weights"])
    attention, read = _attention_read(model.train())
    attention.fused_attn = False
    probs = []
    handle = attention.attn_drop.register_forward_hook(lambda module, args, output: probs.append(args[0]))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.set_rng_state(seen["rng"])
        model(seen["images"])
    handle.remove()
    assert len(probs) == 1
    return read(probs[0])


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
    # The loss got the targets of this step's own forward: the same mixed images and weights run
    # again through timm's naive attention give the same targets (the probe recomputes the
    # attention from q and k; the fused forward never materialises it).
    torch.testing.assert_close(targets, mix.targets(naive_step_attention(run, recorder.seen)), rtol=1e-4, atol=1e-5)
    # and the attention moved the label: other attention (uniform) gives other targets.
    assert (mix.targets(torch.ones_like(attention)) - targets).abs().max() > 1e-4
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
    from transmix_train.shapes import make_shapes
    from transmix_train.visualize import load_model

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
