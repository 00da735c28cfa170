"""``ColourShiftTemplate``: a target colour name -> LoRA tensors that recolour the shape a FLUX.2 DiT draws.

The template holds a bank of LoRAs, one per colour: for every adapted layer a down matrix ``(rank, in)`` shared by
all colours and an up matrix ``(colours, out, rank)``; the input selects the colour's up matrices and scales them
by ``strength``. The cache is ``{"lora": {"<layer>.lora_A.weight": (rank, in), "<layer>.lora_B.weight": (out,
rank)}}``, which the LoRA medium applies as a side path of the positive CFG branch (never merged into the base
weights). Up matrices start at zero, so the untrained template changes nothing.

Adapted layers: the image stream of every double block (``img_attn.qkv``, ``img_attn.proj``, ``img_mlp.0``,
``img_mlp.2``), every single block (``linear1``, ``linear2``), ``img_in`` and ``final_layer.linear``. The
defaults are the sizes of the embedded shapes model (2 double and 4 single blocks, width 128, MLP ratio 3, 32
latent channels) and its palette.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["COLOURS", "ColourShiftData", "ColourShiftTemplate", "lora_targets"]

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
"""The shapes palette (``diffstudio_shapes.data.PALETTE``), in its order."""


def lora_targets(double_blocks: int, single_blocks: int, hidden_size: int, mlp_ratio: float,
                 in_channels: int) -> dict[str, tuple[int, int]]:  # fmt: skip
    """``{layer path: (in_features, out_features)}`` of the adapted layers of a FLUX.2 DiT."""
    mlp = int(hidden_size * mlp_ratio)
    targets = {"img_in": (in_channels, hidden_size), "final_layer.linear": (hidden_size, in_channels)}
    for i in range(double_blocks):
        prefix = f"double_blocks.{i}"
        targets[f"{prefix}.img_attn.qkv"] = (hidden_size, 3 * hidden_size)
        targets[f"{prefix}.img_attn.proj"] = (hidden_size, hidden_size)
        targets[f"{prefix}.img_mlp.0"] = (hidden_size, 2 * mlp)
        targets[f"{prefix}.img_mlp.2"] = (mlp, hidden_size)
    for i in range(single_blocks):
        targets[f"single_blocks.{i}.linear1"] = (hidden_size, 3 * hidden_size + 2 * mlp)
        targets[f"single_blocks.{i}.linear2"] = (hidden_size + mlp, hidden_size)
    return targets


class ColourShiftTemplate(nn.Module):
    """See the module docstring.

    Args:
        double_blocks: Double-stream blocks of the base DiT.
        single_blocks: Single-stream blocks.
        hidden_size: DiT width.
        mlp_ratio: MLP width over ``hidden_size``.
        in_channels: Latent channels per token (``img_in`` input).
        rank: LoRA rank per colour.
        colours: The colour names the template knows.
    """

    def __init__(self, double_blocks: int = 2, single_blocks: int = 4, hidden_size: int = 128,
                 mlp_ratio: float = 3.0, in_channels: int = 32, rank: int = 4,
                 colours: Sequence[str] = COLOURS) -> None:  # fmt: skip
        super().__init__()
        self.colours = list(colours)
        self.template_config = {"double_blocks": double_blocks, "single_blocks": single_blocks,
                                "hidden_size": hidden_size, "mlp_ratio": mlp_ratio, "in_channels": in_channels,
                                "rank": rank, "colours": self.colours}  # fmt: skip
        self.targets = lora_targets(double_blocks, single_blocks, hidden_size, mlp_ratio, in_channels)
        gen = torch.Generator().manual_seed(20240612)
        self.down = nn.ParameterList(
            [nn.Parameter(torch.randn(rank, i, generator=gen) / i**0.5) for i, _ in self.targets.values()]
        )  # fmt: skip
        self.up = nn.ParameterList(
            [nn.Parameter(torch.zeros(len(self.colours), o, rank)) for _, o in self.targets.values()]
        )

    @torch.no_grad()
    def process_inputs(self, colour: str, strength: float = 1.0, pipe: Any = None, **kwargs: Any) -> dict[str, Any]:
        """``{"colour": name, "strength": s}`` -> ``{"index": (), "strength": ()}`` tensors (no gradients)."""
        if colour not in self.colours:
            raise ValueError(f"unknown colour {colour!r}; the template knows {', '.join(self.colours)}")
        device = self.up[0].device
        return {"index": torch.tensor(self.colours.index(colour), device=device),
                "strength": torch.tensor(float(strength), device=device)}  # fmt: skip

    def forward(self, index: torch.Tensor, strength: torch.Tensor, pipe: Any = None, **kwargs: Any) -> dict[str, Any]:
        """-> ``{"lora": {"<layer>.lora_A.weight": (rank, in), "<layer>.lora_B.weight": (out, rank)}}``."""
        lora: dict[str, torch.Tensor] = {}
        for path, down, up in zip(self.targets, self.down, self.up):
            lora[f"{path}.lora_A.weight"] = down
            lora[f"{path}.lora_B.weight"] = up[index] * strength.to(up.dtype)
        return {"lora": lora}


class ColourShiftData:
    """Training rows: ``{"colour": name}`` (and an optional ``strength``) pass through."""

    def __call__(self, colour: str, strength: float = 1.0, **kwargs: Any) -> dict[str, Any]:
        """Return ``process_inputs`` arguments."""
        return {"colour": str(colour), "strength": float(strength)}
