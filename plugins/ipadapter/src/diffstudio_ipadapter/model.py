"""IP-Adapter weights for FLUX.1: the image projection and the per-block K/V projections.

Two published kinds, told apart by their keys:

* **InstantX** FLUX.1-dev-IP-Adapter: ``image_proj`` is an MLP (``proj.0``: E -> 2E, GELU, ``proj.2``: 2E -> T*C,
  ``norm``: LayerNorm(C)) from the SigLIP pooled embedding (E = 1152) to T = 128 tokens of width C (4096);
  ``ip_adapter.{i}.to_k_ip`` / ``to_v_ip`` (C -> D, no bias) for all 57 blocks (19 double, then 38 single).
  Keys are RMS-normalised per head (no gain, eps 1e-5).
* **XLabs** flux-ip-adapter (what diffusers' ``FluxPipeline.load_ip_adapter`` reads): ``ip_adapter_proj_model``
  is ``proj`` (E -> T*C) + ``norm`` from the CLIP-L image embedding (E = 768) to T = 4 tokens (16 when
  ``proj`` has 65536 rows); ``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj`` (C -> D, with
  bias) for the double blocks only.

The module keeps the published names, so both files load by identity.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

Kind = Literal["instantx", "xlabs"]


class _KV(nn.Module):
    def __init__(self, context: int, hidden: int, bias: bool, names: tuple[str, str]) -> None:
        super().__init__()
        self.names = names
        for name in names:
            self.add_module(name, nn.Linear(context, hidden, bias=bias))

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, T, C)`` image tokens -> K, V ``(B, T, D)``."""
        k_proj, v_proj = (getattr(self, n) for n in self.names)
        return k_proj(tokens), v_proj(tokens)


class _XLabsBlock(nn.Module):
    def __init__(self, context: int, hidden: int) -> None:
        super().__init__()
        self.processor = _KV(
            context, hidden, True, ("ip_adapter_double_stream_k_proj", "ip_adapter_double_stream_v_proj")
        )


class _MLPProj(nn.Module):
    """InstantX: ``E -> 2E -> T*C``, LayerNorm over C."""

    def __init__(self, embed: int, context: int, tokens: int) -> None:
        super().__init__()
        self.tokens, self.context = tokens, context
        self.proj = nn.Sequential(nn.Linear(embed, 2 * embed), nn.GELU(), nn.Linear(2 * embed, tokens * context))
        self.norm = nn.LayerNorm(context)

    def forward(self, embeds: Tensor) -> Tensor:
        """``(B, E) -> (B, T, C)``."""
        return self.norm(self.proj(embeds).reshape(-1, self.tokens, self.context))


class _LinearProj(nn.Module):
    """XLabs: ``E -> T*C``, LayerNorm over C."""

    def __init__(self, embed: int, context: int, tokens: int) -> None:
        super().__init__()
        self.tokens, self.context = tokens, context
        self.proj = nn.Linear(embed, tokens * context)
        self.norm = nn.LayerNorm(context)

    def forward(self, embeds: Tensor) -> Tensor:
        """``(B, E) -> (B, T, C)``."""
        return self.norm(self.proj(embeds).reshape(-1, self.tokens, self.context))


class FluxIPAdapter(nn.Module):
    """The weights of one IP-Adapter (see the module docstring).

    Args:
        kind: ``"instantx"`` or ``"xlabs"``.
        embed_dim: Image-embedding width E.
        context_dim: Image-token width C (the T5 width).
        hidden: DiT width D.
        tokens: Image tokens T.
        blocks: Adapter blocks (57 for InstantX on FLUX.1-dev, the double-block count for XLabs).
    """

    memory_leaves: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.LayerNorm)
    keep_in_high_precision: ClassVar[tuple[str, ...]] = ("*norm*",)

    def __init__(self, kind: Kind, embed_dim: int, context_dim: int, hidden: int, tokens: int, blocks: int) -> None:
        super().__init__()
        self.kind: Kind = kind
        self.num_blocks = blocks
        if kind == "instantx":
            self.image_proj: nn.Module = _MLPProj(embed_dim, context_dim, tokens)
            self.ip_adapter = nn.ModuleList(
                [_KV(context_dim, hidden, False, ("to_k_ip", "to_v_ip")) for _ in range(blocks)]
            )
        else:
            self.ip_adapter_proj_model: nn.Module = _LinearProj(embed_dim, context_dim, tokens)
            self.double_blocks = nn.ModuleList([_XLabsBlock(context_dim, hidden) for _ in range(blocks)])

    def image_tokens(self, embeds: Tensor) -> Tensor:
        """Image embeddings ``(B, E)`` -> image tokens ``(B, T, C)``."""
        proj = self.image_proj if self.kind == "instantx" else self.ip_adapter_proj_model
        out: Tensor = proj(embeds)
        return out

    def block_kv(self, tokens: Tensor, heads: int) -> list[tuple[Tensor, Tensor]]:
        """Per adapter block ``(K, V)``, each ``(B, T, H, Dh)``; InstantX keys RMS-normalised per head."""
        layers = self.ip_adapter if self.kind == "instantx" else [b.processor for b in self.double_blocks]
        out = []
        for layer in layers:
            k, v = layer(tokens)
            k, v = k.unflatten(-1, (heads, -1)), v.unflatten(-1, (heads, -1))
            if self.kind == "instantx":
                k = (k.float() * torch.rsqrt(k.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(v.dtype)
            out.append((k, v))
        return out
