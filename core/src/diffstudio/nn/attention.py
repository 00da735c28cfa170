"""Attention in the ``(B, L, H, D)`` layout ("b l h d": batch, tokens, heads, head dim) and the processor slot.

:class:`AttentionContext` and :class:`AttentionProcessor` are the attention slot the FLUX families' blocks share;
:func:`extend_kv` appends the K/V-cache medium's tokens after RoPE.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

BlockKind = Literal["double", "single"]
"""A joint-attention block kind: ``double`` (separate text and image weights) or ``single`` (one stream)."""


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


@dataclass(frozen=True)
class AttentionContext:
    """What an attention processor is told besides q, k and v.

    The query sequence is ``[txt_len text tokens | img_len target-image tokens | ref_len extra image tokens]``
    (double and single blocks alike); keys/values are the same tokens followed by ``kv_len`` extension tokens.

    Attributes:
        kind: ``"double"`` or ``"single"``.
        index: Block index within its kind.
        txt_len: Text tokens, including appended extra text tokens.
        img_len: Target-image tokens (the ones whose output the DiT returns).
        ref_len: Extra image tokens after the target image (FLUX.1 Kontext, FLUX.2 reference/edit images).
        kv_len: K/V extension tokens appended after the keys/values of the sequence.
        extras: The ``attention_kwargs`` mapping given to the DiT's forward (e.g. masks), shared by all
            blocks.
    """

    kind: BlockKind
    index: int
    txt_len: int
    img_len: int
    ref_len: int = 0
    kv_len: int = 0
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def img_slice(self) -> slice:
        """Positions of the target-image tokens in the query sequence."""
        return slice(self.txt_len, self.txt_len + self.img_len)


class AttentionProcessor(Protocol):
    """The attention slot of a block: ``processor(q, k, v, context) -> out``.

    ``q`` is ``(B, Lq, H, Dh)``, ``k``/``v`` are ``(B, Lk, H, Dh)`` with ``Lk = Lq + context.kv_len``; q and k
    are QK-normed and rotated (RoPE). Returns ``(B, Lq, H, Dh)``. Processors are plain objects (not
    submodules), so they never change the DiT's state dict; one that owns weights moves them itself.
    """

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, context: AttentionContext) -> Tensor:
        """Attend ``q`` over ``k``/``v``; ``(B, Lq, H, Dh)`` out."""
        ...


DEFAULT_PROCESSOR: AttentionProcessor = SDPAProcessor()
"""The processor every block starts with (plain SDPA)."""


def match_batch(t: Tensor, batch: int, what: str) -> Tensor:
    """Expand a batch-1 tensor to ``batch`` rows; other mismatches are an error naming ``what``."""
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ValueError(f"{what} has batch size {t.shape[0]}, expected 1 or {batch}")


def extend_kv(k: Tensor, v: Tensor, extra: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """Append extension keys/values along tokens (the KV-cache medium's ``(K, V)`` per block).

    Args:
        k: Keys ``(B, L, H, Dh)`` after RoPE.
        v: Values ``(B, L, H, Dh)``.
        extra: ``(K_ext, V_ext)``, each ``(B or 1, L_ext, H, Dh)``, or None.

    Returns:
        Keys and values ``(B, L + L_ext, H, Dh)`` (unchanged when ``extra`` is None).

    Raises:
        ValueError: the extension's heads, head size or token counts do not fit, or its batch is not 1 or B.
    """
    if extra is None:
        return k, v
    k_ext, v_ext = extra
    if k_ext.shape[2:] != k.shape[2:] or v_ext.shape[2:] != v.shape[2:] or k_ext.shape[1] != v_ext.shape[1]:
        raise ValueError(
            f"K/V extension shapes {tuple(k_ext.shape)} / {tuple(v_ext.shape)} do not fit keys "
            f"{tuple(k.shape)} (expected (B, L_extra, {k.shape[2]}, {k.shape[3]}))"
        )
    batch = k.shape[0]
    k_ext = match_batch(k_ext, batch, "K extension").to(k.dtype)
    v_ext = match_batch(v_ext, batch, "V extension").to(v.dtype)
    return torch.cat([k, k_ext], dim=1), torch.cat([v, v_ext], dim=1)


def merge_kv(
    first: Mapping[str, tuple[Tensor, Tensor]] | None,
    second: Mapping[str, tuple[Tensor, Tensor]] | None,
) -> dict[str, tuple[Tensor, Tensor]] | None:
    """Concatenate two per-block K/V extensions ``{block: (K, V)}`` along tokens (what :func:`extend_kv` appends).

    Blocks only one side names keep that side's pair; a block both name gets the first's tokens, then the
    second's (cast to the first's dtype and device), with batch-1 entries expanded to the larger batch.

    Returns:
        The merged mapping, or None when both are empty or None.
    """
    if not first or not second:
        merged = dict(first or second or {})
        return merged or None
    out = dict(first)
    for name, (k2, v2) in second.items():
        if name not in out:
            out[name] = (k2, v2)
            continue
        k1, v1 = out[name]
        batch = max(k1.shape[0], k2.shape[0])
        out[name] = (
            torch.cat([k1.expand(batch, -1, -1, -1), k2.to(k1).expand(batch, -1, -1, -1)], dim=1),
            torch.cat([v1.expand(batch, -1, -1, -1), v2.to(v1).expand(batch, -1, -1, -1)], dim=1),
        )
    return out
