"""EliGen's regional attention mask and the processor that applies it.

The joint sequence of every FLUX.1 block is ``[global text | entity_1 | ... | entity_N | image | reference]``
(the entity prompts enter as extra text tokens, after the global prompt and any other extra text tokens). The
additive mask ``(B, 1, L, L)`` is 0 where attention is allowed and ``-inf`` where it is not:

* entity ``i``'s tokens and the image tokens inside mask ``i`` see each other;
* entity ``i``'s tokens do not see entity ``j``'s (``j != i``), nor image tokens outside mask ``i``;
* image tokens outside mask ``i`` do not see entity ``i``;
* the global prompt (and any other text before the entities) sees everything and is seen by everything;
* image-image and reference-image attention is unrestricted; reference tokens see no entity and no entity sees them.

The same mask serves double and single blocks (their sequences are laid out alike).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffstudio.nn import AttentionContext, attention
from torch import Tensor

MASK_KEY = "eligen_attention_mask"


def regional_mask(
    global_len: int, entity_lens: Sequence[int], regions: Tensor, ref_len: int = 0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Build the additive mask.

    Args:
        global_len: Text tokens before the entities (the global prompt and other extra text).
        entity_lens: Tokens of each entity prompt.
        regions: ``(B, N, L_img)`` booleans, True where image token ``p`` is inside entity ``i``'s mask.
        ref_len: Reference (Kontext) image tokens after the target image.
        dtype: Dtype of the result.

    Returns:
        ``(B, 1, L, L)`` with ``L = global_len + sum(entity_lens) + L_img + ref_len``: 0 allowed, -inf blocked.
    """
    batch, count, img_len = regions.shape
    if count != len(entity_lens):
        raise ValueError(f"{count} entity regions for {len(entity_lens)} entity prompts")
    text_len = global_len + sum(entity_lens)
    total = text_len + img_len + ref_len
    allowed = torch.ones(batch, total, total, dtype=torch.bool, device=regions.device)
    img = slice(text_len, text_len + img_len)
    starts = [global_len + sum(entity_lens[:i]) for i in range(count)]
    spans = [slice(s, s + n) for s, n in zip(starts, entity_lens)]
    for i, span in enumerate(spans):
        allowed[:, span, global_len:] = False  # entity i sees no entity and no image token ...
        allowed[:, global_len:, span] = False  # ... and nothing but the global text sees it ...
        allowed[:, span, span] = True  # ... except itself
        inside = regions[:, i]  # (B, L_img)
        allowed[:, span, img] = inside[:, None, :]  # ... and the image tokens inside its mask, both ways
        allowed[:, img, span] = inside[:, :, None]
    mask = torch.zeros(batch, 1, total, total, dtype=dtype, device=regions.device)
    return mask.masked_fill(~allowed[:, None], float("-inf"))


class RegionalAttentionProcessor:
    """SDPA with EliGen's mask from ``context.extras[MASK_KEY]`` (plain SDPA when it is absent).

    K/V-extension tokens appended after the sequence (``context.kv_len``) are visible to every query.
    """

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, context: AttentionContext) -> Tensor:
        """Masked attention ``(B, Lq, H, Dh)``."""
        mask = context.extras.get(MASK_KEY)
        if mask is None:
            return attention(q, k, v)
        if mask.shape[-1] != q.shape[1]:
            raise ValueError(
                f"the EliGen mask covers {mask.shape[-1]} tokens but block {context.kind}_{context.index} attends "
                f"over {q.shape[1]}; other adapters changed the sequence after the mask was built"
            )
        if context.kv_len:
            mask = torch.nn.functional.pad(mask, (0, context.kv_len))
        return attention(q, k, v, mask=mask.to(q.device, q.dtype))
