"""InfiniteYou's image projector: the IP-Adapter-Plus Resampler that turns a face embedding into identity tokens.

A perceiver: ``num_queries`` learned latents attend (with LayerNorms on both sides) to the projected face embedding
concatenated with themselves, each layer followed by a LayerNorm-GELU MLP, both residual; then a projection to the
text width and a LayerNorm. The published model (``image_proj_model.bin``) has width 1280, 4 layers of 20 heads of
64, 8 queries, a 512-d input (ArcFace) and a 4096-d output (T5's width, the InfuseNet's text input).

State-dict names are the published ones: ``latents``, ``proj_in``, ``layers.{i}.0.{norm1, norm2, to_q, to_kv,
to_out}``, ``layers.{i}.1.{0, 1, 3}`` (LayerNorm, up, down), ``proj_out``, ``norm_out``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import torch
from diffstudio.errors import CheckpointError
from torch import Tensor, nn

DIM_HEAD = 64
"""Channels per attention head of the published projector (not recorded in the weights)."""


@dataclass(frozen=True)
class ResamplerParams:
    """Sizes of the projector.

    Attributes:
        dim: Width of the latents.
        depth: Attention + MLP layers.
        dim_head: Channels per head.
        heads: Attention heads.
        num_queries: Output tokens.
        embedding_dim: Input width (512: ArcFace).
        output_dim: Output width (the InfuseNet's text width, 4096).
        ff_mult: MLP width over ``dim``.
    """

    dim: int = 1280
    depth: int = 4
    dim_head: int = DIM_HEAD
    heads: int = 20
    num_queries: int = 8
    embedding_dim: int = 512
    output_dim: int = 4096
    ff_mult: float = 4.0

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]], dim_head: int = DIM_HEAD) -> ResamplerParams:
        """Read the sizes off the tensors (the head split from ``dim_head``, which no tensor records).

        Raises:
            CheckpointError: A needed tensor is missing or the attention width is not a multiple of ``dim_head``.
        """

        def need(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise CheckpointError(f"the InfiniteYou image projector has no tensor {key!r}")
            return tuple(shapes[key])

        _, queries, dim = need("latents")
        inner = need("layers.0.0.to_q.weight")[0]
        if inner % dim_head:
            raise CheckpointError(f"the projector's attention width {inner} is not a multiple of {dim_head} per head")
        depth = len({k.split(".")[1] for k in shapes if k.startswith("layers.")})
        return cls(
            dim=dim, depth=depth, dim_head=dim_head, heads=inner // dim_head, num_queries=queries,
            embedding_dim=need("proj_in.weight")[1], output_dim=need("proj_out.weight")[0],
            ff_mult=need("layers.0.1.1.weight")[0] / dim,
        )  # fmt: skip


class PerceiverAttention(nn.Module):
    """Latents attend to ``[inputs, latents]``; both LayerNorm-ed first."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        """Attention update ``(B, Q, dim)`` of ``latents (B, Q, dim)`` over ``x (B, N, dim)`` and themselves."""
        x, latents = self.norm1(x), self.norm2(latents)
        batch, queries, _ = latents.shape

        def heads(t: Tensor) -> Tensor:  # (B, L, H * d) -> (B, H, L, d)
            return t.reshape(batch, t.shape[1], self.heads, self.dim_head).transpose(1, 2)

        q = heads(self.to_q(latents))
        k, v = (heads(t) for t in self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1))
        # the published split scale d^-1/4 on both sides (steadier in half precision), softmax in float32
        scale = self.dim_head**-0.25
        weights = torch.softmax(((q * scale) @ (k * scale).transpose(-2, -1)).float(), dim=-1).to(q.dtype)
        out = (weights @ v).transpose(1, 2).reshape(batch, queries, -1)
        return cast(Tensor, self.to_out(out))


def _feed_forward(dim: int, mult: float) -> nn.Sequential:
    inner = int(dim * mult)
    layers = [nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False)]
    return nn.Sequential(*layers)


class Resampler(nn.Module):
    """The identity projector (see the module docstring).

    Memory metadata: the layers stream one at a time; Linear and LayerNorm weights are leaves.
    """

    repeated_blocks = ("layers",)
    memory_leaves = (nn.Linear, nn.LayerNorm)
    keep_in_high_precision = ("*norm*",)

    def __init__(self, params: ResamplerParams = ResamplerParams()) -> None:
        super().__init__()
        self.params = params
        self.latents = nn.Parameter(torch.randn(1, params.num_queries, params.dim) / params.dim**0.5)
        self.proj_in = nn.Linear(params.embedding_dim, params.dim)
        self.proj_out = nn.Linear(params.dim, params.output_dim)
        self.norm_out = nn.LayerNorm(params.output_dim)
        self.layers = nn.ModuleList(
            [
                nn.ModuleList([PerceiverAttention(params.dim, params.dim_head, params.heads),
                               _feed_forward(params.dim, params.ff_mult)])  # fmt: skip
                for _ in range(params.depth)
            ]
        )

    def forward(self, embedding: Tensor) -> Tensor:
        """Identity tokens ``(B, num_queries, output_dim)`` of face embeddings ``(B, N, embedding_dim)`` (N = 1)."""
        x = self.proj_in(embedding.to(self.proj_in.weight.dtype))
        latents = self.latents.expand(x.shape[0], -1, -1)
        for layer in self.layers:
            attention, feed_forward = cast(nn.ModuleList, layer)
            latents = attention(x, latents) + latents
            latents = feed_forward(latents) + latents
        return cast(Tensor, self.norm_out(self.proj_out(latents)))
