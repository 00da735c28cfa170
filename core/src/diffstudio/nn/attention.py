"""Attention dispatch in the ``(B, L, H, D)`` layout ("b l h d": batch, tokens, heads, head dim)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Scaled dot-product attention over tokens, heads kept apart.

    Args:
        q: Queries, shape ``(B, Lq, H, D)``.
        k: Keys, shape ``(B, Lk, H, D)``.
        v: Values, shape ``(B, Lk, H, Dv)``.
        mask: Optional boolean (True = attend) or additive float mask broadcastable to ``(B, H, Lq, Lk)``.
        scale: Softmax scale; ``D ** -0.5`` when None.

    Returns:
        The attended values, shape ``(B, Lq, H, Dv)``.
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )  # (B, H, Lq, Dv)
    return out.transpose(1, 2)


class SDPAProcessor:
    """The default attention processor: plain SDPA that ignores the call's context.

    Model families route each block's attention through a replaceable processor object called as
    ``processor(q, k, v, context)`` with ``(B, L, H, D)`` tensors; the context is family-specific and this
    default does not look at it.
    """

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, context: object = None) -> Tensor:
        """Return ``attention(q, k, v)``, shape ``(B, Lq, H, Dv)``."""
        return attention(q, k, v)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
