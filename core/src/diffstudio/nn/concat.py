"""``merge_heads_beside``: the input of a single-stream block's output projection, built with one copy.

FLUX's single-stream blocks feed ``linear2`` with ``cat(merge_heads(attention), activation(mlp))``. Written that
way the attention output is copied twice (the head merge, then the concatenation) and the activation once more.
:func:`merge_heads_beside` allocates the ``(B, L, H*D + width)`` result once, copies the attention heads into its
front and lets the activation write straight into its back (``out=``). On the FLUX.2 medium benchmark (1536
tokens, 10 single blocks) that removes 25 MB of copies per block.

With autograd recording, ``out=`` is not allowed, so the function falls back to the plain concatenation.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

__all__ = ["OutActivation", "merge_heads_beside"]


class OutActivation(Protocol):
    """An activation ``fn(x, out=None) -> Tensor`` that can write its result into ``out``."""

    def __call__(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """Return the activation of ``x``, written into ``out`` when it is given."""
        ...


def merge_heads_beside(attn: Tensor, mlp: Tensor, activation: OutActivation, width: int) -> Tensor:
    """Return ``torch.cat((attn.flatten(-2), activation(mlp)), dim=-1)``.

    Args:
        attn: Attention output ``(B, L, H, D)`` (any strides).
        mlp: The MLP pre-activation ``(B, L, M)``.
        activation: Maps ``(B, L, M)`` to ``(B, L, width)``, honouring ``out=``.
        width: The activation's output width.

    Returns:
        ``(B, L, H * D + width)``, contiguous.
    """
    b, length, heads, dim = attn.shape
    if torch.is_grad_enabled() and (attn.requires_grad or mlp.requires_grad):
        return torch.cat((attn.reshape(b, length, heads * dim), activation(mlp)), dim=-1)
    out = torch.empty((b, length, heads * dim + width), dtype=attn.dtype, device=attn.device)
    out[..., : heads * dim].view(b, length, heads, dim).copy_(attn)
    activation(mlp, out=out[..., heads * dim :])
    return out
