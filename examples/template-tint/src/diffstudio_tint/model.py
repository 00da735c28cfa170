"""``TintTemplate``: a strength in ``[0, 1]`` -> ``{"kv_cache": {block: (K, V)}}`` for a FLUX.2 DiT.

K and V are ``(1, tokens, heads, head_dim)`` per block: a learned table per block, moved along a learned direction
by an MLP of the strength's sinusoidal embedding. The default sizes are the embedded ``diffstudio/shapes`` model's
(2 double + 4 single blocks, 2 heads of 64: :data:`SHAPES_GEOMETRY`); pass another base model's sizes to build it
for that model (FLUX.2 klein-4B: 5, 20, 24, 128). The template declares the geometry it was built for as
``dit_geometry``, and a pipeline whose DiT differs refuses it before it runs. Parameters start from a fixed seed, so
every installation builds the same untrained template.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SHAPES_GEOMETRY = {"double_blocks": 2, "single_blocks": 4, "heads": 2, "head_dim": 64}
"""The DiT geometry of the embedded ``diffstudio/shapes`` model, which the defaults fit."""


def strength_embedding(strength: torch.Tensor, dim: int) -> torch.Tensor:
    """``(B,)`` strengths -> ``(B, dim)`` sin/cos features over log-spaced frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(100.0) * torch.arange(half, device=strength.device, dtype=torch.float32) / half)
    angles = strength.float()[:, None] * 100.0 * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class TintTemplate(nn.Module):
    """See the module docstring.

    Args:
        double_blocks: Double-stream blocks of the base DiT.
        single_blocks: Single-stream blocks.
        heads: Attention heads.
        head_dim: Channels per head.
        tokens: Cache tokens per block.
        features: Width of the strength embedding.
    """

    def __init__(self, double_blocks: int = 2, single_blocks: int = 4, heads: int = 2, head_dim: int = 64,
                 tokens: int = 8, features: int = 32) -> None:  # fmt: skip
        super().__init__()
        self.template_config = {"double_blocks": double_blocks, "single_blocks": single_blocks, "heads": heads,
                                "head_dim": head_dim, "tokens": tokens, "features": features}  # fmt: skip
        self.dit_geometry = {"double_blocks": double_blocks, "single_blocks": single_blocks, "heads": heads,
                             "head_dim": head_dim}  # fmt: skip
        self.block_names = [f"double_{i}" for i in range(double_blocks)] + [f"single_{i}" for i in range(single_blocks)]
        self.features = features
        self.kv_shape = (tokens, heads, head_dim)
        count = 2 * len(self.block_names)  # a K and a V per block
        gen = torch.Generator().manual_seed(1234)
        self.table = nn.Parameter(torch.randn(count, tokens, heads * head_dim, generator=gen))
        self.direction = nn.Parameter(torch.randn(count, 1, heads * head_dim, generator=gen))
        self.mlp = nn.Sequential(nn.Linear(features, features), nn.SiLU(), nn.Linear(features, count))
        with torch.no_grad():
            for layer in (self.mlp[0], self.mlp[2]):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) / features**0.5)
                layer.bias.zero_()

    @torch.no_grad()
    def process_inputs(self, strength: float = 0.5, pipe: Any = None, **kwargs: Any) -> dict[str, Any]:
        """``{"strength": s}`` -> ``{"strength": (1,) tensor}`` (no gradients)."""
        if not 0.0 <= float(strength) <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        return {"strength": torch.tensor([float(strength)], device=self.table.device)}

    def forward(self, strength: torch.Tensor, pipe: Any = None, **kwargs: Any) -> dict[str, Any]:
        """``strength (1,)`` -> ``{"kv_cache": {block: (K, V)}}``, each ``(1, tokens, heads, head_dim)``."""
        gains = self.mlp(strength_embedding(strength, self.features).to(self.table.dtype))  # (1, 2N)
        vectors = self.table + gains[0][:, None, None] * self.direction  # (2N, tokens, heads * head_dim)
        kv = vectors.view(len(vectors), 1, *self.kv_shape)
        return {"kv_cache": {name: (kv[2 * i], kv[2 * i + 1]) for i, name in enumerate(self.block_names)}}


class TintData:
    """Training rows: ``{"strength": s}`` passes through unchanged."""

    def __call__(self, strength: float, **kwargs: Any) -> dict[str, Any]:
        """Return ``process_inputs`` arguments."""
        return {"strength": float(strength)}
