"""Step1X-Edit's connector (``Qwen2Connector``): Qwen2.5-VL states + timestep -> FLUX text stream and pooled vector.

Per DiT call: ``x (B, L, C_llm)`` (the LLM's last hidden states, ``L = 640``, ``C_llm = 3584``) with its 0/1 mask
``(B, L)`` and the flow time ``t (B,)`` give

* ``txt (B, L, D_txt)``: ``input_embedder(x)`` refined by a 2-block token refiner conditioned on
  ``c = t_embedder(t * timestep_scale) + c_embedder(masked_mean(x))`` (``D_txt = 4096``, 32 heads);
* ``y (B, 768)``: ``global_proj_out(masked_mean(x) * (1 + scale_factor))``.

Refiner block (gate-only adaLN, no shift/scale): ``g_attn, g_mlp = adaLN_modulation(c)``;
``x += g_attn * proj(attn(norm1(x)))``; ``x += g_mlp * mlp(norm2(x))``. The attention mask of sequence ``b`` is
``mask_i & mask_j`` with column 0 forced True (so fully masked rows stay finite). LayerNorms have eps 1e-6 and
affine weights; the timestep embedding is the 256-channel sinusoid ``[cos, sin]`` (max period 10000).

State-dict names equal the published ``connector.*`` keys without the prefix (``S.input_embedder``,
``S.t_embedder.mlp.{0,2}``, ``S.c_embedder.linear_{1,2}``, ``S.individual_token_refiner.blocks.{i}.{norm1,
self_attn_qkv, self_attn_proj, norm2, mlp.fc1, mlp.fc2, adaLN_modulation.1}``, ``global_proj_out``,
``scale_factor``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffstudio.nn import DeltaLinear
from torch import Tensor, nn

__all__ = ["ConnectorParams", "Qwen2Connector", "timestep_embedding"]

FREQUENCY_CHANNELS = 256


@dataclass(frozen=True)
class ConnectorParams:
    """Sizes of the connector (published: 3584 -> 4096, 32 heads, 2 blocks, MLP x4, pooled 768).

    Attributes:
        in_channels: Width of the LLM hidden states.
        hidden_size: Width of the text tokens it produces (the DiT's ``context_in_dim``).
        num_heads: Refiner attention heads.
        depth: Refiner blocks.
        mlp_ratio: Refiner MLP width over ``hidden_size``.
        pooled_dim: Width of ``y`` (the DiT's ``vec_in_dim``).
        timestep_scale: Factor on ``t in [0, 1]`` before the sinusoid: 1 (the initial release and DiffSynth,
            the default) or 1000 (Step1X-Edit after its 2025-05 "fix the times embedding bug" change).
    """

    in_channels: int = 3584
    hidden_size: int = 4096
    num_heads: int = 32
    depth: int = 2
    mlp_ratio: float = 4.0
    pooled_dim: int = 768
    timestep_scale: float = 1.0


def timestep_embedding(t: Tensor, dim: int = FREQUENCY_CHANNELS, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]`` of ``t (B,)`` -> ``(B, dim)`` float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = DeltaLinear(width, hidden)
        self.fc2 = DeltaLinear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1(x)))  # type: ignore[no-any-return]


class _TimestepEmbedder(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(DeltaLinear(FREQUENCY_CHANNELS, width), nn.SiLU(), DeltaLinear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        weight = self.mlp[0].weight
        return self.mlp(timestep_embedding(t).to(weight.dtype))  # type: ignore[no-any-return]


class _TextProjection(nn.Module):
    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.linear_1 = DeltaLinear(in_channels, width)
        self.linear_2 = DeltaLinear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))  # type: ignore[no-any-return]


class RefinerBlock(nn.Module):
    """One token-refiner block (self-attention + MLP, each behind an adaLN gate)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.self_attn_qkv = DeltaLinear(width, 3 * width)
        self.self_attn_proj = DeltaLinear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = _Mlp(width, int(width * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), DeltaLinear(width, 2 * width))

    def forward(self, x: Tensor, c: Tensor, mask: Tensor | None) -> Tensor:
        """``x (B, L, D)``, ``c (B, D)``, boolean ``mask (B, 1, L, L)`` or None -> ``(B, L, D)``."""
        gate_attn, gate_mlp = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        b, n, d = x.shape
        q, k, v = self.self_attn_qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, d)
        x = x + gate_attn * self.self_attn_proj(attn)
        return x + gate_mlp * self.mlp(self.norm2(x))  # type: ignore[no-any-return]


class _Refiner(nn.Module):
    def __init__(self, width: int, heads: int, depth: int, mlp_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([RefinerBlock(width, heads, mlp_ratio) for _ in range(depth)])

    def forward(self, x: Tensor, c: Tensor, mask: Tensor | None) -> Tensor:
        attn_mask = None
        if mask is not None:
            keep = mask.bool()
            attn_mask = (keep[:, None, None, :] & keep[:, None, :, None]).clone()
            attn_mask[..., 0] = True
        for block in self.blocks:
            x = block(x, c, attn_mask)
        return x


class _SingleTokenRefiner(nn.Module):
    def __init__(self, p: ConnectorParams) -> None:
        super().__init__()
        self.input_embedder = DeltaLinear(p.in_channels, p.hidden_size)
        self.t_embedder = _TimestepEmbedder(p.hidden_size)
        self.c_embedder = _TextProjection(p.in_channels, p.hidden_size)
        self.individual_token_refiner = _Refiner(p.hidden_size, p.num_heads, p.depth, p.mlp_ratio)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x (B, L, C)`` over the tokens where ``mask (B, L)`` is 1 -> ``(B, C)``."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1)


class Qwen2Connector(nn.Module):
    """The connector (see the module docstring); ``forward(x, t, mask) -> (txt, y)``."""

    def __init__(self, params: ConnectorParams) -> None:
        super().__init__()
        self.params = params
        self.S = _SingleTokenRefiner(params)
        self.global_proj_out = DeltaLinear(params.in_channels, params.pooled_dim)
        self.scale_factor = nn.Parameter(torch.full((1,), -0.91))

    def forward(self, x: Tensor, t: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``x (B, L, C_llm)``, ``t (B,)`` in [0, 1], ``mask (B, L)`` -> ``txt (B, L, D)``, ``y (B, 768)``."""
        pooled = masked_mean(x, mask)
        y = self.global_proj_out(pooled * (1 + self.scale_factor))
        s = self.S
        c = s.t_embedder(t * self.params.timestep_scale) + s.c_embedder(pooled)
        txt = s.individual_token_refiner(s.input_embedder(x), c, mask)
        return txt, y

    @classmethod
    def params_from_shapes(cls, shapes: dict[str, tuple[int, ...]], timestep_scale: float = 1.0) -> ConnectorParams:
        """Sizes from the connector's tensor shapes (names without ``connector.``); heads are 128 wide as published."""
        hidden, in_channels = shapes["S.input_embedder.weight"]
        depth = len({k.split(".")[3] for k in shapes if k.startswith("S.individual_token_refiner.blocks.")})
        mlp = shapes["S.individual_token_refiner.blocks.0.mlp.fc1.weight"][0]
        heads = max(1, hidden // 128)
        return ConnectorParams(in_channels, hidden, heads, depth, mlp / hidden, shapes["global_proj_out.weight"][0],
                               timestep_scale)  # fmt: skip
