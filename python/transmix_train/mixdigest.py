"""``mix_digest.json``: a fingerprint of what the mixer drew in a run's first training steps.

Two runs that are compared seed by seed (TransMix against CutMix, say) are meant to see the same
boxes, partners and lambdas; whether they did is a fact of the runs, not of their configs (a
change to the mixer's random stream between two commits breaks it silently). The trainer hashes
the first ``steps`` mixing draws of rank 0 and writes the digest; ``transmix-experiment`` copies
it into each run's ``result.json`` and checks it across paired runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["MixDigest"]

# What a mixer state says about its draws (tk.MixState and the compared mixers' PairMixState).
_FIELDS = ("kind", "boxes", "partner", "lam", "lam_area", "cutmix", "mask")


class MixDigest:
    """SHA-256 over the mixing draws of the first ``steps`` training steps.

    Call it with ``(step, state)`` after each mixer call (``train_one_epoch(on_mix=...)``); states
    after ``steps`` are ignored. :meth:`write` stores ``{"steps", "sha256", "kinds"}`` as JSON.
    """

    def __init__(self, path: str | os.PathLike, steps: int = 20) -> None:
        self.path, self.steps = Path(path), steps
        self._hash, self._seen, self._kinds = hashlib.sha256(), 0, set()

    def __call__(self, step: int, state: Any) -> None:
        if step >= self.steps:
            return
        self._seen += 1
        for name in _FIELDS:
            value = getattr(state, name, None)
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                tensor = value.detach().to("cpu", copy=False).contiguous()
                self._hash.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                self._hash.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
            else:
                self._hash.update(f"{name}={value!r}".encode())
                if name == "kind":
                    self._kinds.add(str(value))

    def write(self) -> Path:
        """The digest of the steps seen so far, as ``mix_digest.json``."""
        record = {"steps": self._seen, "sha256": self._hash.hexdigest(), "kinds": sorted(self._kinds)}
        self.path.write_text(json.dumps(record, indent=1) + "\n")
        return self.path
