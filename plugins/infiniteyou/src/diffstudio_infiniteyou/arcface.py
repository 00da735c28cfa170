"""The IR-SE50 ArcFace face embedder InfiniteYou uses (facexlib's ``recognition_arcface_ir_se50.pth``).

An improved-residual ResNet with squeeze-and-excitation: a 3x3 stem (64 channels, BN, PReLU), four stages of
bottlenecks (64, 128, 256, 512 channels; 3, 4, 14, 3 units for IR-SE50, the first unit of each stage strided 2),
then BN, flatten, ``Linear(512 * 7 * 7, 512)``, BatchNorm1d and an L2 normalisation: a ``(B, 3, 112, 112)`` crop in
``[-1, 1]`` (BGR channel order, as the published pipeline feeds it) becomes a unit ``(B, 512)`` embedding.

A bottleneck: ``res = BN -> conv3x3 -> PReLU -> conv3x3 (stride) -> BN -> SE`` plus a shortcut (a strided 1x1
max-pool when the width is kept, else a strided 1x1 conv and BN). State-dict names are facexlib's
(``input_layer``, ``body.{i}.{shortcut_layer, res_layer}``, ``output_layer``), so the published file loads by key
(after ``diffstudio convert``: it is a pickle). The stage sizes are read from the weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import cast

import torch
from diffstudio.errors import CheckpointError
from torch import Tensor, nn

STAGE_WIDTHS = (64, 128, 256, 512)
"""Output channels of the four stages."""

IR_SE50_UNITS = (3, 4, 14, 3)
"""Bottlenecks per stage of IR-SE50."""


class SqueezeExcite(nn.Module):
    """Channel gate: ``x * sigmoid(fc2(relu(fc1(mean(x)))))`` with 1x1 convolutions (reduction 16)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        """Gated ``x (B, C, H, W)``."""
        gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * gate


class BottleneckIRSE(nn.Module):
    """One improved-residual bottleneck with SE (see the module docstring)."""

    def __init__(self, in_channels: int, depth: int, stride: int) -> None:
        super().__init__()
        self.shortcut_layer: nn.Module
        if in_channels == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, depth, 1, stride, bias=False), nn.BatchNorm2d(depth)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth), SqueezeExcite(depth),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W) -> (B, depth, H / stride, W / stride)``."""
        return cast(Tensor, self.res_layer(x) + self.shortcut_layer(x))


class _Flatten(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)


class ArcFaceIRSE(nn.Module):
    """IR-SE ArcFace backbone (IR-SE50 by default).

    Args:
        units: Bottlenecks per stage (``(3, 4, 14, 3)`` for IR-SE50).
        crop: Side of the input crop (112: 7 x 7 after the four strided stages).
    """

    def __init__(self, units: Sequence[int] = IR_SE50_UNITS, crop: int = 112) -> None:
        super().__init__()
        self.units, self.crop = tuple(units), crop
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        blocks: list[nn.Module] = []
        in_channels = 64
        for depth, count in zip(STAGE_WIDTHS, self.units):
            for i in range(count):
                blocks.append(BottleneckIRSE(in_channels if i == 0 else depth, depth, 2 if i == 0 else 1))
            in_channels = depth
        self.body = nn.Sequential(*blocks)
        side = crop // 16
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512), nn.Dropout(0.6), _Flatten(), nn.Linear(512 * side * side, 512), nn.BatchNorm1d(512)
        )

    def forward(self, crops: Tensor) -> Tensor:
        """Unit embeddings ``(B, 512)`` of aligned crops ``(B, 3, crop, crop)`` in ``[-1, 1]`` (BGR)."""
        x = self.output_layer(self.body(self.input_layer(crops.to(self.input_layer[0].weight.dtype))))
        return x / torch.linalg.vector_norm(x, dim=1, keepdim=True)

    @classmethod
    def units_from_keys(cls, keys: Sequence[str] | Mapping[str, object]) -> tuple[int, ...]:
        """Bottlenecks per stage, from ``body.{i}.res_layer.1.weight`` names and which units have a conv shortcut.

        Raises:
            CheckpointError: The names are not those of an IR-SE backbone with four stages.
        """
        indices = sorted({int(m.group(1)) for k in keys if (m := re.match(r"body\.(\d+)\.res_layer\.", k))})
        firsts = [i for i in indices if f"body.{i}.shortcut_layer.0.weight" in keys]
        if not indices or indices != list(range(len(indices))) or len(firsts) not in (3, 4):
            raise CheckpointError("not an IR-SE ArcFace backbone: expected body.{i}.res_layer.* in four stages")
        if len(firsts) == 3:  # the first stage keeps 64 channels: a max-pool shortcut, no tensors
            firsts = [0, *firsts]
        bounds = [*firsts, len(indices)]
        return tuple(bounds[i + 1] - bounds[i] for i in range(4))
