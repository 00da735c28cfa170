"""The decoders' heads: the generation adapter and the editing embedding merger, and the editing text ids.

* :class:`GenerationHead` (``generation_decoder``): ``adapter = Linear(C_vl, D_t5), LayerNorm, ReLU, Linear(D_t5,
  D_t5), LayerNorm`` turns the 81 target embeddings ``(B, 81, C_vl)`` into T5-space tokens ``(B, 81, D_t5)``
  (3584 -> 4096 in the published file; the sizes are read from the weights).
* :class:`EditingHead` (``edit_decoder``): ``embedding_merger`` = N Qwen2.5-VL decoder layers (full, non-causal
  attention with multimodal RoPE over positions scaled to a 72 x 72 grid) + a projector ``RMSNorm, Linear(C_vl,
  4 D_t5), RMSNorm, SiLU, Linear(4 D_t5, D_t5), RMSNorm`` over ``[target embeddings | reference embeddings]``.
* :func:`editing_text_ids`: the FLUX text ids of the merged tokens: target tokens ``(0, i * s_h, j * s_w)`` on
  their merged grid, reference tokens ``(1, i * s_h', j * s_w')``, where ``s = latent side / vision grid side``
  and the latent side is the VAE latent's (twice the FLUX token grid), exactly as DiffSynth computes them.

State-dict names equal the decoder files' (``adapter.0.weight``, ``embedding_merger.layers.0.self_attn.q_proj
.weight``, ...), so a head loads its part of a file by identity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffstudio.errors import ConfigError
from torch import Tensor, nn

BASE_GRID = 72
"""The merger scales every image's (h, w) positions to this grid (DiffSynth's ``base_grid``)."""
SPATIAL_MERGE = 2
"""Qwen2.5-VL merges 2 x 2 vision patches into one token."""


class GenerationHead(nn.Module):
    """The generation decoder's adapter (Linear-LN-ReLU-Linear-LN).

    Args:
        in_dim: Width of the AR model's embeddings (3584).
        out_dim: Width of the DiT's text tokens (4096).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.adapter = nn.Sequential(
            nn.Linear(in_dim, out_dim),
            nn.LayerNorm(out_dim),
            nn.ReLU(),
            nn.Linear(out_dim, out_dim),
            nn.LayerNorm(out_dim),
        )

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> GenerationHead:
        """Sizes from ``adapter.0.weight`` ``(out, in)``."""
        out_dim, in_dim = (int(s) for s in shapes["adapter.0.weight"])
        return cls(in_dim, out_dim)

    def forward(self, embeds: Tensor) -> Tensor:
        """``(B, 81, C_vl)`` target embeddings -> ``(B, 81, D_t5)`` text tokens."""
        out: Tensor = self.adapter(embeds)
        return out


class RMSNorm(nn.Module):
    """Qwen2's RMSNorm: ``weight * normalise(x in fp32)`` cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """``(..., dim) -> (..., dim)``."""
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


@dataclass(frozen=True)
class MergerParams:
    """Sizes of the embedding merger (what the weights cannot tell comes from the published config).

    Attributes:
        hidden: The AR model's width (3584).
        intermediate: The decoder layer's MLP width (18944).
        heads: Attention heads (28); the weights give only ``heads * head_dim``.
        kv_heads: Key/value heads (4).
        layers: Decoder layers (1).
        expand: The projector's hidden width (4 x 4096).
        out: Width of the DiT's text tokens (4096).
        rope_theta: RoPE base (1e6).
        mrope_section: Rotary pairs per position axis (t, h, w) ((16, 24, 24) for head dim 128).
        eps: RMSNorm epsilon (1e-6).
    """

    hidden: int = 3584
    intermediate: int = 18944
    heads: int = 28
    kv_heads: int = 4
    layers: int = 1
    expand: int = 16384
    out: int = 4096
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        """Channels per head."""
        return self.hidden // self.heads

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]], head_dim: int = 128, **given: object) -> MergerParams:
        """Sizes from the merger's weights (``embedding_merger.`` removed); heads from ``head_dim`` (128).

        ``given`` overrides any field (``ModelConfig(config={"heads": 2, "mrope_section": [2, 3, 3]})``).

        Raises:
            ConfigError: The sizes disagree (e.g. a width that ``head_dim`` does not divide).
        """
        layers = len({k.split(".")[1] for k in shapes if k.startswith("layers.")})
        hidden = int(shapes["layers.0.input_layernorm.weight"][0])
        q_rows, kv_rows = (
            int(shapes["layers.0.self_attn.q_proj.weight"][0]),
            int(shapes["layers.0.self_attn.k_proj.weight"][0]),
        )
        heads = int(given.pop("heads", q_rows // head_dim))  # type: ignore[call-overload]
        if heads <= 0 or q_rows % heads:
            raise ConfigError(
                f"embedding merger: {q_rows} query channels cannot be split into {heads} heads; pass "
                "ModelConfig(config={'heads': N}) with the merger's head count"
            )
        dim = q_rows // heads
        half = dim // 2
        section = (half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8)
        values: dict[str, object] = {
            "hidden": hidden, "intermediate": int(shapes["layers.0.mlp.gate_proj.weight"][0]), "heads": heads,
            "kv_heads": kv_rows // dim, "layers": layers, "expand": int(shapes["projector.1.weight"][0]),
            "out": int(shapes["projector.4.weight"][0]), "mrope_section": section,
        }  # fmt: skip
        for key, value in given.items():
            if key not in cls.__dataclass_fields__:
                raise ConfigError(
                    f"embedding merger config: unknown field {key!r}; known: {sorted(cls.__dataclass_fields__)}"
                )
            values[key] = tuple(value) if key == "mrope_section" else value  # type: ignore[arg-type]
        params = cls(**values)  # type: ignore[arg-type]
        if sum(params.mrope_section) * 2 != params.head_dim:
            raise ConfigError(
                f"embedding merger: mrope_section {params.mrope_section} covers {2 * sum(params.mrope_section)} of the "
                f"head's {params.head_dim} channels; pass a matching 'mrope_section'"
            )
        return params


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def mrope_cos_sin(positions: Tensor, params: MergerParams, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Multimodal RoPE tables for ``positions (3, B, L)`` (float t, h, w) -> cos, sin ``(B, 1, L, head_dim)``."""
    dim = params.head_dim
    inv = 1.0 / (params.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float().to(positions.device) / dim))
    freqs = positions.float()[..., None] * inv  # (3, B, L, dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    sections = list(params.mrope_section) * 2
    cos = torch.cat([m[i % 3] for i, m in enumerate(emb.cos().split(sections, dim=-1))], dim=-1)
    sin = torch.cat([m[i % 3] for i, m in enumerate(emb.sin().split(sections, dim=-1))], dim=-1)
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


class MergerAttention(nn.Module):
    """Qwen2.5-VL self-attention (q/k/v with bias, grouped K/V heads), full (non-causal) over the merged tokens."""

    def __init__(self, p: MergerParams) -> None:
        super().__init__()
        self.p = p
        self.q_proj = nn.Linear(p.hidden, p.heads * p.head_dim)
        self.k_proj = nn.Linear(p.hidden, p.kv_heads * p.head_dim)
        self.v_proj = nn.Linear(p.hidden, p.kv_heads * p.head_dim)
        self.o_proj = nn.Linear(p.heads * p.head_dim, p.hidden, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``(B, L, C) -> (B, L, C)`` with RoPE tables ``(B, 1, L, head_dim)``."""
        b, n, _ = x.shape
        dim = self.p.head_dim
        q = self.q_proj(x).view(b, n, -1, dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, -1, dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, -1, dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        groups = self.p.heads // self.p.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v)
        out_proj: Tensor = self.o_proj(out.transpose(1, 2).reshape(b, n, -1))
        return out_proj


class MergerMLP(nn.Module):
    """SwiGLU MLP: ``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, p: MergerParams) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(p.hidden, p.intermediate, bias=False)
        self.up_proj = nn.Linear(p.hidden, p.intermediate, bias=False)
        self.down_proj = nn.Linear(p.intermediate, p.hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, L, C) -> (B, L, C)``."""
        out: Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


class MergerLayer(nn.Module):
    """One pre-norm Qwen2.5-VL decoder layer (attention + MLP, residual around each)."""

    def __init__(self, p: MergerParams) -> None:
        super().__init__()
        self.self_attn = MergerAttention(p)
        self.mlp = MergerMLP(p)
        self.input_layernorm = RMSNorm(p.hidden, p.eps)
        self.post_attention_layernorm = RMSNorm(p.hidden, p.eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``(B, L, C) -> (B, L, C)``."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


def merger_positions(grid_thw: Sequence[int], batch: int, device: torch.device | str = "cpu") -> Tensor:
    """RoPE positions ``(3, B, L)`` of one image's merged tokens, (h, w) scaled to the 72 x 72 base grid.

    Args:
        grid_thw: The image's vision grid ``(t, h, w)`` in patches (before the 2 x 2 merge), e.g. ``(1, 18, 18)``.
        batch: Batch size.
        device: Where to build them.
    """
    t, h, w = (int(v) for v in grid_thw)
    gh, gw = h // SPATIAL_MERGE, w // SPATIAL_MERGE
    t_index = (torch.arange(t, device=device) * 2).repeat_interleave(gh * gw).float()  # tokens_per_second = 2
    h_index = torch.arange(gh, device=device).view(1, -1, 1).expand(t, -1, gw).flatten() * (BASE_GRID / h)
    w_index = torch.arange(gw, device=device).view(1, 1, -1).expand(t, gh, -1).flatten() * (BASE_GRID / w)
    return torch.stack([t_index, h_index, w_index])[:, None].expand(3, batch, -1)


class EmbeddingMerger(nn.Module):
    """Decoder layers + projector over ``[target | reference]`` embeddings (DiffSynth's ``embedding_merger``)."""

    def __init__(self, p: MergerParams) -> None:
        super().__init__()
        self.params = p
        self.layers = nn.ModuleList([MergerLayer(p) for _ in range(p.layers)])
        self.projector = nn.Sequential(
            RMSNorm(p.hidden, p.eps), nn.Linear(p.hidden, p.expand), RMSNorm(p.expand, p.eps), nn.SiLU(),
            nn.Linear(p.expand, p.out), RMSNorm(p.out, p.eps),
        )  # fmt: skip

    def forward(
        self,
        embeds: Tensor,
        grid: Sequence[int],
        ref_embeds: Tensor | None = None,
        ref_grid: Sequence[int] | None = None,
    ) -> Tensor:
        """Merge target (and reference) embeddings into DiT text tokens.

        Args:
            embeds: Target embeddings ``(B, 81, C_vl)``.
            grid: Their vision grid ``(1, 18, 18)``.
            ref_embeds: Reference-image embeddings ``(B, N_ref, C_vl)`` or None.
            ref_grid: Their vision grid ``(1, h, w)`` (``N_ref = h * w / 4``).

        Returns:
            ``(B, 81 [+ N_ref], D_t5)``.
        """
        positions = merger_positions(grid, embeds.shape[0], embeds.device)
        hidden = embeds
        if ref_embeds is not None:
            if ref_grid is None:
                raise ValueError("ref_embeds need their ref_grid")
            positions = torch.cat([positions, merger_positions(ref_grid, embeds.shape[0], embeds.device)], dim=-1)
            hidden = torch.cat([embeds, ref_embeds.to(embeds)], dim=1)
        cos, sin = mrope_cos_sin(positions, self.params, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin)
        out: Tensor = self.projector(hidden)
        return out


class EditingHead(nn.Module):
    """The editing decoder's head: ``embedding_merger`` (keys as in ``edit_decoder.bin``)."""

    def __init__(self, p: MergerParams) -> None:
        super().__init__()
        self.embedding_merger = EmbeddingMerger(p)

    def forward(
        self,
        embeds: Tensor,
        grid: Sequence[int],
        ref_embeds: Tensor | None = None,
        ref_grid: Sequence[int] | None = None,
    ) -> Tensor:
        """See :meth:`EmbeddingMerger.forward`."""
        out: Tensor = self.embedding_merger(embeds, grid, ref_embeds, ref_grid)
        return out


def _grid_ids(rows: int, cols: int, scale_h: float, scale_w: float, t: float) -> Tensor:
    ids = torch.zeros(rows, cols, 3)
    ids[..., 0] = t
    ids[..., 1] = torch.arange(rows)[:, None] * scale_h
    ids[..., 2] = torch.arange(cols)[None, :] * scale_w
    return ids.reshape(rows * cols, 3)


def editing_text_ids(
    latent_hw: tuple[int, int], grid: Sequence[int], ref_grid: Sequence[int] | None, batch: int
) -> Tensor:
    """FLUX text ids ``(B, 81 [+ N_ref], 3)`` of the merged tokens (float: the positions are not integers).

    Args:
        latent_hw: The VAE latent's (height, width), ``H / 8, W / 8`` (twice the FLUX token grid).
        grid: The target's vision grid ``(1, 18, 18)`` -> a 9 x 9 token grid.
        ref_grid: The reference's vision grid ``(1, h, w)`` -> ``h/2 x w/2`` tokens with ``t = 1``, or None.
        batch: Batch size.
    """
    lat_h, lat_w = latent_hw
    _, h, w = (int(v) for v in grid)
    parts = [_grid_ids(h // 2, w // 2, lat_h / h, lat_w / w, 0.0)]
    if ref_grid is not None:
        _, rh, rw = (int(v) for v in ref_grid)
        parts.append(_grid_ids(rh // 2, rw // 2, lat_h / rh, lat_w / rw, 1.0))
    return torch.cat(parts)[None].expand(batch, -1, -1).contiguous()
