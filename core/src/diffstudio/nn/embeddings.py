"""Sinusoidal embedding of (fractional) timesteps."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, time_factor: float = 1000.0) -> Tensor:
    """Embed scalar timesteps as ``[cos, sin]`` of geometrically spaced frequencies.

    ``time_factor * t`` is multiplied by ``exp(-log(max_period) * i / (dim // 2))`` for ``i < dim // 2``;
    the cosines come first (diffusers' ``flip_sin_to_cos=True`` with zero frequency shift). Computed in
    float32 and returned in ``t``'s dtype when ``t`` is floating point.

    Args:
        t: Timesteps, shape ``(N,)``, e.g. flow-matching times in ``[0, 1]``.
        dim: Embedding width; an odd width gets one trailing zero.
        max_period: Controls the lowest frequency.
        time_factor: Scale applied to ``t`` first (1000 maps ``[0, 1]`` to the training step range).

    Returns:
        The embedding, shape ``(N, dim)``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (time_factor * t)[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    if torch.is_floating_point(t):
        emb = emb.to(t.dtype)
    return emb
