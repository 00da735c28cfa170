"""The adaptive modulation and gated residual of FLUX-style blocks, each one ``addcmul`` pass."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gated", "modulate"]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Adaptive affine modulation ``(1 + scale) * x + shift``; x ``(B, L, D)``, shift/scale ``(B, 1, D)``."""
    return torch.addcmul(shift, x, 1 + scale)  # one pass over x instead of a product and a sum


def gated(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """Gated residual ``x + gate * y`` in one pass; x, y ``(B, L, D)``, gate ``(B, 1, D)``."""
    return torch.addcmul(x, gate, y)
