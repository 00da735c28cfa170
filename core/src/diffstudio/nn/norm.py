"""``RMSNorm`` with BFL's parameter name (``scale``) and the FLUX families' per-head ``QKNorm``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["QKNorm", "RMSNorm"]


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis with a learned ``scale``, computed in float32."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``(..., dim)``: ``x / sqrt(mean(x^2) + 1e-6)`` in float32, cast back, times ``scale``."""
        if x.dtype == torch.float32 and self.scale.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.scale, eps=1e-6)  # one fused pass (4.1 -> 0.5 ms on q)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=1e-6).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    """Per-head RMS norms of queries and keys (BFL keys ``query_norm.scale``, ``key_norm.scale``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Normalise q, k ``(B, L, H, Dh)`` and cast them to ``v``'s dtype."""
        return self.query_norm(q).to(v), self.key_norm(k).to(v)
