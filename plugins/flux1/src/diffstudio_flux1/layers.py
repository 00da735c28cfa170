"""Blocks of the FLUX.1 DiT, with attribute names equal to BFL's checkpoint keys.

Shapes: ``B`` batch, ``L`` tokens, ``D`` hidden size, ``H`` heads, ``Dh`` head dim. The joint sequence of a
block is ``[text tokens, image tokens]`` (text first); attention tensors use the ``(B, L, H, Dh)`` layout.
Every ``Linear`` is a :class:`~diffstudio.nn.DeltaLinear` (side paths for LoRA; plain ``nn.Linear`` keys).
Unlike FLUX.2, every block owns its modulation and every projection has a bias.
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
    attention,
    extend_kv,
    gated,
    merge_heads_beside,
    modulate,
    rope_frequencies,
)
from einops import rearrange
from torch import Tensor, nn

from diffstudio_flux1.math import gelu_tanh

ModParams = tuple[Tensor, Tensor, Tensor]
"""One (shift, scale, gate) set, each ``(B, 1, D)``."""




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


class SelfAttention(nn.Module):
    """Projections of one stream of a double block: fused ``qkv``, QK ``norm`` and output ``proj``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = DeltaLinear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = DeltaLinear(dim, dim)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, L, D)`` to normalised q, k and v, each ``(B, L, H, Dh)`` (before RoPE)."""
        q, k, v = rearrange(self.qkv(x), "b l (k h d) -> k b l h d", k=3, h=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class Modulation(nn.Module):
    """A block's adaptive modulation: ``lin(silu(vec))`` split into one or two (shift, scale, gate) sets."""

    def __init__(self, dim: int, double: bool) -> None:
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = DeltaLinear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor) -> tuple[ModParams, ModParams | None]:
        """``vec (B, D)`` to (first set, second set or None), tensors ``(B, 1, D)``."""
        chunks = self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        first: ModParams = (chunks[0], chunks[1], chunks[2])
        second: ModParams | None = (chunks[3], chunks[4], chunks[5]) if self.is_double else None
        return first, second


class MLPEmbedder(nn.Module):
    """Two-layer SiLU MLP (timestep, guidance and pooled-text embedders)."""

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.in_layer = DeltaLinear(in_dim, hidden_dim)
        self.silu = nn.SiLU()
        self.out_layer = DeltaLinear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_dim) -> (B, hidden_dim)``."""
        out: Tensor = self.out_layer(self.silu(self.in_layer(x)))
        return out


class EmbedND(nn.Module):
    """RoPE angles from 3-axis position ids (no parameters)."""

    def __init__(self, theta: int, axes_dim: tuple[int, ...]) -> None:
        super().__init__()
        self.theta = theta
        self.axes_dim = axes_dim

    def forward(self, ids: Tensor) -> RopeFreqs:
        """``ids (B, L, 3)`` to cos/sin ``(B, L, Dh / 2)``."""
        return rope_frequencies(ids, self.axes_dim, self.theta)


class LastLayer(nn.Module):
    """Final adaptive LayerNorm ((shift, scale) order, as BFL stores it) and projection to latent channels."""

    def __init__(self, hidden_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = DeltaLinear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), DeltaLinear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        """``x (B, L, D)``, ``vec (B, D)`` to ``(B, L, out_channels)``."""
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # (B, 1, D) each
        out: Tensor = self.linear(modulate(self.norm_final(x), shift, scale))
        return out


def _mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
    return nn.Sequential(DeltaLinear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), DeltaLinear(mlp_hidden, hidden))


def _clip_fp16(x: Tensor) -> Tensor:
    # float16 activations of the large models can overflow; same guard as diffusers
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class _ProcessorSlot(nn.Module):
    processor: AttentionProcessor

    def set_processor(self, processor: AttentionProcessor) -> None:
        """Install the attention processor (stored as a plain attribute, never as a submodule)."""
        object.__setattr__(self, "processor", processor)


class DoubleStreamBlock(_ProcessorSlot):
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
        (img_shift1, img_scale1, img_gate1), img_mod2 = self.img_mod(vec)
        (txt_shift1, txt_scale1, txt_gate1), txt_mod2 = self.txt_mod(vec)
        assert img_mod2 is not None and txt_mod2 is not None
        img_q, img_k, img_v = self.img_attn.project(modulate(self.img_norm1(img), img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.project(modulate(self.txt_norm1(txt), txt_shift1, txt_scale1))

        q = apply_rope(torch.cat((txt_q, img_q), dim=1), pe)  # (B, L_txt + L_img, H, Dh)
        k = apply_rope(torch.cat((txt_k, img_k), dim=1), pe)
        v = torch.cat((txt_v, img_v), dim=1)
        k, v = extend_kv(k, v, kv_extension)
        attn = rearrange(self.processor(q, k, v, context), "b l h d -> b l (h d)")
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img_shift2, img_scale2, img_gate2 = img_mod2
        txt_shift2, txt_scale2, txt_gate2 = txt_mod2
        img = gated(img, img_gate1, self.img_attn.proj(img_attn))
        img = gated(img, img_gate2, self.img_mlp(modulate(self.img_norm2(img), img_shift2, img_scale2)))
        txt = gated(txt, txt_gate1, self.txt_attn.proj(txt_attn))
        txt = gated(txt, txt_gate2, self.txt_mlp(modulate(self.txt_norm2(txt), txt_shift2, txt_scale2)))
        return img, _clip_fp16(txt)


class SingleStreamBlock(_ProcessorSlot):
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
        q, k, v = rearrange(qkv, "b l (k h d) -> k b l h d", k=3, h=self.num_heads)
        q, k = self.norm(q, k, v)
        q, k = apply_rope(q, pe), apply_rope(k, pe)
        k, v = extend_kv(k, v, kv_extension)
        attn = self.processor(q, k, v, context)  # (B, L, H, Dh)
        if output_from:
            x, attn, mlp = x[:, output_from:], attn[:, output_from:], mlp[:, output_from:]
        out = self.linear2(merge_heads_beside(attn, mlp, gelu_tanh, self.mlp_hidden_dim))  # cat((attn, gelu(mlp)))
        return _clip_fp16(gated(x, gate, out))
