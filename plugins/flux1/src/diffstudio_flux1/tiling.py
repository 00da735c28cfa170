"""Tiled application of a spatial function (VAE encode/decode of large images in bounded memory).

The input ``(B, C, H, W)`` is cut into ``tile x tile`` windows whose origins are ``stride`` apart (the last
window of a row/column is moved back so that it ends at the border). Each window goes through ``fn`` on its
own; the outputs are blended with weights that ramp linearly across every overlap (full weight at image
borders), so seams disappear. A window larger than the input reduces to one call, equal to ``fn(x)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Window origins along one axis of ``size`` pixels (``[0]`` when one window covers it)."""
    if tile >= size:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def _ramp(length: int, overlap: int, at_start: bool, at_end: bool, device: torch.device) -> Tensor:
    """1-D blending weights of one window: linear ramps of ``overlap`` pixels on inner edges."""
    weight = torch.ones(length, device=device)
    if overlap <= 0:
        return weight
    ramp = (torch.arange(overlap, device=device, dtype=torch.float32) + 1) / (overlap + 1)
    if not at_start:
        weight[:overlap] = torch.minimum(weight[:overlap], ramp)
    if not at_end:
        weight[-overlap:] = torch.minimum(weight[-overlap:], ramp.flip(0))
    return weight


def tiled_apply(fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, stride: int, factor: float) -> Tensor:
    """Apply ``fn`` to overlapping windows of ``x`` and blend the results.

    Args:
        fn: Maps ``(B, C, h, w)`` to ``(B, C_out, h * factor, w * factor)``.
        x: Input ``(B, C, H, W)``.
        tile: Window side in input pixels.
        stride: Distance between window origins in input pixels (``0 < stride <= tile``).
        factor: Output pixels per input pixel (8 for decoding, 1/8 for encoding).

    Returns:
        ``(B, C_out, H * factor, W * factor)``.

    Raises:
        ValueError: ``tile``/``stride`` are not positive or ``stride > tile``.
    """
    if tile <= 0 or stride <= 0 or stride > tile:
        raise ValueError(f"tile_size {tile} and tile_stride {stride} must be positive with stride <= size")
    height, width = x.shape[2], x.shape[3]
    rows, cols = tile_starts(height, tile, stride), tile_starts(width, tile, stride)
    if len(rows) == 1 and len(cols) == 1:
        return fn(x)
    out: Tensor | None = None
    total: Tensor | None = None
    overlap = round((tile - stride) * factor)
    for top in rows:
        for left in cols:
            piece = fn(x[:, :, top : top + tile, left : left + tile])
            if out is None or total is None:
                shape = (piece.shape[0], piece.shape[1], round(height * factor), round(width * factor))
                out = torch.zeros(shape, device=piece.device, dtype=torch.float32)
                total = torch.zeros(shape[2:], device=piece.device, dtype=torch.float32)
            h, w = piece.shape[2], piece.shape[3]
            o_top, o_left = round(top * factor), round(left * factor)
            wy = _ramp(h, overlap, top == 0, top + tile >= height, piece.device)
            wx = _ramp(w, overlap, left == 0, left + tile >= width, piece.device)
            weight = wy[:, None] * wx[None, :]  # (h, w)
            out[:, :, o_top : o_top + h, o_left : o_left + w] += piece.float() * weight
            total[o_top : o_top + h, o_left : o_left + w] += weight
    assert out is not None and total is not None
    return (out / total).to(x.dtype)
