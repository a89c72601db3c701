"""``--mix mixpro``: ``tk.MixPro`` in a training step that calls only ``state.targets(probe)``.

MixPro's progressive attention labels also need the logits of the forward pass that the probe
watched (the progressive factor is the cosine similarity of the prediction and the area label).
:class:`LogitsMixPro` keeps them with a forward hook on the model, registered at the first call
(after the model's EMA copy is made, so the copy does not carry the hook), and hands them to
``MixProState.targets`` together with the probe.
"""

from __future__ import annotations

from typing import Optional

import torch

import transmix_kernels as tk

__all__ = ["LogitsMixPro"]


class _PalTargets:
    """A ``MixProState`` whose ``targets(probe)`` reads the logits of the model's last forward."""

    def __init__(self, state: tk.MixProState, owner: "LogitsMixPro") -> None:
        self.state, self._owner = state, owner

    @property
    def kind(self) -> str:
        return self.state.kind

    def area_targets(self) -> torch.Tensor:
        return self.state.area_targets()

    def targets(self, attention=None) -> torch.Tensor:
        logits = self._owner.logits if attention is not None and self.state.mask is not None else None
        return self.state.targets(attention, logits=logits)


class LogitsMixPro:
    """``tk.MixPro`` whose states label with the probe and the logits of the model's last forward.

    ``state_dict`` / ``load_state_dict`` are MixPro's (the checkpoints capture its generator).
    """

    def __init__(self, mixpro: tk.MixPro, model: torch.nn.Module) -> None:
        self.mixpro, self._model = mixpro, model
        self._hook = None
        self.logits: Optional[torch.Tensor] = None

    def _keep(self, _module, _args, output) -> None:
        # A distilled model trains with (class head, distillation head): their mean, as at inference.
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        self.logits = (sum(out.detach().float() for out in outputs) / len(outputs))

    def __call__(self, images: torch.Tensor, target: torch.Tensor):
        if self._hook is None:
            self._hook = self._model.register_forward_hook(self._keep)
        self.logits = None
        images, state = self.mixpro(images, target)
        return images, _PalTargets(state, self)

    def state_dict(self) -> dict:
        return self.mixpro.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.mixpro.load_state_dict(state)
