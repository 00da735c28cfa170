"""The self-modulated MM-DiT blocks (FLUX.1 and the FLUX ControlNets), attribute names equal to BFL's keys.

Every block owns its modulation and every projection has a bias; the MLP is GELU (tanh). The joint sequence of a
block is ``[text tokens, image tokens]`` (text first); attention tensors use the ``(B, L, H, Dh)`` layout. FLUX.1's
DiT and the adapters that reuse its blocks (ControlNet) import them from here, so adapters import no family.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffstudio.dit.layers import ModParams, Modulation, ProcessorSlot, SelfAttention, clip_fp16, gelu_tanh
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


def _mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
    return nn.Sequential(DeltaLinear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), DeltaLinear(mlp_hidden, hidden))


class JointStreams(ProcessorSlot):
    """Base of a double-stream block: what FLUX.1's and FLUX.2's double blocks compute once modulated.

    A subclass owns ``img_norm1``, ``img_attn``, ``img_norm2``, ``img_mlp`` and the same ``txt_*`` modules (BFL's
    names); it computes the two (shift, scale, gate) sets per stream its own way and calls :meth:`joint_update`.
    """

    img_norm1: nn.Module
    img_attn: SelfAttention
    img_norm2: nn.Module
    img_mlp: nn.Module
    txt_norm1: nn.Module
    txt_attn: SelfAttention
    txt_norm2: nn.Module
    txt_mlp: nn.Module

    def joint_update(
        self,
        img: Tensor,
        txt: Tensor,
        mod_img: tuple[ModParams, ModParams],
        mod_txt: tuple[ModParams, ModParams],
        pe: RopeFreqs,
        context: AttentionContext,
        kv_extension: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, Tensor]:
        """Joint attention over ``[txt, img]``, then each stream's gated attention and MLP updates.

        Args:
            img: Image tokens ``(B, L_img, D)``.
            txt: Text tokens ``(B, L_txt, D)``.
            mod_img: Two (shift, scale, gate) sets for the image stream, each ``(B, 1, D)``.
            mod_txt: The same for the text stream.
            pe: RoPE angles of ``[txt, img]``, ``(B, L_txt + L_img, Dh / 2)``.
            context: Passed to the attention processor.
            kv_extension: Extra post-RoPE keys and values ``(B, L_ext, H, Dh)`` appended to this block's.

        Returns:
            Updated ``(img, txt)``; the text stream clipped to the fp16 range when it is fp16.
        """
        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = mod_img
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = mod_txt
        img_q, img_k, img_v = self.img_attn.project(modulate(self.img_norm1(img), img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.project(modulate(self.txt_norm1(txt), txt_shift1, txt_scale1))

        q = apply_rope(torch.cat((txt_q, img_q), dim=1), pe)  # (B, L_txt + L_img, H, Dh)
        k = apply_rope(torch.cat((txt_k, img_k), dim=1), pe)
        v = torch.cat((txt_v, img_v), dim=1)
        k, v = extend_kv(k, v, kv_extension)  # (B, L_txt + L_img + L_ext, H, Dh)
        attn = self.processor(q, k, v, context).flatten(2)  # (B, L, H * Dh)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = gated(img, img_gate1, self.img_attn.proj(img_attn))
        img = gated(img, img_gate2, self.img_mlp(modulate(self.img_norm2(img), img_shift2, img_scale2)))
        txt = gated(txt, txt_gate1, self.txt_attn.proj(txt_attn))
        txt = gated(txt, txt_gate2, self.txt_mlp(modulate(self.txt_norm2(txt), txt_shift2, txt_scale2)))
        return img, clip_fp16(txt)


class DoubleStreamBlock(JointStreams):
    """Separate weights for text and image streams, joint attention over ``[txt, img]``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool) -> None:
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = _mlp(hidden_size, mlp_hidden)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden)
        self.set_processor(DEFAULT_PROCESSOR)

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        vec: Tensor,
        pe: RopeFreqs,
        context: AttentionContext,
        kv_extension: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run the block.

        Args:
            img: Image tokens ``(B, L_img, D)`` (target and extra image tokens).
            txt: Text tokens ``(B, L_txt, D)``.
            vec: Conditioning vector ``(B, D)``.
            pe: RoPE angles of ``[txt, img]``, ``(B, L_txt + L_img, Dh / 2)``.
            context: Passed to the attention processor.
            kv_extension: Extra post-RoPE keys and values ``(B, L_ext, H, Dh)`` appended to this block's.

        Returns:
            Updated ``(img, txt)``.
        """
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        assert img_mod2 is not None and txt_mod2 is not None
        return self.joint_update(img, txt, (img_mod1, img_mod2), (txt_mod1, txt_mod2), pe, context, kv_extension)


class SingleStreamBlock(ProcessorSlot):
    """Parallel attention + GELU MLP over the joint sequence: fused ``linear1`` in and ``linear2`` out."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = DeltaLinear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = DeltaLinear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation = Modulation(hidden_size, double=False)
        self.set_processor(DEFAULT_PROCESSOR)

    def forward(
        self,
        x: Tensor,
        vec: Tensor,
        pe: RopeFreqs,
        context: AttentionContext,
        kv_extension: tuple[Tensor, Tensor] | None = None,
        output_from: int = 0,
    ) -> Tensor:
        """Run the block on joint tokens ``x (B, L, D)`` (text first); returns ``(B, L - output_from, D)``.

        ``output_from`` > 0 returns only the tokens from there on, all tokens still attending: the DiT's last
        block passes the text length, since nobody reads the text tokens' last outputs (their MLP and output
        projection are skipped).
        """
        (shift, scale, gate), _ = self.modulation(vec)
        qkv, mlp = torch.split(
            self.linear1(modulate(self.pre_norm(x), shift, scale)), [3 * self.hidden_size, self.mlp_hidden_dim], -1
        )
        q, k, v = qkv.reshape(*qkv.shape[:-1], 3, self.num_heads, -1).permute(2, 0, 1, 3, 4)  # (B, L, H, Dh) each
        q, k = self.norm(q, k, v)
        q, k = apply_rope(q, pe), apply_rope(k, pe)
        k, v = extend_kv(k, v, kv_extension)
        attn = self.processor(q, k, v, context)  # (B, L, H, Dh)
        if output_from:
            x, attn, mlp = x[:, output_from:], attn[:, output_from:], mlp[:, output_from:]
        out = self.linear2(merge_heads_beside(attn, mlp, gelu_tanh, self.mlp_hidden_dim))  # cat((attn, gelu(mlp)))
        return clip_fp16(gated(x, gate, out))
