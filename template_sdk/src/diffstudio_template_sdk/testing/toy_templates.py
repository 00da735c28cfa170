"""Small template models, one per medium, for tests of pipelines, media plugins and the loaders.

Each is a complete template class (``process_inputs`` without gradients, ``forward`` with them, ``**kwargs``)
whose cache depends smoothly on its input, so tests can see the template take effect and gradients arrive.
Register them with ``register_plugin(toy_templates_plugin)`` (names ``toy/scale``, ``toy/kv``, ``toy/lora``,
``toy/residual``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffstudio.lora import LoraWeights
from torch import nn


class ToyScaleTemplate(nn.Module):
    """``{"scale": s}`` -> ``{key: (1, tokens, channels)}``, an affine function of ``s`` (e.g. initial latents).

    Args:
        key: The base-pipeline input to produce.
        tokens: Tokens of the produced tensor.
        channels: Channels per token.
    """

    def __init__(self, key: str = "latents", tokens: int = 64, channels: int = 48) -> None:
        super().__init__()
        self.key = key
        self.template_config = {"key": key, "tokens": tokens, "channels": channels}
        self.base = nn.Parameter(torch.randn(1, tokens, channels))
        self.direction = nn.Parameter(torch.randn(1, tokens, channels))

    @torch.no_grad()
    def process_inputs(self, scale: float, **kwargs: Any) -> dict[str, Any]:
        return {"value": torch.tensor(float(scale))}

    def forward(self, value: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
        return {self.key: self.base + value.to(self.base) * self.direction}


class ToyKVTemplate(nn.Module):
    """``{"scale": s}`` -> ``{"kv_cache": {block: (K, V)}}``, K and V ``(1, tokens, heads, head_dim)``."""

    def __init__(self, blocks: Sequence[str] = ("double_0", "single_0"), heads: int = 2, head_dim: int = 16,
                 tokens: int = 4) -> None:  # fmt: skip
        super().__init__()
        self.blocks = list(blocks)
        self.template_config = {"blocks": self.blocks, "heads": heads, "head_dim": head_dim, "tokens": tokens}
        self.shape = (tokens, heads, head_dim)
        self.base = nn.Parameter(torch.randn(2 * len(self.blocks), tokens, heads, head_dim))
        self.direction = nn.Parameter(torch.randn(2 * len(self.blocks), tokens, heads, head_dim))

    @torch.no_grad()
    def process_inputs(self, scale: float, **kwargs: Any) -> dict[str, Any]:
        return {"value": torch.tensor(float(scale))}

    def forward(self, value: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
        kv = (self.base + value.to(self.base) * self.direction).unsqueeze(1)  # (2N, 1, tokens, H, Dh)
        return {"kv_cache": {name: (kv[2 * i], kv[2 * i + 1]) for i, name in enumerate(self.blocks)}}


class ToyLoraTemplate(nn.Module):
    """``{"strength": s}`` -> ``{"lora": {module path: LoraWeights}}`` of rank ``rank``, up scaled by ``s``.

    Args:
        targets: ``{module path: (in_features, out_features)}`` of the layers to adapt.
        rank: LoRA rank.
        alpha: LoRA alpha (None: factor 1).
    """

    def __init__(self, targets: dict[str, Sequence[int]], rank: int = 2, alpha: float | None = None) -> None:
        super().__init__()
        self.paths = list(targets)
        self.alpha = alpha
        self.template_config = {"targets": {k: list(v) for k, v in targets.items()}, "rank": rank, "alpha": alpha}
        self.down = nn.ParameterList([nn.Parameter(torch.randn(rank, int(i)) / int(i) ** 0.5)
                                      for i, _ in targets.values()])  # fmt: skip
        self.up = nn.ParameterList([nn.Parameter(torch.randn(int(o), rank) * 0.5) for _, o in targets.values()])

    @torch.no_grad()
    def process_inputs(self, strength: float = 1.0, **kwargs: Any) -> dict[str, Any]:
        return {"strength": torch.tensor(float(strength))}

    def forward(self, strength: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
        lora = {
            path: LoraWeights(down, up * strength.to(up), self.alpha)
            for path, down, up in zip(self.paths, self.down, self.up)
        }
        return {"lora": lora}


class ToyResidualTemplate(nn.Module):
    """``{"scale": s, "height": H, "width": W}`` -> ``{"block_residuals": {block: (1, dim, H/f, W/f)}}``."""

    def __init__(self, blocks: Sequence[str] = ("double_0", "single_1"), dim: int = 32, factor: int = 4) -> None:
        super().__init__()
        self.blocks = list(blocks)
        self.factor = factor
        self.template_config = {"blocks": self.blocks, "dim": dim, "factor": factor}
        self.gain = nn.Parameter(torch.randn(len(self.blocks), dim, 1, 1) * 0.5)

    @torch.no_grad()
    def process_inputs(self, scale: float, height: int, width: int, **kwargs: Any) -> dict[str, Any]:
        h, w = height // self.factor, width // self.factor
        ramp = torch.linspace(-1, 1, h * w).view(1, 1, h, w) * float(scale)
        return {"ramp": ramp}

    def forward(self, ramp: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
        return {"block_residuals": {name: self.gain[i : i + 1] * ramp for i, name in enumerate(self.blocks)}}
