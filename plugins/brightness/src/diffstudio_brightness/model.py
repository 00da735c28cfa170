"""``BrightnessTemplate``: a brightness ``s`` in ``[0, 1]`` -> a KV cache for every block of a FLUX.2 DiT.

For each block, K and V are ``tokens`` learned vectors (a table) moved along ``directions`` learned directions by
gains that an MLP computes from smooth features of ``s``; they are viewed as ``(1, tokens, heads, head_dim)``.
The features are low-frequency (sines and cosines of ``pi * k * s`` for small ``k``), so the template
interpolates between the brightness values it was trained on. The defaults are the sizes of the embedded shapes
model (2 double and 4 single blocks, 2 heads of 64); pass the sizes of another base model to train it there.
Parameters start from a fixed seed, so every installation builds the same untrained template.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["BrightnessData", "BrightnessTemplate", "scale_features"]


def scale_features(scale: torch.Tensor, frequencies: int) -> torch.Tensor:
    """``(B,)`` scales -> ``(B, 1 + 2 * frequencies)``: ``s - 0.5``, ``sin(pi k s)``, ``cos(pi k s)``, k = 1..F."""
    s = scale.float()[:, None]
    k = torch.arange(1, frequencies + 1, device=scale.device, dtype=torch.float32)[None]
    return torch.cat([s - 0.5, torch.sin(math.pi * k * s), torch.cos(math.pi * k * s)], dim=1)


class BrightnessTemplate(nn.Module):
    """See the module docstring.

    Args:
        num_double_blocks: Double-stream blocks of the base DiT.
        num_single_blocks: Single-stream blocks.
        num_heads: Attention heads (the shapes DiT's: 2).
        head_dim: Channels per head (64).
        tokens: Cache tokens per block.
        directions: Learned directions per block and K/V.
        frequencies: Sine/cosine pairs of the scale features.
        hidden: Width of the MLP.
    """

    def __init__(self, num_double_blocks: int = 2, num_single_blocks: int = 4, num_heads: int = 2,
                 head_dim: int = 64, tokens: int = 8, directions: int = 4, frequencies: int = 4,
                 hidden: int = 64) -> None:  # fmt: skip
        super().__init__()
        self.template_config = {"num_double_blocks": num_double_blocks, "num_single_blocks": num_single_blocks,
                                "num_heads": num_heads, "head_dim": head_dim, "tokens": tokens,
                                "directions": directions, "frequencies": frequencies, "hidden": hidden}  # fmt: skip
        self.block_names = [f"double_{i}" for i in range(num_double_blocks)]
        self.block_names += [f"single_{i}" for i in range(num_single_blocks)]
        self.kv_shape = (tokens, num_heads, head_dim)
        self.frequencies = frequencies
        self.directions = directions
        count, width = 2 * len(self.block_names), num_heads * head_dim  # a K and a V per block
        gen = torch.Generator().manual_seed(20240611)
        self.table = nn.Parameter(torch.randn(count, tokens, width, generator=gen) * 0.5)
        self.basis = nn.Parameter(torch.randn(count, directions, tokens, width, generator=gen) * 0.1)
        self.mlp = nn.Sequential(
            nn.Linear(1 + 2 * frequencies, hidden), nn.SiLU(), nn.Linear(hidden, count * directions)
        )  # fmt: skip
        with torch.no_grad():
            for layer in (self.mlp[0], self.mlp[2]):
                assert isinstance(layer, nn.Linear)
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) / layer.in_features**0.5)
                layer.bias.zero_()

    @torch.no_grad()
    def process_inputs(self, scale: float = 0.5, pipe: Any = None, **kwargs: Any) -> dict[str, Any]:
        """``{"scale": s}`` -> ``{"scale": (1,) tensor}`` (no gradients); ``s`` must be in ``[0, 1]``."""
        if not 0.0 <= float(scale) <= 1.0:
            raise ValueError(f"the brightness scale must be in [0, 1] (0.5: unchanged), got {scale}")
        return {"scale": torch.tensor([float(scale)], device=self.table.device)}

    def forward(self, scale: torch.Tensor, pipe: Any = None, **kwargs: Any) -> dict[str, Any]:
        """``scale (1,)`` -> ``{"kv_cache": {block: (K, V)}}``, each ``(1, tokens, heads, head_dim)``."""
        gains = self.mlp(scale_features(scale, self.frequencies).to(self.table.dtype))  # (1, count * directions)
        gains = gains.view(len(self.table), self.directions, 1, 1)
        vectors = self.table + (gains * self.basis).sum(dim=1)  # (count, tokens, width)
        kv = vectors.view(len(vectors), 1, *self.kv_shape)
        return {"kv_cache": {name: (kv[2 * i], kv[2 * i + 1]) for i, name in enumerate(self.block_names)}}


class BrightnessData:
    """Training rows: ``{"scale": s}`` passes through (checked to lie in ``[0, 1]``)."""

    def __call__(self, scale: float, **kwargs: Any) -> dict[str, Any]:
        """Return ``process_inputs`` arguments."""
        if not 0.0 <= float(scale) <= 1.0:
            raise ValueError(f"training row has brightness scale {scale}, outside [0, 1]")
        return {"scale": float(scale)}
