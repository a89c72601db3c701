"""transmix-fidelity: how close CutMix's, the attention's and TransMix's labels come to the truth.

    transmix-fidelity output/run/best.pth                          # 1,000 pairs of the run's val images
    transmix-fidelity run/last.pth --pairs 4000 --seed 1 --data shapes --output fidelity/

The embedded data know where the object is (shapes-10 draws it; a digit's object is its ink), so
the label a mixed image deserves can be measured instead of guessed. For a pair (A, B) with B's box
pasted into A, the TRUE label share of A is

    true = visible object pixels of A / (visible object pixels of A + visible object pixels of B)

(A's object outside the box, B's inside it). Each label rule gives its own share of A, from the
library (``tk.TransMix``'s ``MixState.lambdas`` and the ``tk.ClassAttentionProbe`` of one forward
of the mixed images), and is scored against the true share:

- ``area``: CutMix's label, the share of A's pixels left visible (``lam_area``);
- ``attention``: the class attention's share of A's tokens alone (``lam_attn``, ratio 0);
- ``transmix``: TransMix's label, ``0.5 * lam_area + 0.5 * lam_attn`` (the paper's ratio);
- ``mixpro_pal``: MixPro's progressive attention label on the same pair, ``alpha * lam_attn +
  (1 - alpha) * lam_area`` with ``alpha`` the cosine of the area label and the prediction
  (``tk.mixpro.progressive_factor``): it tests MixPro's claim that early attention is unreliable.

Scores: the mean absolute error against the true share, and the flip rate: how often the label
gives the larger weight to the class whose object is the smaller visible one (a label of exactly
0.5, or a true share of exactly 0.5, is no flip). Pairs in which no object pixel of A or B is
visible have no true share: they are counted apart (``no_visible_object``) and reported, never
silently dropped from the count.

Protocol: the val images of the checkpoint's data (``--data`` chooses digits or shapes instead),
through the run's eval transform and normalisation and nothing else (no augmentation). ``--pairs
N`` mixed images from ``ceil(N / 2)`` couples of val images of different classes, drawn with
``--seed``; each couple is mixed both ways (A with B's box, B with A's box), as ``tk.TransMix``
pairs row i with row B-1-i; boxes from a ``tk.TransMix`` in CutMix-only, per-sample mode
(``mode="elem"``: lam ~ Beta(1, 1) = U(0, 1), timm's ``rand_bbox`` and ``correct_lam``), seeded
from ``--seed``; groups of :data:`GROUP_ROWS` rows, so the boxes never depend on a batch size.
The model runs once per group in eval mode.

More rules are one more :class:`LabelRule` in
:data:`LABEL_RULES` (:func:`register_label_rule`): a function of the ``MixState``, the probe and
the logits of the mixed images.

During training, ``transmix-train --fidelity-every N`` measures the same numbers on the run's val
set every N epochs (:data:`TRAINING_PAIRS` pairs, the run's ``--seed``: the same pairs every time)
and appends them to ``fidelity.csv`` in the run's folder, with ``fidelity.png`` (label error
against epoch) redrawn each time. It draws nothing from the run's random streams.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

import transmix_kernels as tk
from transmix_kernels.mixpro import progressive_factor

__all__ = [
    "CheckpointData",
    "DIGIT_INK_THRESHOLD",
    "FidelityResult",
    "GROUP_ROWS",
    "LABEL_RULES",
    "LabelRule",
    "MASKED_DATA",
    "MaskedImages",
    "TRAINING_PAIRS",
    "TRANSMIX_RATIO",
    "ValImages",
    "build_parser",
    "default_device",
    "draw_couples",
    "fidelity_every",
    "main",
    "measure_fidelity",
    "object_masks",
    "open_checkpoint",
    "plot_fidelity",
    "record_fidelity",
    "register_label_rule",
    "summarise",
    "true_share",
    "write_report",
]

#: A digit pixel is ink (the object) above this uint8 value (see :func:`object_masks`).
DIGIT_INK_THRESHOLD = 127
#: The data sets whose objects are known.
MASKED_DATA = ("digits", "shapes")
#: Rows mixed and run per forward: fixed, so the boxes drawn for a seed never depend on a batch size.
GROUP_ROWS = 128
#: TransMix's weight of the area share in its label (the paper's 0.5).
TRANSMIX_RATIO = 0.5
#: Pairs measured by ``transmix-train --fidelity-every`` (the same pairs at every measurement).
TRAINING_PAIRS = 512


# ------------------------------------------------------------------------------------------ label rules
@dataclass(frozen=True)
class LabelRule:
    """One way of labelling a CutMix pair: ``lambdas(mix, probe, logits)`` -> (B,) float32 share of A.

    ``mix`` is the ``tk.MixState`` of the mixed batch, ``probe`` the ``tk.ClassAttentionProbe`` that
    saw the forward of the mixed images, ``logits`` (B, K) that forward's output.
    """

    name: str
    title: str
    lambdas: Callable[[Any, Any, torch.Tensor], torch.Tensor]


def _area_share(mix, probe, logits) -> torch.Tensor:
    return mix.lambdas(None)  # lam_area: the visible share of A's pixels (timm's correct_lam)


def _attention_share(mix, probe, logits) -> torch.Tensor:
    return dataclasses.replace(mix, ratio=0.0).lambdas(probe)  # lam_attn alone


def _transmix_share(mix, probe, logits) -> torch.Tensor:
    return dataclasses.replace(mix, ratio=TRANSMIX_RATIO).lambdas(probe)


def _mixpro_share(mix, probe, logits) -> torch.Tensor:
    # MixPro's PAL on the same CutMix pair: alpha * lam_attn + (1 - alpha) * lam_area, alpha from the prediction.
    alpha = progressive_factor(mix.area_targets(), logits)
    return alpha * _attention_share(mix, probe, logits) + (1.0 - alpha) * _area_share(mix, probe, logits)


#: The label rules scored, by name (insertion order is the table's order).
LABEL_RULES: dict[str, LabelRule] = {}


def register_label_rule(rule: LabelRule) -> LabelRule:
    """Add ``rule`` to :data:`LABEL_RULES` (a name already there is an error)."""
    if rule.name in LABEL_RULES:
        raise ValueError(f"a label rule named {rule.name!r} is already registered")
    LABEL_RULES[rule.name] = rule
    return rule


for _rule in (
    LabelRule("area", "area (CutMix)", _area_share),
    LabelRule("attention", "attention alone (lam_attn)", _attention_share),
    LabelRule("transmix", f"TransMix ({TRANSMIX_RATIO} area + {1 - TRANSMIX_RATIO} attention)", _transmix_share),
    LabelRule("mixpro_pal", "MixPro's PAL (alpha area-label/prediction cosine)", _mixpro_share),
):
    register_label_rule(_rule)


# ---------------------------------------------------------------------------------------- the truth
def true_share(masks: torch.Tensor, boxes: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """A's true label share in each CutMix-mixed image.

    Args:
        masks: (B, H, W) bool, the object pixels of each unmixed image.
        boxes: (B, 4) int ``[y0, y1, x0, x1]`` half-open, the box of row b holding ``partner[b]``'s pixels.
        partner: (B,) int64, the image pasted into row b.

    Returns:
        (B,) float64: visible object pixels of A / visible object pixels of A and B; NaN where no
        object pixel is visible at all.

    Example::

        masks = torch.zeros(2, 8, 8, dtype=torch.bool); masks[:, 2:4, 2:4] = True
        true_share(masks, torch.tensor([[0, 8, 0, 8], [0, 0, 0, 0]]), torch.tensor([1, 0]))  # [0., 1.]
    """
    if masks.dim() != 3 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be (B, H, W) bool, got {masks.dtype} {tuple(masks.shape)}")
    batch, height, width = masks.shape
    if boxes.shape != (batch, 4) or partner.shape != (batch,):
        raise ValueError(f"boxes must be ({batch}, 4) and partner ({batch},), got {tuple(boxes.shape)} and "
                         f"{tuple(partner.shape)}")
    y0, y1, x0, x1 = (corner.view(-1, 1, 1) for corner in boxes.to(masks.device, torch.int64).unbind(1))
    rows = torch.arange(height, device=masks.device).view(1, -1, 1)
    cols = torch.arange(width, device=masks.device).view(1, 1, -1)
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    own = (masks & ~inside).sum((1, 2)).double()
    other = (masks[partner.to(masks.device)] & inside).sum((1, 2)).double()
    total = own + other
    return torch.where(total > 0, own / total.clamp(min=1), torch.full_like(total, float("nan")))


@dataclass
class FidelityResult:
    """The scores of every label rule against the true share.

    Attributes:
        pairs: mixed images measured; scored: those with a visible object (the rest:
            ``no_visible_object``); mean_true_share: over the scored pairs.
        rules: per rule name, ``mae`` (mean |label - true|), ``flip_rate`` (share of scored pairs
            whose label favours the class with less visible object) and ``mean_label``.
        true: (pairs,) float64 true shares (NaN: no visible object); labels: per rule, (pairs,) float64.
    """

    pairs: int
    scored: int
    no_visible_object: int
    mean_true_share: float
    rules: dict[str, dict[str, float]]
    true: torch.Tensor = field(repr=False)
    labels: dict[str, torch.Tensor] = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        """The JSON-ready numbers (no per-pair tensors; NaN, i.e. nothing scored, as null)."""
        plain = lambda value: None if isinstance(value, float) and math.isnan(value) else value  # noqa: E731
        return {"pairs": self.pairs, "scored": self.scored, "no_visible_object": self.no_visible_object,
                "mean_true_share": plain(self.mean_true_share),
                "rules": {name: {k: plain(v) for k, v in scores.items()} for name, scores in self.rules.items()}}


def summarise(true: torch.Tensor, labels: dict[str, torch.Tensor]) -> FidelityResult:
    """Score each rule's (P,) label shares against the (P,) true shares (NaN: no visible object)."""
    true = true.detach().double().cpu()
    visible = ~torch.isnan(true)
    scored = int(visible.sum())
    truth = true[visible]
    rules = {}
    for name, label in labels.items():
        label = label.detach().double().cpu()
        if label.shape != true.shape:
            raise ValueError(f"label rule {name!r} gave {tuple(label.shape)} shares for {tuple(true.shape)} pairs")
        share = label[visible]
        flipped = ((truth > 0.5) & (share < 0.5)) | ((truth < 0.5) & (share > 0.5))
        rules[name] = {
            "mae": float((share - truth).abs().mean()) if scored else math.nan,
            "flip_rate": float(flipped.double().mean()) if scored else math.nan,
            "mean_label": float(share.mean()) if scored else math.nan,
        }
    return FidelityResult(
        pairs=int(true.numel()), scored=scored, no_visible_object=int(true.numel()) - scored,
        mean_true_share=float(truth.mean()) if scored else math.nan, rules=rules, true=true,
        labels={name: label.detach().double().cpu() for name, label in labels.items()},
    )


# ---------------------------------------------------------------------------------------- the images
class ValImages:
    """Val images as the run evaluates them: the set's eval transform (timm's, prefetcher form: uint8
    (C, H, W)), ``fast_collate``, then timm ``PrefetchLoader``'s normalisation on ``device``.

    ``mean255`` / ``std255``: (1, C, 1, 1) float32 tensors of mean * 255 and std * 255 (the
    ``PrefetchLoader``'s own), so a batch is bit for bit the trainer's val batch.
    """

    def __init__(self, dataset: Dataset, mean255: torch.Tensor, std255: torch.Tensor, device: torch.device) -> None:
        self.dataset, self.device = dataset, torch.device(device)
        self.mean255, self.std255 = mean255.to(self.device), std255.to(self.device)

    @classmethod
    def from_settings(cls, dataset: Dataset, settings, device: torch.device) -> "ValImages":
        """From a set and its ``data.DataSettings``; sets the set's eval transform as the trainer's loader does."""
        from timm.data import create_transform

        dataset.transform = create_transform(
            settings.input_size, is_training=False, crop_pct=settings.crop_pct, interpolation=settings.interpolation,
            mean=settings.mean, std=settings.std, use_prefetcher=True,
        )
        shape = (1, settings.input_size[0], 1, 1)
        mean = torch.tensor([x * 255 for x in settings.mean], dtype=torch.float32).view(shape)
        std = torch.tensor([x * 255 for x in settings.std], dtype=torch.float32).view(shape)
        return cls(dataset, mean, std, device)

    @classmethod
    def from_loader(cls, loader) -> "ValImages":
        """From a run's val loader (a timm ``PrefetchLoader``): its set, transform and normalisation."""
        return cls(loader.loader.dataset, loader.mean, loader.std, loader.device)

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, indices: Sequence[int], batch_size: int, workers: int = 0) -> Iterator[tuple]:
        """(images (b, C, H, W) float32 normalised, labels (b,) int64, the indices) in ``indices``' order."""
        from timm.data.loader import fast_collate

        indices = [int(i) for i in indices]
        loader = DataLoader(Subset(self.dataset, indices), batch_size=batch_size, shuffle=False,
                            num_workers=workers, collate_fn=fast_collate)
        start = 0
        for images, labels in loader:
            images = images.to(self.device).to(torch.float32).sub_(self.mean255).div_(self.std255)
            yield images, labels.to(self.device), indices[start:start + len(labels)]
            start += len(labels)

    def load(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels of ``indices`` as one batch."""
        images, labels, _ = next(self.batches(indices, max(len(indices), 1)))
        return images, labels


def object_masks(data: str, val_set: Dataset) -> np.ndarray:
    """(N, H, W) bool object masks of a built-in val set's unaugmented images (before any transform).

    - ``shapes``: the pixels :func:`.shapes.make_shapes` draws in the shape's colour, regenerated
      with the split's seed and size (``return_masks=True``; checked against the set's labels).
    - ``digits``: the ink, pixels above :data:`DIGIT_INK_THRESHOLD` (127 of 255). The 8x8 scans count
      the inked pixels of each 4x4 block of a 32x32 binary bitmap (0..16); upscaled bilinearly they
      become each pixel's local ink share, and above one half (128/255) a pixel is more likely ink
      than paper. About 30 % of the pixels pass; no image is left without ink.
    """
    from .data import InMemoryImages

    if data not in MASKED_DATA or not isinstance(val_set, InMemoryImages):
        raise ValueError(f"--data {data}: only {' and '.join(MASKED_DATA)} know where their objects are (no object "
                         "masks for other data)")
    if data == "digits":
        return val_set.pixels[..., 0] > DIGIT_INK_THRESHOLD
    from .data import _SHAPES_SEEDS
    from .shapes import make_shapes

    _, labels, masks = make_shapes(len(val_set), val_set.pixels.shape[1], seed=_SHAPES_SEEDS["val"], return_masks=True)
    if not np.array_equal(labels.numpy(), val_set.labels):
        raise ValueError("--data shapes: the regenerated val masks do not match the val set (its seed or size changed)")
    return masks.numpy()


class MaskedImages(ValImages):
    """:class:`ValImages` with each image's object mask brought through the same eval transform."""

    def __init__(self, images: ValImages, masks: np.ndarray) -> None:
        super().__init__(images.dataset, images.mean255, images.std255, images.device)
        if len(masks) != len(images):
            raise ValueError(f"{len(masks)} masks for {len(images)} images")
        self.masks = masks
        self.labels = np.asarray(self.dataset.labels, dtype=np.int64)

    def masks_for(self, indices: Sequence[int]) -> torch.Tensor:
        """(b, H, W) bool masks at the model's input size: each mask as a black/white RGB image
        through the set's own eval transform (resize, centre crop), then above half intensity."""
        from PIL import Image

        transform = self.dataset.transform
        out = []
        for index in indices:
            picture = Image.fromarray(np.repeat(self.masks[index][..., None], 3, axis=-1).astype(np.uint8) * 255)
            # the eval transform (prefetcher form) gives uint8 (C, H, W); without one, PIL's (H, W, C)
            pixels = np.asarray(transform(picture))[0] if transform is not None else np.asarray(picture)[..., 0]
            out.append(torch.from_numpy(np.ascontiguousarray(pixels)) > 127)
        return torch.stack(out).to(self.device)


def draw_couples(labels: np.ndarray, count: int, seed: int | np.random.Generator) -> np.ndarray:
    """(count, 2) val indices (A, B), A uniform over the set, B uniform over the images of another class."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        raise ValueError("the val set has a single class: no pair of images of different classes to mix")
    others = {int(c): np.flatnonzero(labels != c) for c in np.unique(labels)}
    first = rng.integers(0, len(labels), size=count)
    second = np.array([rng.choice(others[int(labels[a])]) for a in first], dtype=np.int64)
    return np.stack([first, second], axis=1)


# ------------------------------------------------------------------------------------- measurement
def measure_fidelity(model: torch.nn.Module, probe, images: MaskedImages, *, pairs: int, seed: int,
                     num_classes: int, rules: Optional[dict[str, LabelRule]] = None,
                     autocast: Callable[[], Any] = nullcontext) -> FidelityResult:
    """Mix ``pairs`` seeded CutMix pairs of ``images``, run ``model`` once per group (eval mode, no
    gradient) and score every rule against the true share (see the module's docstring).

    ``probe``: a ``tk.ClassAttentionProbe`` attached to ``model``. Draws only from its own
    generators (seeded from ``seed``): the caller's random streams are left as they were.
    """
    if pairs < 1:
        raise ValueError(f"--pairs must be >= 1, got {pairs}")
    rules = LABEL_RULES if rules is None else rules
    pair_rng, box_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    couples = draw_couples(images.labels, math.ceil(pairs / 2), pair_rng)
    # CutMix only, a box per image (lam ~ Beta(1, 1)), unsmoothed; the token grid is the model's own
    mixer = tk.TransMix(num_classes, mixup_alpha=0.0, cutmix_alpha=1.0, mode="elem", label_smoothing=0.0,
                        ratio=TRANSMIX_RATIO, model=model, generator=box_rng)
    shares, labels = [], {name: [] for name in rules}
    model.eval()
    for start in range(0, len(couples), GROUP_ROWS // 2):
        group = couples[start:start + GROUP_ROWS // 2]
        rows = np.concatenate([group[:, 0], group[::-1, 1]])  # row i is mixed with row B-1-i
        batch, target = images.load(rows)
        masks = images.masks_for(rows)
        mixed, mix = mixer(batch, target)
        with torch.no_grad(), autocast():
            logits = model(mixed)
            group_labels = {name: rule.lambdas(mix, probe, logits).float() for name, rule in rules.items()}
        # each couple forward then backward (A with B's box, B with A's box): a cut keeps whole couples first
        order = torch.stack([torch.arange(len(group)), len(rows) - 1 - torch.arange(len(group))], 1).flatten()
        shares.append(true_share(masks, mix.boxes, mix.partner).cpu()[order])
        for name, value in group_labels.items():
            labels[name].append(value.cpu()[order])
    return summarise(torch.cat(shares)[:pairs], {name: torch.cat(value)[:pairs] for name, value in labels.items()})


# ----------------------------------------------------------------------------------------- reports
def _number(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _markdown(result: FidelityResult, meta: dict[str, Any]) -> str:
    lines = [
        f"# Label fidelity: {meta.get('title', '')}".rstrip(),
        "",
        f"{result.pairs} CutMix pairs of {meta.get('data')} val images (seed {meta.get('seed')}); "
        f"{result.scored} scored, {result.no_visible_object} with no visible object (no true share, counted apart). "
        f"Mean true share of A: {_number(result.mean_true_share, 3)}.",
        "",
        "| label rule | MAE vs true share | flip rate | mean label |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, scores in result.rules.items():
        title = LABEL_RULES[name].title if name in LABEL_RULES else name
        lines.append(f"| {title} | {_number(scores['mae'])} | {_number(scores['flip_rate'] * 100, 1)} % | "
                     f"{_number(scores['mean_label'], 3)} |")
    lines += ["", "True share: visible object pixels of A / visible object pixels of A and B. Flip: the label's "
              "larger class is the one with less visible object."]
    return "\n".join(lines) + "\n"


def write_report(result: FidelityResult, output: str | Path, meta: dict[str, Any]) -> tuple[Path, Path]:
    """``fidelity.json`` (``meta`` and the scores) and ``fidelity.md`` (the table) in the folder ``output``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output / "fidelity.json", output / "fidelity.md"
    json_path.write_text(json.dumps({**meta, **result.as_dict()}, indent=2) + "\n")
    md_path.write_text(_markdown(result, meta))
    return json_path, md_path


# ----------------------------------------------------------------------------------- during training
def fidelity_every(value: str | int) -> int:
    """``--fidelity-every N``: an int >= 0 (epochs; 0: off)."""
    try:
        every = int(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a whole number of epochs >= 0, got {value!r}") from None
    if every < 0 or isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected a whole number of epochs >= 0 (0: off), got {value!r}")
    return every


def _append_row(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` to the csv at ``path``, first dropping rows of its epoch or later (a resumed run)."""
    rows = []
    if path.is_file():
        with open(path, newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if int(r["epoch"]) < row["epoch"]]
    rows.append(row)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        writer.writeheader()
        writer.writerows([{key: r.get(key, "") for key in row} for r in rows])


def plot_fidelity(csv_path: str | Path, png_path: str | Path) -> Path:
    """Label error (MAE against the true share) and flip rate of each rule against epoch (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    epochs = [int(r["epoch"]) for r in rows]
    names = [key[:-len("_mae")] for key in (rows[0] if rows else {}) if key.endswith("_mae")]
    fig, (error_axis, flip_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in names:
        error_axis.plot(epochs, [float(r[f"{name}_mae"]) for r in rows], marker="o", label=name)
        flip_axis.plot(epochs, [100 * float(r[f"{name}_flip_rate"]) for r in rows], marker="o", label=name)
    error_axis.set(xlabel="epoch", ylabel="MAE vs true share", title="label error")
    flip_axis.set(xlabel="epoch", ylabel="flip rate (%)", title="larger class wrong")
    error_axis.legend()
    for axis in (error_axis, flip_axis):
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)


def record_fidelity(run, epoch: int, log) -> Optional[FidelityResult]:
    """``--fidelity-every N``: every N epochs, label fidelity on the run's val set -> ``fidelity.csv``
    and ``fidelity.png`` in the run's folder (rank 0 only; the other ranks go on)."""
    every = getattr(run.args, "fidelity_every", 0) or 0
    if not every or (epoch + 1) % every or not run.info.primary:
        return None
    try:
        images = MaskedImages(ValImages.from_loader(run.val_loader),
                              object_masks(run.args.data, run.val_loader.loader.dataset))
    except ValueError as error:
        log(f"warning: --fidelity-every {every}: {error}; label fidelity not measured")
        return None
    module, training = run.module, run.module.training
    try:
        probe = run.probe if run.probe is not None else tk.ClassAttentionProbe(module, source=run.args.attn_source)
    except (TypeError, ValueError) as error:  # a model whose class attention the library cannot read
        log(f"warning: --fidelity-every {every}: {error}; label fidelity not measured")
        return None
    try:
        result = measure_fidelity(module, probe, images, pairs=TRAINING_PAIRS, seed=run.args.seed,
                                  num_classes=run.num_classes, autocast=run.step.autocast)
    finally:
        if probe is not run.probe:
            probe.remove()
        module.train(training)
    row = {"epoch": epoch, "pairs": result.pairs, "scored": result.scored,
           "no_visible_object": result.no_visible_object, "mean_true_share": result.mean_true_share}
    for name, scores in result.rules.items():
        row.update({f"{name}_mae": scores["mae"], f"{name}_flip_rate": scores["flip_rate"]})
    _append_row(run.output / "fidelity.csv", row)
    plot_fidelity(run.output / "fidelity.csv", run.output / "fidelity.png")
    log(f"epoch {epoch}: label fidelity (MAE vs true share, flip rate) "
        + ", ".join(f"{name} {s['mae']:.3f} / {100 * s['flip_rate']:.1f} %" for name, s in result.rules.items())
        + f" ({result.scored} pairs, {result.no_visible_object} without a visible object)")
    return result


# ------------------------------------------------------------------------------------------ command
@dataclass
class CheckpointData:
    """A checkpoint's model (eval mode, on ``device``), its run config and its val images."""

    model: torch.nn.Module
    config: argparse.Namespace
    title: str
    images: ValImages
    num_classes: int


def open_checkpoint(path: str, *, data: Optional[str] = None, device: str | torch.device = "cpu",
                    use_ema: bool = False, flag: str = "CHECKPOINT") -> CheckpointData:
    """The model of a ``transmix-train`` checkpoint and its run's val images as the run evaluated them.

    ``data``: another data set than the run's (a built-in name or a folder; ``--data``). Errors are
    ``ValueError`` naming ``flag`` or ``--data``.
    """
    from .data import create_datasets, data_settings
    from .visualize import read_run, rebuild_model

    try:
        checkpoint, config = read_run(path)
        model, title = rebuild_model(checkpoint, config, path, use_ema=use_ema)
    except ValueError as error:  # visualize names its flag --checkpoint
        raise ValueError(str(error).replace("--checkpoint", flag, 1)) from None
    if data is not None:
        config.data, config.dataset, config.data_dir = data, "", None
    train_set, val_set, num_classes = create_datasets(config)
    head = getattr(model, "num_classes", num_classes)
    if head != num_classes:
        raise ValueError(f"--data {config.data}: has {num_classes} classes, the checkpoint {path} predicts {head}")
    settings = data_settings(config, train_set, model)
    return CheckpointData(model=model.to(device), config=config, title=title,
                          images=ValImages.from_settings(val_set, settings, torch.device(device)),
                          num_classes=num_classes)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``transmix-fidelity``."""
    from .config import attn_source

    parser = argparse.ArgumentParser(prog="transmix-fidelity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a transmix-train checkpoint (last.pth / best.pth)")
    parser.add_argument("--pairs", type=int, default=1000, help="mixed images to measure (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairs and boxes")
    parser.add_argument("--data", choices=MASKED_DATA, default=None,
                        help="the val images to mix (default: the checkpoint's own data, which must be one of these)")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="folder for fidelity.json and fidelity.md (default: the checkpoint's folder)")
    parser.add_argument("--attn-source", type=attn_source, default=None,
                        help='attention of the labels: "last", "rollout" or a block index (default: the run\'s own)')
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--use-ema", action="store_true", help="the checkpoint's EMA weights (a --model-ema run)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``transmix-fidelity``; bad input exits with an error naming the argument."""
    from .model import probe_for

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error(f"--pairs must be >= 1, got {args.pairs}")
    if not Path(args.checkpoint).is_file():
        parser.error(f"CHECKPOINT: no checkpoint file at {args.checkpoint!r}")
    output = Path(args.output) if args.output else Path(args.checkpoint).parent
    try:
        opened = open_checkpoint(args.checkpoint, data=args.data, device=args.device or default_device(),
                                 use_ema=args.use_ema)
        masked = MaskedImages(opened.images, object_masks(opened.config.data, opened.images.dataset))
        source = opened.config.attn_source if args.attn_source is None else args.attn_source
        model, probe = probe_for(opened.model, source, name=opened.config.model)
    except ValueError as error:
        parser.error(str(error))
    with probe:
        result = measure_fidelity(model, probe, masked, pairs=args.pairs, seed=args.seed,
                                  num_classes=opened.num_classes)
    meta = {"checkpoint": str(args.checkpoint), "title": opened.title, "data": opened.config.data, "seed": args.seed,
            "attn_source": source, "group_rows": GROUP_ROWS, "transmix_ratio": TRANSMIX_RATIO,
            "digit_ink_threshold": DIGIT_INK_THRESHOLD}
    json_path, md_path = write_report(result, output, meta)
    print(_markdown(result, meta), end="")
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
