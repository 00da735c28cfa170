"""The LoRA encoder (DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev): a LoRA's weights -> one token in T5 space.

For every LoRA-capable DiT Linear (304 in FLUX.1-dev) a learned probe ``x (1, L, d_in)`` goes through the LoRA:
``LN(factor * x A^T B^T)`` ``(1, L, d_out)`` (``factor = alpha / rank``, applied once), then a projection shared by
the layer type maps it to the token width ``D``. The ``1 + 304 L`` tokens (a learned special token first) go
through pre-LN CLIP-style encoder layers (multi-head self-attention with biases, quick-GELU MLP, no mask); the
special token, after a final LayerNorm and Linear, is the LoRA's token ``(1, 1, D)``.

Attribute names equal the checkpoint's keys: ``embedder.model_dict.<layer>.{x, layer_norm.*}``,
``embedder.proj_dict.<type>.*``, ``encoders.<i>.{attn.to_q/k/v/out, layer_norm1/2, fc1, fc2}.*``,
``special_embeds``, ``final_layer_norm.*``, ``final_linear.*``; ``<layer>`` is DiffSynth's DiT module name with
``.`` written ``___`` (:mod:`diffstudio.dit.diffsynth_names`). Official sizes: ``L = 16``, ``D = 4096``, 32 heads
of 128, MLP 8192, one encoder layer, one special token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffstudio.dit.diffsynth_names import DOUBLE, SINGLE, layer_type
from diffstudio.errors import ConfigError
from torch import Tensor, nn

_OFFICIAL_DOUBLE = {"attn.a_to_qkv": (3072, 9216), "attn.a_to_out": (3072, 3072), "ff_a.0": (3072, 12288),
                    "ff_a.2": (12288, 3072), "norm1_a.linear": (3072, 18432)}  # fmt: skip
_OFFICIAL_SINGLE = {"to_qkv_mlp": (3072, 21504), "proj_out": (15360, 3072), "norm.linear": (3072, 9216)}


@dataclass(frozen=True)
class LayerSpec:
    """One DiT Linear the encoder reads: DiffSynth key (``blocks___0___attn___a_to_qkv``), type, widths."""

    key: str
    type: str
    d_in: int
    d_out: int


@dataclass(frozen=True)
class LoraEncoderParams:
    """Sizes of a LoRA encoder (official values as defaults; :meth:`from_shapes` reads them from a file)."""

    layers: tuple[LayerSpec, ...]
    embed_dim: int = 4096
    num_embeds_per_lora: int = 16
    num_special_embeds: int = 1
    num_encoder_layers: int = 1
    intermediate_size: int = 8192
    num_heads: int = 32

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"the LoRA encoder's width {self.embed_dim} is not a multiple of num_attention_heads={self.num_heads}; "
                "pass the head count: ModelConfig(path=..., config={'num_attention_heads': H})"
            )

    @classmethod
    def official(cls, double: int = 19, single: int = 38) -> LoraEncoderParams:
        """FLUX.1-dev's 304 layers (19 double, 38 single blocks) and the published sizes."""
        layers = [LayerSpec(f"blocks___{i}___{s.replace('.', '___')}", s.replace(".", "___"), *dims)
                  for i in range(double) for s, dims in _double_dims().items()]  # fmt: skip
        layers += [LayerSpec(f"single_blocks___{i}___{s.replace('.', '___')}", s.replace(".", "___"), *dims)
                   for i in range(single) for s, dims in _OFFICIAL_SINGLE.items()]  # fmt: skip
        return cls(tuple(layers))

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]], num_heads: int | None = None) -> LoraEncoderParams:
        """Read every size from the checkpoint's shapes; the head count (not stored) from ``num_heads``.

        Without ``num_heads`` the published head width 128 is assumed (``D / 128`` heads).

        Raises:
            ConfigError: The shapes are not a LoRA encoder's, or the head count does not divide the width.
        """
        prefix = "embedder.model_dict."
        layers = []
        for key, shape in shapes.items():
            if key.startswith(prefix) and key.endswith(".x"):
                name = key[len(prefix) : -len(".x")]
                norm = shapes.get(f"{prefix}{name}.layer_norm.weight")
                kind = layer_type(name)
                if norm is None or kind is None or len(shape) != 3:
                    raise ConfigError(f"{key} {tuple(shape)} is not a LoRA encoder layer block (no layer_norm)")
                layers.append(LayerSpec(name, kind, int(shape[2]), int(norm[0])))
        special = shapes.get("special_embeds")
        fc1 = shapes.get("encoders.0.fc1.weight")
        if not layers or special is None or fc1 is None:
            raise ConfigError("not a LoRA encoder: embedder.model_dict.*.x, special_embeds or encoders.0.fc1 missing")
        depth = len({k.split(".")[1] for k in shapes if k.startswith("encoders.")})
        embed = int(special[2])
        heads = num_heads if num_heads is not None else max(embed // 128, 1)
        return cls(tuple(_ordered(layers)), embed, int(shapes[f"{prefix}{layers[0].key}.x"][1]), int(special[1]),
                   depth, int(fc1[0]), int(heads))  # fmt: skip


def _double_dims() -> dict[str, tuple[int, int]]:
    dims = dict(_OFFICIAL_DOUBLE)
    dims.update({s.replace("_a", "_b"): d for s, d in _OFFICIAL_DOUBLE.items()})
    return dims


def _ordered(layers: list[LayerSpec]) -> list[LayerSpec]:
    """DiffSynth's order: double blocks by index (its 10 layers in order), then single blocks (3 each)."""
    rank = {s.replace(".", "___"): i for i, s in enumerate([*DOUBLE, *SINGLE])}

    def key(spec: LayerSpec) -> tuple[int, int, int]:
        parts = spec.key.split("___")
        return (0 if parts[0] == "blocks" else 1, int(parts[1]), rank.get(spec.type, 99))

    return sorted(layers, key=key)


class LayerBlock(nn.Module):
    """``LN(factor * x A^T B^T)``: a learned probe ``x (1, L, d_in)`` through one layer's LoRA -> ``(1, L, d_out)``."""

    def __init__(self, length: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.zeros(1, length, d_in))
        self.layer_norm = nn.LayerNorm(d_out)

    def forward(self, down: Tensor | None, up: Tensor | None, factor: float = 1.0) -> Tensor:
        """``down (r, d_in)``, ``up (d_out, r)`` -> ``(1, L, d_out)``; both None: a zero-filled layer (LN bias).

        The product runs in float64 (float32 on devices without it), so a LoRA gives the same token whether
        its q/k/v parts come fused (kohya, BFL) or split (diffusers), up to the final rounding.
        """
        x: Tensor = self.x
        if down is None or up is None:
            out = x.new_zeros(1, x.shape[1], self.layer_norm.normalized_shape[0])
        else:
            wide = torch.float32 if x.device.type == "mps" else torch.float64
            probe = x.to(wide)
            out = ((probe @ down.to(probe).T) @ up.to(probe).T * factor).to(x.dtype)
        return self.layer_norm(out)


class LoraEmbedder(nn.Module):
    """The per-layer blocks and per-type projections: a LoRA -> ``(1, n_layers * L, D)`` tokens."""

    def __init__(self, params: LoraEncoderParams) -> None:
        super().__init__()
        self.specs = params.layers
        self.model_dict = nn.ModuleDict(
            {s.key: LayerBlock(params.num_embeds_per_lora, s.d_in, s.d_out) for s in params.layers}
        )
        widths: dict[str, int] = {}
        for spec in params.layers:
            widths.setdefault(spec.type, spec.d_out)
        self.proj_dict = nn.ModuleDict({kind: nn.Linear(width, params.embed_dim) for kind, width in widths.items()})

    def forward(self, pairs: Sequence[tuple[Tensor, Tensor, float] | None]) -> Tensor:
        """``pairs[i]`` = ``(down, up, factor)`` of layer ``specs[i]`` (None: zero-filled) -> ``(1, N L, D)``."""
        tokens = []
        for spec, pair in zip(self.specs, pairs, strict=True):
            block = self.model_dict[spec.key]
            out = block(None, None) if pair is None else block(*pair)
            tokens.append(self.proj_dict[spec.type](out))
        return torch.cat(tokens, dim=1)


class SelfAttention(nn.Module):
    """Multi-head self-attention with biases (``to_q``, ``to_k``, ``to_v``, ``to_out``), no mask."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, h: Tensor) -> Tensor:
        """``(B, S, D) -> (B, S, D)``."""
        b, s, d = h.shape
        q, k, v = (proj(h).view(b, s, self.heads, d // self.heads).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))  # fmt: skip
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.to_out(out.transpose(1, 2).reshape(b, s, d))
        return out


class EncoderLayer(nn.Module):
    """A pre-LN CLIP encoder layer: ``h + attn(LN1 h)``, then ``+ fc2(quick_gelu(fc1(LN2 h)))``."""

    def __init__(self, dim: int, intermediate: int, heads: int) -> None:
        super().__init__()
        self.attn = SelfAttention(dim, heads)
        self.layer_norm1 = nn.LayerNorm(dim)
        self.layer_norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, intermediate)
        self.fc2 = nn.Linear(intermediate, dim)

    def forward(self, h: Tensor) -> Tensor:
        """``(B, S, D) -> (B, S, D)``."""
        h = h + self.attn(self.layer_norm1(h))
        hidden = self.fc1(self.layer_norm2(h))
        return h + self.fc2(hidden * torch.sigmoid(1.702 * hidden))


class FluxLoraEncoder(nn.Module):
    """A LoRA (its per-layer ``(down, up, factor)``) -> ``num_special_embeds`` tokens ``(1, S, D)`` in T5 space."""

    def __init__(self, params: LoraEncoderParams) -> None:
        super().__init__()
        self.params = params
        self.embedder = LoraEmbedder(params)
        self.encoders = nn.ModuleList(
            [EncoderLayer(params.embed_dim, params.intermediate_size, params.num_heads)
             for _ in range(params.num_encoder_layers)]
        )  # fmt: skip
        self.special_embeds = nn.Parameter(torch.zeros(1, params.num_special_embeds, params.embed_dim))
        self.final_layer_norm = nn.LayerNorm(params.embed_dim)
        self.final_linear = nn.Linear(params.embed_dim, params.embed_dim)

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        """The DiT layers the encoder reads, in its token order."""
        return self.params.layers

    def forward(self, pairs: Sequence[tuple[Tensor, Tensor, float] | None]) -> Tensor:
        """One LoRA, aligned with :attr:`layers` (see :meth:`LoraEmbedder.forward`) -> ``(1, S, D)``."""
        tokens = self.embedder(pairs)
        special = self.special_embeds.to(tokens)
        h = torch.cat([special, tokens], dim=1)
        for layer in self.encoders:
            h = layer(h)
        out: Tensor = self.final_linear(self.final_layer_norm(h[:, : self.params.num_special_embeds]))
        return out
