"""Pure tensor functions of the FLUX.2 model code: SwiGLU, latent packing and position ids.

Vocabulary: ``x`` are packed image-latent tokens, ``ctx`` text-encoder tokens, ``*_ids`` their 4-axis position
ids ``(t, h, w, l)``. Target-image tokens have ``(0, h, w, 0)``, reference (edit) image ``i`` has
``(10 * (i + 1), h, w, 0)``, text token ``l`` has ``(0, 0, 0, l)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

REFERENCE_T_STEP = 10
"""Time-axis spacing of reference (edit) images: image ``i`` gets ``t = 10 * (i + 1)``."""


def swiglu(x: Tensor, out: Tensor | None = None) -> Tensor:
    """SwiGLU on a fused projection, ``silu(a) * b`` for the halves ``a, b``: ``(..., 2F) -> (..., F)``.

    ``out`` receives the result when given (not under autograd).
    """
    a, b = x.chunk(2, dim=-1)
    return torch.mul(F.silu(a), b, out=out) if out is not None else F.silu(a) * b


def patchify_latents(z: Tensor, patch: tuple[int, int] = (2, 2)) -> Tensor:
    """Fold 2 x 2 latent patches into channels, channel-major: ``(B, C, H, W) -> (B, C*4, H/2, W/2)``."""
    return rearrange(z, "b c (h ph) (w pw) -> b (c ph pw) h w", ph=patch[0], pw=patch[1])


def unpatchify_latents(z: Tensor, patch: tuple[int, int] = (2, 2)) -> Tensor:
    """Inverse of :func:`patchify_latents`: ``(B, C*4, H, W) -> (B, C, 2H, 2W)``."""
    return rearrange(z, "b (c ph pw) h w -> b c (h ph) (w pw)", ph=patch[0], pw=patch[1])


def pack_latents(z: Tensor) -> Tensor:
    """Latent image to tokens in row-major order: ``(B, C, H, W) -> (B, H*W, C)``."""
    return rearrange(z, "b c h w -> b (h w) c")


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Tokens in row-major order back to a latent image: ``(B, H*W, C) -> (B, C, H, W)``."""
    return rearrange(tokens, "b (h w) c -> b c h w", h=height, w=width)


def image_ids(batch: int, height: int, width: int, t: int = 0, device: torch.device | str | None = None) -> Tensor:
    """Position ids ``(t, h, w, 0)`` of a row-major ``height x width`` token grid, shape ``(B, H*W, 4)``."""
    hh, ww = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    ids = torch.zeros(height, width, 4, dtype=torch.long, device=device)  # (H, W, 4)
    ids[..., 0] = t
    ids[..., 1] = hh
    ids[..., 2] = ww
    return rearrange(ids, "h w a -> (h w) a").expand(batch, -1, -1)


def reference_image_ids(
    sizes: list[tuple[int, int]], batch: int = 1, device: torch.device | str | None = None
) -> Tensor:
    """Concatenated ids of reference images of latent sizes ``[(H_i, W_i), ...]`` with ``t = 10 * (i + 1)``.

    Returns:
        Ids of shape ``(B, sum(H_i * W_i), 4)``.
    """
    parts = [image_ids(batch, h, w, REFERENCE_T_STEP * (i + 1), device) for i, (h, w) in enumerate(sizes)]
    return torch.cat(parts, dim=1)


def text_ids(batch: int, length: int, start: int = 0, device: torch.device | str | None = None) -> Tensor:
    """Position ids ``(0, 0, 0, start + l)`` of ``length`` text tokens, shape ``(B, L, 4)``."""
    ids = torch.zeros(length, 4, dtype=torch.long, device=device)
    ids[:, 3] = torch.arange(start, start + length, device=device)
    return ids.expand(batch, -1, -1)


