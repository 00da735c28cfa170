"""An exponential moving average of the trained parameters (``--ema_decay``); saved files hold the average."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class EmaWeights:
    """``ema = d * ema + (1 - d) * param`` after every optimizer step, for the trainable parameters.

    ``d`` follows diffusers' ``EMAModel`` (its default, no ``use_ema_warmup``): 0 for the first update (the
    average starts at the trained values, not at the initialisation), then ``min(decay, (1 + n) / (10 + n))``
    for update ``n``, so early checkpoints are not dominated by the random start. ``state_dict`` /
    ``load_state_dict`` give and take the decay, the update count and the averages; checkpoints store them as
    safetensors + JSON (:mod:`diffstudio.train.state_files`), never as a pickle.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.updates = 0
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone().float() for p in self.params]

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        n = self.updates
        return 0.0 if n == 0 else min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current parameters into the average."""
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], weight)
        self.updates += 1

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
        return {"decay": self.decay, "updates": self.updates, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the averages from a checkpoint."""
        self.decay = float(state["decay"])
        # checkpoints from before the warm-up schedule: past it, ``decay`` as they used
        self.updates = int(state.get("updates", 10**9))
        self.shadow = [s.clone().float() for s in state["shadow"]]
