"""Blocks of the FLUX.2 DiT, with attribute names equal to BFL's checkpoint keys.

Shapes: ``B`` batch, ``L`` tokens, ``D`` hidden size, ``H`` heads, ``Dh`` head dim. The joint sequence of a
block is ``[text tokens, image tokens]`` (text first); attention tensors use the ``(B, L, H, Dh)`` layout.
Every ``Linear`` is a :class:`~diffstudio.nn.DeltaLinear` (side paths for LoRA; plain ``nn.Linear`` keys).
"""

from __future__ import annotations

import torch
from diffstudio.nn import (
    DEFAULT_PROCESSOR,
    AttentionContext,
    AttentionProcessor,
    DeltaLinear,
    QKNorm,
    RopeFreqs,
    apply_rope,
    extend_kv,
    gated,
    merge_heads_beside,
    modulate,
    rope_frequencies,
)
from einops import rearrange
from torch import Tensor, nn

from diffstudio_flux2.math import swiglu

ModParams = tuple[Tensor, Tensor, Tensor]
"""One (shift, scale, gate) set, each ``(B, 1, D)``."""




class SelfAttention(nn.Module):
    """Projections of one stream of a double block: fused ``qkv``, QK ``norm`` and output ``proj``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = DeltaLinear(dim, dim * 3, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.proj = DeltaLinear(dim, dim, bias=False)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, L, D)`` to normalised q, k and v, each ``(B, L, H, Dh)`` (before RoPE)."""
        q, k, v = rearrange(self.qkv(x), "b l (k h d) -> k b l h d", k=3, h=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class SwiGLU(nn.Module):
    """Parameter-free gate of the fused SwiGLU MLP, ``(..., 2F) -> (..., F)``."""

    def forward(self, x: Tensor) -> Tensor:
        """Apply ``silu(first half) * second half``."""
        return swiglu(x)


class Modulation(nn.Module):
    """Shared adaptive modulation: ``lin(silu(vec))`` split into one or two (shift, scale, gate) sets."""

    def __init__(self, dim: int, double: bool) -> None:
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = DeltaLinear(dim, self.multiplier * dim, bias=False)

    def forward(self, vec: Tensor) -> tuple[ModParams, ModParams | None]:
        """``vec (B, D)`` to (first set, second set or None), tensors ``(B, 1, D)``."""
        out = self.lin(nn.functional.silu(vec))[:, None, :]  # (B, 1, multiplier * D)
        chunks = out.chunk(self.multiplier, dim=-1)
        first: ModParams = (chunks[0], chunks[1], chunks[2])
        second: ModParams | None = (chunks[3], chunks[4], chunks[5]) if self.is_double else None
        return first, second


class MLPEmbedder(nn.Module):
    """Two-layer SiLU MLP embedding a sinusoidal timestep/guidance embedding."""

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.in_layer = DeltaLinear(in_dim, hidden_dim, bias=False)
        self.silu = nn.SiLU()
        self.out_layer = DeltaLinear(hidden_dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_dim) -> (B, hidden_dim)``."""
        out: Tensor = self.out_layer(self.silu(self.in_layer(x)))
        return out


class EmbedND(nn.Module):
    """RoPE angles from 4-axis position ids (no parameters)."""

    def __init__(self, theta: int, axes_dim: tuple[int, ...]) -> None:
        super().__init__()
        self.theta = theta
        self.axes_dim = axes_dim

    def forward(self, ids: Tensor) -> RopeFreqs:
        """``ids (B, L, 4)`` to cos/sin ``(B, L, Dh / 2)``."""
        return rope_frequencies(ids, self.axes_dim, self.theta)


class LastLayer(nn.Module):
    """Final adaptive LayerNorm (shift, scale order) and projection back to latent channels."""

    def __init__(self, hidden_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = DeltaLinear(hidden_size, out_channels, bias=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), DeltaLinear(hidden_size, 2 * hidden_size, bias=False))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        """``x (B, L, D)``, ``vec (B, D)`` to ``(B, L, out_channels)``."""
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # (B, 1, D) each
        out: Tensor = self.linear(modulate(self.norm_final(x), shift, scale))
        return out


def _clip_fp16(x: Tensor) -> Tensor:
    # float16 activations of the large models can overflow; same guard as diffusers
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class DoubleStreamBlock(nn.Module):
    """Separate weights for text and image streams, joint attention over ``[txt, img]``."""

    processor: AttentionProcessor

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = nn.Sequential(
            DeltaLinear(hidden_size, 2 * mlp_hidden, bias=False),
            SwiGLU(),
            DeltaLinear(mlp_hidden, hidden_size, bias=False),
        )
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = nn.Sequential(
            DeltaLinear(hidden_size, 2 * mlp_hidden, bias=False),
            SwiGLU(),
            DeltaLinear(mlp_hidden, hidden_size, bias=False),
        )
        self.set_processor(DEFAULT_PROCESSOR)

    def set_processor(self, processor: AttentionProcessor) -> None:
        """Install the attention processor (stored as a plain attribute, never as a submodule)."""
        object.__setattr__(self, "processor", processor)

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        pe: RopeFreqs,
        mod_img: tuple[ModParams, ModParams],
        mod_txt: tuple[ModParams, ModParams],
        context: AttentionContext,
        kv_extension: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run the block.

        Args:
            img: Image tokens ``(B, L_img, D)`` (target and extra image tokens).
            txt: Text tokens ``(B, L_txt, D)``.
            pe: RoPE angles of ``[txt, img]``, ``(B, L_txt + L_img, Dh / 2)``.
            mod_img: Two (shift, scale, gate) sets for the image stream.
            mod_txt: Two (shift, scale, gate) sets for the text stream.
            context: Passed to the attention processor.
            kv_extension: Extra post-RoPE keys and values ``(B, L_ext, H, Dh)`` appended to this block's.

        Returns:
            Updated ``(img, txt)``.
        """
        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = mod_img
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = mod_txt
        img_q, img_k, img_v = self.img_attn.project(modulate(self.img_norm1(img), img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.project(modulate(self.txt_norm1(txt), txt_shift1, txt_scale1))

        q = apply_rope(torch.cat((txt_q, img_q), dim=1), pe)  # (B, L_txt + L_img, H, Dh)
        k = apply_rope(torch.cat((txt_k, img_k), dim=1), pe)
        v = torch.cat((txt_v, img_v), dim=1)
        k, v = extend_kv(k, v, kv_extension)  # (B, L_txt + L_img + L_ext, H, Dh)
        attn = rearrange(self.processor(q, k, v, context), "b l h d -> b l (h d)")
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = gated(img, img_gate1, self.img_attn.proj(img_attn))
        img = gated(img, img_gate2, self.img_mlp(modulate(self.img_norm2(img), img_shift2, img_scale2)))
        txt = gated(txt, txt_gate1, self.txt_attn.proj(txt_attn))
        txt = gated(txt, txt_gate2, self.txt_mlp(modulate(self.txt_norm2(txt), txt_shift2, txt_scale2)))
        return img, _clip_fp16(txt)


class SingleStreamBlock(nn.Module):
    """Parallel attention + SwiGLU MLP over the joint sequence, fused ``linear1`` in and ``linear2`` out."""

    processor: AttentionProcessor

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = DeltaLinear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim * 2, bias=False)
        self.linear2 = DeltaLinear(hidden_size + self.mlp_hidden_dim, hidden_size, bias=False)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.set_processor(DEFAULT_PROCESSOR)

    def set_processor(self, processor: AttentionProcessor) -> None:
        """Install the attention processor (stored as a plain attribute, never as a submodule)."""
        object.__setattr__(self, "processor", processor)

    def forward(
        self,
        x: Tensor,
        pe: RopeFreqs,
        mod: ModParams,
        context: AttentionContext,
        kv_extension: tuple[Tensor, Tensor] | None = None,
        output_from: int = 0,
    ) -> Tensor:
        """Run the block.

        Args:
            x: Joint tokens ``(B, L, D)``, text first.
            pe: RoPE angles ``(B, L, Dh / 2)``.
            mod: The (shift, scale, gate) set.
            context: Passed to the attention processor.
            kv_extension: Extra post-RoPE keys and values ``(B, L_ext, H, Dh)`` appended to this block's.
            output_from: Return only tokens ``output_from:`` (every token still attends and is attended to).
                The DiT's last block passes the text length: nobody reads the text tokens' last outputs, so
                their MLP and output projection are not computed.

        Returns:
            Updated tokens ``(B, L - output_from, D)``.
        """
        shift, scale, gate = mod
        qkv, mlp = torch.split(
            self.linear1(modulate(self.pre_norm(x), shift, scale)),
            [3 * self.hidden_size, 2 * self.mlp_hidden_dim],
            dim=-1,
        )
        q, k, v = rearrange(qkv, "b l (k h d) -> k b l h d", k=3, h=self.num_heads)
        q, k = self.norm(q, k, v)
        q, k = apply_rope(q, pe), apply_rope(k, pe)
        k, v = extend_kv(k, v, kv_extension)
        attn = self.processor(q, k, v, context)  # (B, L, H, Dh)
        if output_from:
            x, attn, mlp = x[:, output_from:], attn[:, output_from:], mlp[:, output_from:]
        out = self.linear2(merge_heads_beside(attn, mlp, swiglu, self.mlp_hidden_dim))  # cat((attn, swiglu(mlp)))
        return _clip_fp16(gated(x, gate, out))
