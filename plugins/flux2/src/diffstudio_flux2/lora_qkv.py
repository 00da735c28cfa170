"""Exact conversion between a LoRA of a fused projection (q/k/v stacked on the output axis) and LoRAs of its parts.

diffusers splits the fused q/k/v layers of the FLUX.2 double blocks into ``to_q/to_k/to_v`` (image stream) and
``add_{q,k,v}_proj`` (text stream); BFL, ComfyUI and kohya keep them fused. Both directions are exact: the dense
update ``factor * up @ down`` of every output slice is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffstudio.lora import LoraWeights

__all__ = ["fuse_lora_parts", "split_lora_parts"]


def fuse_lora_parts(parts: Sequence[LoraWeights | None]) -> LoraWeights:
    """Fuse LoRAs of equally sized output slices (e.g. q, k, v) into one LoRA of the fused layer, exactly.

    Args:
        parts: One pair per slice, ``down (r_i, in)`` and ``up (out, r_i)``, or None for a slice without LoRA.

    Returns:
        ``down (R, in)`` (the parts' rows stacked, ``R = sum r_i``) and block-diagonal ``up (n * out, R)``. When
        every part has the same factor ``alpha_i / r_i`` it is kept (``alpha = factor * R``); otherwise each
        factor is folded into its block of ``up`` and the result's factor is 1.

    Raises:
        ValueError: No part is given, or the parts' feature sizes differ.
    """
    present = [(slot, w) for slot, w in enumerate(parts) if w is not None]
    if not present:
        raise ValueError("no part has a LoRA")
    ins = {int(w.down.shape[1]) for _, w in present}
    outs = {int(w.up.shape[0]) for _, w in present}
    if len(ins) != 1 or len(outs) != 1:
        raise ValueError(f"parts map {sorted(ins)} -> {sorted(outs)} features; they must all be equal")
    out = outs.pop()
    dtype = present[0][1].down.dtype
    for _, w in present:
        dtype = torch.promote_types(dtype, torch.promote_types(w.down.dtype, w.up.dtype))
    factors = {w.factor for _, w in present}
    common = len(factors) == 1
    total = sum(w.rank for _, w in present)
    down = torch.cat([w.down.to(dtype) for _, w in present], dim=0)
    up = torch.zeros(len(parts) * out, total, dtype=dtype, device=down.device)
    column = 0
    for slot, w in present:
        block = w.up if common else w.up.float() * w.factor
        up[slot * out : (slot + 1) * out, column : column + w.rank] = block.to(dtype)
        column += w.rank
    alpha = None
    if common and any(w.alpha is not None for _, w in present):
        alpha = factors.pop() * total  # rank and alpha scaled together: same factor
    return LoraWeights(down, up, alpha)


def split_lora_parts(weights: LoraWeights, count: int = 3) -> list[LoraWeights | None]:
    """Split a LoRA of a fused layer into LoRAs of its ``count`` equal output slices, exactly.

    When every rank column of ``up`` feeds a single slice (block-diagonal ``up``, as :func:`fuse_lora_parts`
    makes), each slice gets only its own columns; otherwise every slice gets the whole ``down`` and its rows of
    ``up``. A slice whose rows of ``up`` are all zero gets None. Factors are preserved.

    Raises:
        ValueError: The output size is not a multiple of ``count``.
    """
    out_features, rank = weights.up.shape
    if out_features % count:
        raise ValueError(f"up has {out_features} rows, not a multiple of {count}")
    blocks = weights.up.reshape(count, out_features // count, rank)
    used = blocks.ne(0).any(dim=1)  # (count, rank): columns each slice uses
    compact = bool((used.sum(dim=0) <= 1).all())
    result: list[LoraWeights | None] = []
    for slot in range(count):
        if not bool(used[slot].any()):
            result.append(None)
            continue
        if not compact:
            result.append(LoraWeights(weights.down, blocks[slot], weights.alpha))
            continue
        columns = used[slot].nonzero().flatten()
        alpha = None if weights.alpha is None else weights.factor * len(columns)
        result.append(LoraWeights(weights.down[columns], blocks[slot][:, columns], alpha))
    return result
