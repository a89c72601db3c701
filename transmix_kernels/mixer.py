"""``tk.TransMix``: a drop-in for timm's Mixup whose CutMix labels follow the model's attention.

    transmix = tk.TransMix(num_classes=1000, patch_size=16)
    images, mix = transmix(images, target)          # mixes in place, like timm
    logits = model(images)
    loss = criterion(logits, mix.targets(attn))     # or mix.targets(probe); mix.targets() = timm's

The hyper-parameters mean what they mean in ``timm.data.Mixup``. Random draws come from the
object's own generators (``seed``), so two ranks of a job can be given different seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._checks import (
    FLOAT_DTYPES,
    check_index_range,
    check_non_negative,
    check_positive_int,
    check_range,
    check_tensor,
    flipped_partner,
    is_dense,
    is_int,
)
from ._dispatch import IMPLS, dispatch, resolve_backend
from .boxes import box_corners
from .class_attention_lambda import class_attention_lambda
from .cutmix_paste import PASTE_INPLACE, run_paste, token_mask_torch
from .probe import infer_token_grid
from .transmix_lambda import LAMBDA_TARGETS, transmix_lambda, transmix_targets

__all__ = ["MODES", "DrawState", "MixState", "TransMix", "check_mix_call", "check_pair", "token_grid_for"]

MODES = ("batch", "pair", "elem")


def _host_to(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on ``device``; on the CPU the array's own memory, with no call."""
    tensor = torch.from_numpy(array)
    return tensor if device.type == "cpu" else tensor.to(device, non_blocking=True)


@dataclass
class MixState:
    """What one call of :class:`TransMix` did to a batch, and how to label it.

    Attributes:
        kind: "cutmix", "mixup" or "none" for the whole batch, "mixed" when per-sample modes
            drew several kinds.
        cutmix: (B,) bool, rows that got a pasted box (only these are attention-reweighted).
        boxes: (B, 4) int32 ``[y0, y1, x0, x1]`` on the images' device (empty boxes for rows
            without CutMix).
        partner: (B,) int64, the image each row was mixed with.
        lam: (B,) the label weight timm would use: float64 per batch, float32 per element.
        lam_area: (B,) float32 own-pixel share of CutMix rows (lam for the other rows).
        token_grid: (gh, gw) of the token mask made during the paste, or None.
        token_mask: (B, gh*gw) float32 or None.
    """

    kind: str
    cutmix: torch.Tensor
    boxes: torch.Tensor
    partner: torch.Tensor
    lam: torch.Tensor
    lam_area: torch.Tensor
    target: torch.Tensor
    num_classes: int
    smoothing: float
    ratio: float
    image_size: tuple[int, int]
    token_grid: tuple[int, int] | None = None
    token_mask: torch.Tensor | None = None
    impl: str = "auto"

    def mask_for(self, token_grid: tuple[int, int]) -> torch.Tensor:
        """(B, gh*gw) token mask of the pasted boxes on any grid (made lazily when not fused)."""
        token_grid = tuple(token_grid)
        if self.token_mask is not None and self.token_grid == token_grid:
            return self.token_mask
        height, width = self.image_size
        return token_mask_torch(self.boxes, self.boxes.shape[0], height, width, *token_grid)

    def area_targets(self) -> torch.Tensor:
        """timm's targets for this batch (area lam for CutMix rows, blend lam for Mixup rows)."""
        return self._soft_targets(self.lam)

    def _soft_targets(self, lam: torch.Tensor) -> torch.Tensor:
        # target, partner and lam were made or checked by TransMix: no second validation pass.
        backend = resolve_backend(self.impl, lam.device, LAMBDA_TARGETS)
        _, targets = dispatch(
            LAMBDA_TARGETS, backend, None, None, lam, self.target, self.partner, self.num_classes, 0.0, self.smoothing
        )
        return targets

    def targets(self, attention=None) -> torch.Tensor:
        """(B, num_classes) float32 soft targets.

        Args:
            attention: None for the area targets (timm's); a (B, N) or (B, heads, N)
                class-to-patch attention tensor of the mixed images; or a
                ``tk.ClassAttentionProbe`` attached to the model that saw them. Only CutMix
                rows are re-weighted; Mixup and unmixed rows keep timm's label.
        """
        if attention is None or not bool(self.cutmix.any()):
            return self.area_targets()
        if self.kind == "cutmix" and isinstance(attention, torch.Tensor):
            self._check_batch("attention", attention.shape[0] if attention.dim() else 0)
            return self.fused_targets(attention)
        return self._soft_targets(self._label_lambda(attention))

    def lambdas(self, attention=None) -> torch.Tensor:
        """(B,) float32 own-label share of each row, as :meth:`targets` uses it."""
        return self._label_lambda(attention).float()

    def _label_lambda(self, attention) -> torch.Tensor:
        if attention is None or not bool(self.cutmix.any()):
            return self.lam
        lam_transmix = self._attention_lambda(attention)
        if self.kind == "cutmix":
            return lam_transmix
        return torch.where(self.cutmix, lam_transmix.to(self.lam.dtype), self.lam)

    def fused_targets(self, attn: torch.Tensor) -> torch.Tensor:
        """Attention reduction, lambda and targets in one launch (all rows CutMix)."""
        token_mask = self._mask_matching(attn.shape[-1])
        targets, _ = transmix_targets(
            attn, token_mask, self.lam_area, self.target, self.num_classes, partner=self.partner,
            ratio=self.ratio, smoothing=self.smoothing, impl=self.impl,
        )
        return targets

    def _attention_lambda(self, attention) -> torch.Tensor:
        if isinstance(attention, torch.Tensor):
            self._check_batch("attention", attention.shape[0] if attention.dim() else 0)
            token_mask = self._mask_matching(attention.shape[-1])
            return transmix_lambda(attention, token_mask, self.lam_area, ratio=self.ratio, impl=self.impl)
        return self._probe_lambda(attention)

    def _check_batch(self, what: str, batch: int) -> None:
        if batch != self.boxes.shape[0]:
            raise ValueError(
                f"{what} has batch size {batch} but this MixState mixed {self.boxes.shape[0]} images: "
                "use the attention of the forward pass on exactly these mixed images"
            )

    def _probe_grid(self, probe) -> tuple[int, int]:
        """The probe's token grid, checked against this mix before any work."""
        if not hasattr(probe, "attention") or not hasattr(probe, "token_grid"):
            raise TypeError(
                "targets() takes None, an attention tensor (B, N) / (B, heads, N), or a tk.ClassAttentionProbe; "
                f"got {type(probe).__name__}"
            )
        grid = probe.token_grid
        if grid is None:
            raise RuntimeError(
                "the probe has seen no forward pass: run the model on the mixed images with the probe attached, "
                "then call mix.targets(probe)"
            )
        if self.token_grid is not None and tuple(grid) != tuple(self.token_grid):
            raise ValueError(
                f"the probe's last forward had a {tuple(grid)} token grid but this batch was mixed for "
                f"{tuple(self.token_grid)}: run the model on these mixed images before targets(probe)"
            )
        return tuple(grid)

    def _probe_lambda(self, probe) -> torch.Tensor:
        token_mask = self.mask_for(self._probe_grid(probe))
        query_keys = probe.class_query_keys() if hasattr(probe, "class_query_keys") else None
        if query_keys is not None:
            # The class token's q and k: the fused lambda, the attention row never stored.
            q_cls, keys, scale, num_prefix_tokens = query_keys
            self._check_batch("the probe's captured attention", q_cls.shape[0])
            return class_attention_lambda(
                q_cls, keys, token_mask, self.lam_area, scale=scale, num_prefix_tokens=num_prefix_tokens,
                ratio=self.ratio, impl=self.impl,
            )
        attention = probe.attention()
        self._check_batch("the probe's attention", attention.shape[0])
        return transmix_lambda(attention, token_mask, self.lam_area, ratio=self.ratio, impl=self.impl)

    def _mask_matching(self, num_tokens: int) -> torch.Tensor:
        if self.token_grid is not None and self.token_grid[0] * self.token_grid[1] == num_tokens:
            return self.mask_for(self.token_grid)
        raise ValueError(
            f"attention has {num_tokens} patch tokens but the token grid is {self.token_grid}; "
            "give TransMix patch_size/token_grid/model matching the model, or pass a ClassAttentionProbe"
        )


def check_pair(name: str, value) -> tuple[int, int] | None:
    """None, or a positive int / pair of positive ints as a (int, int) tuple (patch size, token grid)."""
    if value is None:
        return None
    pair = (value, value) if is_int(value) else value
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(is_int(v) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return tuple(pair)


def token_grid_for(height: int, width: int, token_grid, patch_size, model) -> tuple[int, int] | None:
    """The (gh, gw) token grid of a mixer for ``height`` x ``width`` images: a fixed ``token_grid``,
    else image size // ``patch_size``, else the grid of ``model`` (a supported timm model), else None."""
    if token_grid is not None:
        grid = token_grid
    elif patch_size is not None:
        grid = height // patch_size[0], width // patch_size[1]
    elif model is not None:
        grid = tuple(infer_token_grid(model, (height, width)))
    else:
        return None
    if grid[0] > height or grid[1] > width or min(grid) < 1:
        raise ValueError(f"token grid {grid} does not fit {height}x{width} images")
    return grid


def check_mix_call(images, target, num_classes: int, impl: str, paste_op, *, even_batch: bool = False,
                   mixer: str = "TransMix") -> str:
    """A mixer call's checks, all before any work; returns the backend of ``paste_op`` for ``impl``."""
    check_tensor("images", images, ndim=4, dtypes=FLOAT_DTYPES)
    backend = resolve_backend(impl, images.device, paste_op)  # impl='triton' needs a Triton device
    check_tensor("target", target, ndim=1, dtypes=(torch.int64,), device=images.device)
    batch = images.shape[0]
    if target.shape[0] != batch:
        raise ValueError(f"target must have shape ({batch},) like images' batch, got {tuple(target.shape)}")
    if batch == 0:
        raise ValueError("images must hold at least one sample, got an empty batch")
    if even_batch and batch % 2:
        raise ValueError(f"mode='pair' needs an even batch size, got {batch}")
    check_index_range("target", target, 0, num_classes)
    if not is_dense(images):
        raise ValueError(f"images must be contiguous or channels_last: {mixer} mixes them in place")
    return backend


def _generator(seed: int | None, generator: np.random.Generator | None) -> np.random.Generator:
    """``generator`` itself, or a new one from ``seed``: one source of draws for a mixer."""
    if generator is None:
        return np.random.default_rng(seed)
    if not isinstance(generator, np.random.Generator):
        raise TypeError(f"generator must be a numpy.random.Generator, got {type(generator).__name__}")
    if seed is not None:
        raise ValueError("give seed or generator, not both (a generator is already seeded)")
    return generator


class DrawState:
    """``state_dict`` / ``load_state_dict`` of a mixer drawing from ``self.rng`` (a NumPy Generator)
    with a ``mixup_enabled`` switch: TransMix's protocol, shared by the other mixers."""

    rng: np.random.Generator
    mixup_enabled: bool

    def _set_grid_and_draws(self, patch_size, token_grid, model, impl: str, seed, generator) -> None:
        """The token-grid sources, the backend and the generator, checked (the mixers' common arguments)."""
        self.patch_size = check_pair("patch_size", patch_size)
        self.token_grid = check_pair("token_grid", token_grid)
        self.model = model
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.impl = impl
        self.mixup_enabled = True
        self.rng = _generator(seed, generator)

    def state_dict(self) -> dict:
        """Where this mixer's random draws stand (plain values: pickle- and ``weights_only``-safe)."""
        return {"generator": self.rng.bit_generator.state, "mixup_enabled": self.mixup_enabled}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s ``state``: the next calls draw what they drew then."""
        if not isinstance(state, dict) or "generator" not in state:
            raise ValueError(f"state must be a {type(self).__name__}.state_dict(), got {type(state).__name__}")
        self.rng.bit_generator.state = state["generator"]
        self.mixup_enabled = bool(state.get("mixup_enabled", True))


class TransMix(DrawState):
    """TransMix / CutMix / Mixup batch mixing with timm Mixup's hyper-parameters.

    Args:
        num_classes: K.
        mixup_alpha, cutmix_alpha, cutmix_minmax, prob, switch_prob, mode, correct_lam,
            label_smoothing: as ``timm.data.Mixup`` (modes "batch", "pair", "elem").
        ratio: weight of the area lam in the TransMix lam (0.5 in the paper).
        patch_size: the ViT patch size (int or (ph, pw)): token grid = image size // patch size.
        token_grid: a fixed (gh, gw) instead; or ``model``: a supported timm model whose
            attention token grid is inferred at each call's image size.
        seed: seeds this object's generator (None: fresh entropy).
        generator: a ``numpy.random.Generator`` to draw from instead (shared with the caller, e.g.
            one generator for several mixers); not together with ``seed``.
        impl: backend of the ops ("auto": Triton on CUDA, PyTorch on CPU).

    Calling it mixes ``images`` (B, C, H, W) in place and returns ``(images, MixState)``.
    :meth:`state_dict` / :meth:`load_state_dict` save and restore where its random draws stand
    (as torch's optimizers and schedulers do), so a resumed run draws the same boxes.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        cutmix_minmax: tuple[float, float] | None = None,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        correct_lam: bool = True,
        label_smoothing: float = 0.1,
        ratio: float = 0.5,
        patch_size: int | tuple[int, int] | None = None,
        token_grid: tuple[int, int] | None = None,
        model: torch.nn.Module | None = None,
        seed: int | None = None,
        impl: str = "auto",
        generator: np.random.Generator | None = None,
    ) -> None:
        check_positive_int("num_classes", num_classes)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mixup_alpha = check_non_negative("mixup_alpha", mixup_alpha)
        self.cutmix_alpha = check_non_negative("cutmix_alpha", cutmix_alpha)
        if cutmix_minmax is not None:
            if not isinstance(cutmix_minmax, (tuple, list)) or len(cutmix_minmax) != 2:
                raise ValueError(f"cutmix_minmax must be a (min, max) pair, got {cutmix_minmax!r}")
            lo = check_range("cutmix_minmax[0]", cutmix_minmax[0], 0.0, 1.0)
            hi = check_range("cutmix_minmax[1]", cutmix_minmax[1], 0.0, 1.0)
            if lo >= hi:
                raise ValueError(f"cutmix_minmax must have min < max, got {tuple(cutmix_minmax)}")
            cutmix_minmax = (lo, hi)
            self.cutmix_alpha = 1.0  # as timm: minmax forces CutMix on
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise ValueError("mixup_alpha and cutmix_alpha are both 0: nothing to mix (set one > 0 or cutmix_minmax)")
        self.num_classes = num_classes
        self.cutmix_minmax = cutmix_minmax
        self.prob = check_range("prob", prob, 0.0, 1.0)
        self.switch_prob = check_range("switch_prob", switch_prob, 0.0, 1.0)
        self.mode = mode
        self.correct_lam = bool(correct_lam)
        self.label_smoothing = check_range("label_smoothing", label_smoothing, 0.0, 1.0)
        self.ratio = check_range("ratio", ratio, 0.0, 1.0)
        self._set_grid_and_draws(patch_size, token_grid, model, impl, seed, generator)

    # -------------------------------------------------------------- random parameters (host)

    def _beta(self, alpha: float, count: int) -> np.ndarray:
        """``count`` draws from Beta(alpha, alpha). Beta(1, 1) is the uniform distribution on [0, 1];
        NumPy's beta sampler runs a rejection loop per draw there (about 45 us for 256 draws)."""
        return self.rng.random(count) if alpha == 1.0 else self.rng.beta(alpha, alpha, size=count)

    def _draw_lam(self, count: int, use_cutmix: np.ndarray) -> np.ndarray:
        cut = self._beta(self.cutmix_alpha, count) if self.cutmix_alpha > 0 else None
        mix = self._beta(self.mixup_alpha, count) if self.mixup_alpha > 0 else None
        if cut is None:
            return mix
        if mix is None:
            return cut
        return np.where(use_cutmix, cut, mix)

    def _draw(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(lam, use_cutmix) for `count` independent draws; lam == 1 where nothing is mixed."""
        if not self.mixup_enabled:
            return np.ones(count), np.zeros(count, dtype=bool)
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = self.rng.random(count) < self.switch_prob
        else:
            use_cutmix = np.full(count, self.cutmix_alpha > 0)
        lam_mix = self._draw_lam(count, use_cutmix)
        use_cutmix = use_cutmix & (lam_mix < 1.0)
        if self.prob < 1.0:  # prob 1 applies every draw: no coin to toss
            apply = self.rng.random(count) < self.prob
            lam_mix, use_cutmix = np.where(apply, lam_mix, 1.0), use_cutmix & apply
        return lam_mix, use_cutmix

    # -------------------------------------------------------------- mixing

    def __call__(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, MixState]:
        """Mix ``images`` (B, C, H, W) in place; ``target`` (B,) int64. Returns (images, MixState)."""
        backend = check_mix_call(images, target, self.num_classes, self.impl, PASTE_INPLACE,
                                 even_batch=self.mode == "pair")
        batch, _, height, width = images.shape
        grid = token_grid_for(height, width, self.token_grid, self.patch_size, self.model)
        if self.mode == "batch":
            lam, use_cutmix = self._draw(1)
            lam, use_cutmix = np.repeat(lam, batch), np.repeat(use_cutmix, batch)
        elif self.mode == "pair":
            lam, use_cutmix = self._draw(batch // 2)
            lam, use_cutmix = np.concatenate([lam, lam[::-1]]), np.concatenate([use_cutmix, use_cutmix[::-1]])
        else:
            lam, use_cutmix = self._draw(batch)
        # timm keeps one Python float (float64) per batch, a float32 per element or pair.
        lam = lam.astype(np.float64 if self.mode == "batch" else np.float32)
        return images, self._mix(images, target, lam, use_cutmix, grid, backend)

    def _draw_boxes(self, lam: np.ndarray, height: int, width: int) -> np.ndarray:
        """(count, 4) int32 boxes on the host, timm's rand_bbox semantics (NumPy: cheap per call)."""
        draws = self.rng.random((2 if self.cutmix_minmax is None else 4, lam.shape[0]))
        corners = box_corners(
            lam, height, width, self.cutmix_minmax, draws,
            # np.minimum/np.maximum: the same values as np.clip, at a fraction of its call cost.
            sqrt=np.sqrt, to_int=lambda a: a.astype(np.int64), clip=lambda a, lo, hi: np.minimum(np.maximum(a, lo), hi),
        )
        return np.stack(corners, axis=1).astype(np.int32)

    def _sample_boxes(self, lam: np.ndarray, use_cutmix: np.ndarray, height: int, width: int):
        """Host-side (B, 4) boxes, empty on rows without CutMix; each row's label lam; the (B, 2)
        box sides (height, width)."""
        count = {"batch": 1, "pair": lam.shape[0] // 2}.get(self.mode, lam.shape[0])
        drawn = self._draw_boxes(lam[:count], height, width)
        if self.mode == "batch":
            drawn = np.repeat(drawn, lam.shape[0], axis=0)
        elif self.mode == "pair":
            drawn = np.concatenate([drawn, drawn[::-1]])
        boxes = np.where(use_cutmix[:, None], drawn, np.int32(0))
        sides = boxes[:, 1::2] - boxes[:, ::2]
        if self.correct_lam or self.cutmix_minmax is not None:
            # timm: lam = 1 - area / (H * W) in float64, then stored in lam's dtype.
            area = sides[:, 0].astype(np.float64) * sides[:, 1]
            lam = np.where(use_cutmix, (1.0 - area / float(height * width)).astype(lam.dtype), lam)
        return boxes, lam, sides

    def _mix(self, images, target, lam: np.ndarray, use_cutmix: np.ndarray, grid, backend: str) -> MixState:
        """Paste and blend with host-side parameters; bookkeeping stays in NumPy (cheap per call)."""
        batch, _, height, width = images.shape
        device = images.device
        partner = flipped_partner(batch, device)
        boxes, lam, sides = self._sample_boxes(lam, use_cutmix, height, width)
        blend = ~use_cutmix & (lam < 1.0)
        cut_rows, blend_rows = np.count_nonzero(use_cutmix), np.count_nonzero(blend)
        kind = "cutmix" if cut_rows == batch else "mixup" if blend_rows == batch else \
            "none" if cut_rows + blend_rows == 0 else "mixed"
        blended = self._blend(images, lam, blend) if blend_rows else None
        boxes_dev = _host_to(boxes, device)
        token_mask = None
        if cut_rows:
            max_bh, max_bw = sides.max(axis=0).tolist()
            # int64: the CPU kernel reads int64 boxes; int32 ones would cost it a conversion op.
            paste_boxes = _host_to((boxes[0] if self.mode == "batch" else boxes).astype(np.int64), device)
            _, token_mask = run_paste(backend, images, paste_boxes, partner, *(grid or (0, 0)), True, max_bh, max_bw)
        if blended is not None:
            rows, values = blended
            images.index_copy_(0, rows, values.to(images.dtype))
        return MixState(
            kind=kind, cutmix=_host_to(use_cutmix, device), boxes=boxes_dev, partner=partner,
            lam=_host_to(lam, device), lam_area=_host_to(lam.astype(np.float32), device), target=target,
            num_classes=self.num_classes, smoothing=self.label_smoothing, ratio=self.ratio, image_size=(height, width),
            token_grid=grid if token_mask is not None else None, token_mask=token_mask, impl=self.impl,
        )

    def _blend(self, images, lam: np.ndarray, blend: np.ndarray):
        """Mixup: timm's x * lam + x.flip(0) * (1 - lam), bit for bit.

        Mode batch blends the whole batch in place (no row there is pasted). Otherwise the blended
        rows are computed from the unmixed batch and returned as (rows, values) for writing back
        after the paste (a row's partner may be pasted over). Row gathers are index_select of
        whole images and every arithmetic step runs in place, so two buffers are allocated.
        """
        if self.mode == "batch":
            value = float(lam[0])
            # timm's operation order with Python-float scalars, also exact for bf16/fp16 images.
            flipped = images.flip(0).mul_(1.0 - value)
            images.mul_(value).add_(flipped)
            return None
        rows = np.flatnonzero(blend)
        lam_rows = _host_to(lam[rows].astype(np.float32), images.device).view(-1, 1, 1, 1)
        own = _host_to(rows, images.device)
        other = _host_to(images.shape[0] - 1 - rows, images.device)  # the flipped partner
        # float32 lam: bf16/fp16 rows are blended in float32 and rounded once, when written back.
        blended = images.index_select(0, own).to(torch.float32).mul_(lam_rows)
        blended.add_(images.index_select(0, other).to(torch.float32).mul_(1 - lam_rows))
        return own, blended
