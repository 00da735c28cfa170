"""Pure tensor functions of the FLUX.1 model code: latent packing, position ids and the GELU.

Vocabulary: ``img`` are packed image-latent tokens, ``txt`` T5 tokens, ``*_ids`` their 3-axis position ids
``(t, h, w)``. Target-image tokens have ``(0, row, col)``, Kontext reference tokens ``(1, row, col)``, text
tokens ``(0, 0, 0)``. A latent image ``(B, C, H, W)`` packs 2 x 2 patches into tokens of ``4 C`` channels,
channel-major (``c * 4 + 2 * i + j``), over a row-major ``H/2 x W/2`` grid, as BFL and diffusers do.
"""

from __future__ import annotations

import torch
from diffstudio.dit.layers import gelu_tanh
from einops import rearrange
from torch import Tensor

__all__ = ["KONTEXT_T", "gelu_tanh", "image_ids", "pack_latents", "text_ids", "unpack_latents"]

KONTEXT_T = 1
"""Time-axis id of Kontext reference-image tokens."""


def pack_latents(z: Tensor) -> Tensor:
    """Latent image to tokens: ``(B, C, H, W) -> (B, H/2 * W/2, 4 C)``."""
    return rearrange(z, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Tokens back to a latent image of ``height x width`` latent pixels: ``(B, L, 4 C) -> (B, C, H, W)``."""
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=height // 2, w=width // 2, ph=2, pw=2)


def image_ids(batch: int, height: int, width: int, t: int = 0, device: torch.device | str | None = None) -> Tensor:
    """Position ids ``(t, row, col)`` of a row-major ``height x width`` token grid, int64 ``(B, H*W, 3)``."""
    rows, cols = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    ids = torch.stack([torch.full_like(rows, t), rows, cols], dim=-1)  # (H, W, 3)
    return rearrange(ids, "h w a -> (h w) a").expand(batch, -1, -1)


def text_ids(batch: int, length: int, device: torch.device | str | None = None) -> Tensor:
    """Position ids of T5 tokens: all zero (FLUX.1 text tokens carry no position in RoPE), ``(B, L, 3)``."""
    return torch.zeros(batch, length, 3, dtype=torch.long, device=device)
