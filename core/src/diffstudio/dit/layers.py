"""DiT layers shared by both FLUX families, with attribute names equal to BFL's checkpoint keys.

Shapes: ``B`` batch, ``L`` tokens, ``D`` hidden size, ``H`` heads, ``Dh`` head dim; attention tensors use the
``(B, L, H, Dh)`` layout. Every ``Linear`` is a :class:`~diffstudio.nn.DeltaLinear` (LoRA side paths, plain
``nn.Linear`` keys, oneDNN on CPU). The families differ only in biases (FLUX.1 has them, FLUX.2 has none), the id
axes fed to :class:`EmbedND` and where the modulation lives; those are constructor arguments here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffstudio.nn import (
    AttentionContext,
    AttentionProcessor,
    DeltaLinear,
    QKNorm,
    RopeFreqs,
    attention,
    modulate,
    rope_frequencies,
)

TIMESTEP_DIM = 256
"""Width of the sinusoidal timestep/guidance embedding fed to ``time_in`` / ``guidance_in`` (both families)."""

ModParams = tuple[Tensor, Tensor, Tensor]
"""One (shift, scale, gate) set, each ``(B, 1, D)``."""


def gelu_tanh(x: Tensor, out: Tensor | None = None) -> Tensor:
    """GELU with the tanh approximation (FLUX.1's MLP activation); ``out`` receives it when given (no autograd)."""
    if out is None:
        return F.gelu(x, approximate="tanh")
    return torch.ops.aten.gelu.out(x, approximate="tanh", out=out)  # type: ignore[no-any-return]


def clip_fp16(x: Tensor) -> Tensor:
    """Clip float16 activations to the float16 range (the large models can overflow; diffusers' guard)."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class MaskedAttentionProcessor:
    """SDPA with the additive or boolean mask found under ``context.extras[key]``.

    The mask broadcasts to ``(B, H, Lq, Lk)`` over the block's query sequence and keys (e.g. EliGen's regional
    prompts: a ``(B, 1, L, L)`` float mask with ``-inf`` where entity prompts and image regions must not meet).
    Without a mask in the extras it is plain SDPA.
    """

    def __init__(self, key: str = "attention_mask") -> None:
        self.key = key

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, context: AttentionContext) -> Tensor:
        """Masked attention, ``(B, Lq, H, Dh)``."""
        mask = context.extras.get(self.key)
        return attention(q, k, v, mask=None if mask is None else mask.to(q.device))


class ProcessorSlot(nn.Module):
    """A block with an attention-processor slot (``processor``, a plain attribute: never a submodule)."""

    processor: AttentionProcessor

    def set_processor(self, processor: AttentionProcessor) -> None:
        """Install the attention processor (stored as a plain attribute, never as a submodule)."""
        object.__setattr__(self, "processor", processor)


class SelfAttention(nn.Module):
    """Projections of one stream of a double block: fused ``qkv``, QK ``norm`` and output ``proj``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, proj_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = DeltaLinear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = DeltaLinear(dim, dim, bias=proj_bias)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, L, D)`` to normalised q, k and v, each ``(B, L, H, Dh)`` (before RoPE)."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 1, 3, 4)  # (B, L, H, Dh) each
        q, k = self.norm(q, k, v)
        return q, k, v


class Modulation(nn.Module):
    """Adaptive modulation: ``lin(silu(vec))`` split into one or two (shift, scale, gate) sets."""

    def __init__(self, dim: int, double: bool, bias: bool = True) -> None:
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = DeltaLinear(dim, self.multiplier * dim, bias=bias)

    def forward(self, vec: Tensor) -> tuple[ModParams, ModParams | None]:
        """``vec (B, D)`` to (first set, second set or None), tensors ``(B, 1, D)``."""
        chunks = self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        first: ModParams = (chunks[0], chunks[1], chunks[2])
        second: ModParams | None = (chunks[3], chunks[4], chunks[5]) if self.is_double else None
        return first, second


class MLPEmbedder(nn.Module):
    """Two-layer SiLU MLP (timestep, guidance and pooled-text embedders)."""

    def __init__(self, in_dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.in_layer = DeltaLinear(in_dim, hidden_dim, bias=bias)
        self.silu = nn.SiLU()
        self.out_layer = DeltaLinear(hidden_dim, hidden_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_dim) -> (B, hidden_dim)``."""
        out: Tensor = self.out_layer(self.silu(self.in_layer(x)))
        return out


class EmbedND(nn.Module):
    """RoPE angles from N-axis position ids (no parameters): 3 axes for FLUX.1, 4 for FLUX.2."""

    def __init__(self, theta: int, axes_dim: tuple[int, ...]) -> None:
        super().__init__()
        self.theta = theta
        self.axes_dim = axes_dim

    def forward(self, ids: Tensor) -> RopeFreqs:
        """``ids (B, L, N)`` to cos/sin ``(B, L, Dh / 2)``."""
        return rope_frequencies(ids, self.axes_dim, self.theta)


class LastLayer(nn.Module):
    """Final adaptive LayerNorm ((shift, scale) order, as BFL stores it) and projection to latent channels."""

    def __init__(self, hidden_size: int, out_channels: int, bias: bool = True) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = DeltaLinear(hidden_size, out_channels, bias=bias)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), DeltaLinear(hidden_size, 2 * hidden_size, bias=bias))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        """``x (B, L, D)``, ``vec (B, D)`` to ``(B, L, out_channels)``."""
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # (B, 1, D) each
        out: Tensor = self.linear(modulate(self.norm_final(x), shift, scale))
        return out
