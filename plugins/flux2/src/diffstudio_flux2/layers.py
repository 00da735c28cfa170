"""Blocks of the FLUX.2 DiT, with attribute names equal to BFL's checkpoint keys.

Shapes: ``B`` batch, ``L`` tokens, ``D`` hidden size, ``H`` heads, ``Dh`` head dim. The joint sequence of a
block is ``[text tokens, image tokens]`` (text first); attention tensors use the ``(B, L, H, Dh)`` layout.
Every ``Linear`` is a :class:`~diffstudio.nn.DeltaLinear` (side paths for LoRA; plain ``nn.Linear`` keys).
The layers are the shared ones of :mod:`diffstudio.dit.layers` without biases; the blocks are FLUX.2's own
(shared modulation passed in, SwiGLU MLP).
"""

from __future__ import annotations

import torch
from diffstudio.dit.blocks import JointStreams
from diffstudio.dit.layers import EmbedND, ModParams, ProcessorSlot, clip_fp16
from diffstudio.dit.layers import LastLayer as _LastLayer
from diffstudio.dit.layers import MLPEmbedder as _MLPEmbedder
from diffstudio.dit.layers import Modulation as _Modulation
from diffstudio.dit.layers import SelfAttention as _SelfAttention
from diffstudio.nn import (
    DEFAULT_PROCESSOR,
    AttentionContext,
    DeltaLinear,
    QKNorm,
    RopeFreqs,
    apply_rope,
    extend_kv,
    gated,
    merge_heads_beside,
    modulate,
)
from einops import rearrange
from torch import Tensor, nn

from diffstudio_flux2.math import swiglu

__all__ = [
    "DoubleStreamBlock",
    "EmbedND",
    "LastLayer",
    "MLPEmbedder",
    "ModParams",
    "Modulation",
    "SelfAttention",
    "SingleStreamBlock",
    "SwiGLU",
]

class SwiGLU(nn.Module):
    """Parameter-free gate of the fused SwiGLU MLP, ``(..., 2F) -> (..., F)``."""

    def forward(self, x: Tensor) -> Tensor:
        """Apply ``silu(first half) * second half``."""
        return swiglu(x)



class SelfAttention(_SelfAttention):
    """Projections of one stream of a double block (FLUX.2: no biases)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__(dim, num_heads, qkv_bias=False, proj_bias=False)


class Modulation(_Modulation):
    """Shared adaptive modulation (FLUX.2: no bias): ``lin(silu(vec))`` split into (shift, scale, gate) sets."""

    def __init__(self, dim: int, double: bool) -> None:
        super().__init__(dim, double, bias=False)


class MLPEmbedder(_MLPEmbedder):
    """Two-layer SiLU MLP embedding a sinusoidal timestep/guidance embedding (no biases)."""

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__(in_dim, hidden_dim, bias=False)


class LastLayer(_LastLayer):
    """Final adaptive LayerNorm (shift, scale order) and projection back to latent channels (no biases)."""

    def __init__(self, hidden_size: int, out_channels: int) -> None:
        super().__init__(hidden_size, out_channels, bias=False)


class DoubleStreamBlock(JointStreams):
    """Separate weights for text and image streams, joint attention over ``[txt, img]``."""

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
        return self.joint_update(img, txt, mod_img, mod_txt, pe, context, kv_extension)


class SingleStreamBlock(ProcessorSlot):
    """Parallel attention + SwiGLU MLP over the joint sequence, fused ``linear1`` in and ``linear2`` out."""

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
        return clip_fp16(gated(x, gate, out))
