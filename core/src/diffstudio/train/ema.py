"""An exponential moving average of the trained parameters (``--ema_decay``); saved files hold the average."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class EmaWeights:
    """``ema = decay * ema + (1 - decay) * param`` after every optimizer step, for the trainable parameters.

    Has ``state_dict`` / ``load_state_dict`` so accelerate checkpoints it (``register_for_checkpointing``).
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current parameters into the average."""
        for shadow, param in zip(self.shadow, self.params):
            shadow.lerp_(param.detach().float(), 1.0 - self.decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily put the averaged values into the parameters (to save or validate them)."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for param, shadow in zip(self.params, self.shadow):
                param.copy_(shadow.to(param.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, saved):
                    param.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        """The averages (for checkpoints)."""
        return {"decay": self.decay, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the averages from a checkpoint."""
        self.decay = float(state["decay"])
        self.shadow = [s.clone().float() for s in state["shadow"]]
