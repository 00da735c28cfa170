"""The LDM autoencoder's encoder and decoder, with attribute names equal to BFL's ``ae.safetensors`` keys.

FLUX.1 and FLUX.2 use the same convolutional stack: ``conv_in``, resolution levels (``down.i`` / ``up.i`` with
``block.j`` resnets and a ``downsample`` / ``upsample``), a ``mid`` stage (resnet, single-head attention,
resnet), ``norm_out`` and ``conv_out``. FLUX.2 adds 1x1 ``quant_conv`` / ``post_quant_conv`` around the latent.
The families wrap these in their autoencoders, which add the latent scaling (FLUX.1) or the patchify and
BatchNorm normalisation (FLUX.2).

Shapes: images ``(B, C_img, H, W)``; with ``n = len(ch_mult)`` levels the latent is ``(B, z, H / 2^(n-1),
W / 2^(n-1))``, the encoder's moments ``(B, 2 z, ...)`` (mean channels first, then log-variance).

On a CPU without native bf16, a bf16 :class:`Encoder` / :class:`Decoder` runs its activations in float32 on
the bf16 weights (:mod:`diffstudio.nn.conv`; inputs and outputs stay bf16), which avoids torch's ~90x slower
emulated bf16 convolution.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from diffstudio.nn.attention import attention
from diffstudio.nn.conv import Conv2d, GroupNorm, float32_activations

__all__ = ["AttnBlock", "Decoder", "Downsample", "Encoder", "Level", "Mid", "ResnetBlock", "Upsample", "group_norm"]


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """The autoencoder's GroupNorm (eps 1e-6, affine)."""
    return GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = Conv2d(channels, channels, kernel_size=1)
        self.k = Conv2d(channels, channels, kernel_size=1)
        self.v = Conv2d(channels, channels, kernel_size=1)
        self.proj_out = Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2).unsqueeze(2) for conv in (self.q, self.k, self.v))  # B,HW,1,C
        out = attention(q, k, v).squeeze(2).transpose(1, 2).reshape(batch, channels, height, width)
        projected: Tensor = self.proj_out(out)
        return x + projected


class ResnetBlock(nn.Module):
    """Two GroupNorm-SiLU-conv3x3 stages with a (1x1-projected when widths differ) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W) -> (B, C_out, H, W)``."""
        h: Tensor = self.conv1(nn.functional.silu(self.norm1(x)))
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        shortcut: Tensor = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class Downsample(nn.Module):
    """Zero-pad right/bottom by one, stride-2 3x3 conv: ``(B, C, H, W) -> (B, C, H/2, W/2)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        """Downsample by two."""
        out: Tensor = self.conv(nn.functional.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return out


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv: ``(B, C, H, W) -> (B, C, 2H, 2W)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Upsample by two."""
        out: Tensor = self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
        return out


class Level(nn.Module):
    """One resolution level: resnets (``block``) then an optional resampler named ``downsample`` or ``upsample``."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = name
        if resample is not None:
            self.add_module(name, resample)

    def forward(self, h: Tensor) -> Tensor:
        """Run the level."""
        for block in self.block:
            h = block(h)
        resample = getattr(self, self.resample_name, None)
        return h if resample is None else resample(h)


class Mid(nn.Module):
    """Middle stage: resnet, attention, resnet."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        out: Tensor = self.block_2(self.attn_1(self.block_1(x)))
        return out


class Encoder(nn.Module):
    """Image ``(B, in_channels, H, W)`` to posterior moments ``(B, 2 z_channels, H / 2^(n-1), W / 2^(n-1))``.

    Args:
        in_channels: Image channels.
        ch: Width of the first level; level ``i`` is ``ch * ch_mult[i]`` wide.
        ch_mult: Width multipliers, one per level (``n`` levels, ``n - 1`` downsamplings).
        num_res_blocks: Resnets per level.
        z_channels: Latent channels.
        groups: GroupNorm groups.
        quant_conv: Add the 1x1 ``quant_conv`` on the moments (FLUX.2).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        groups: int,
        quant_conv: bool = False,
    ) -> None:
        super().__init__()
        self.conv_in = Conv2d(in_channels, ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult, groups))
                block_in = ch * mult
            last = level == len(ch_mult) - 1
            self.down.append(Level(blocks, None if last else Downsample(block_in), "downsample"))
        self.mid = Mid(block_in, groups)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = Conv2d(block_in, 2 * z_channels, kernel_size=3, padding=1)
        self.quant_conv = Conv2d(2 * z_channels, 2 * z_channels, kernel_size=1) if quant_conv else None

    def forward(self, x: Tensor) -> Tensor:
        """Encode to moments (mean channels first, then log-variance), in ``x``'s dtype."""
        if float32_activations(x):
            return self.forward(x.float()).to(x.dtype)
        h: Tensor = self.conv_in(x)
        for down in self.down:
            h = down(h)
        moments: Tensor = self.conv_out(nn.functional.silu(self.norm_out(self.mid(h))))
        return moments if self.quant_conv is None else self.quant_conv(moments)


class Decoder(nn.Module):
    """Latent ``(B, z_channels, h, w)`` to image ``(B, out_channels, h * 2^(n-1), w * 2^(n-1))``.

    Args:
        out_channels: Image channels.
        ch: Width of the full-resolution level; level ``i`` is ``ch * ch_mult[i]`` wide.
        ch_mult: Width multipliers, one per level, full resolution first (``up.0`` in the checkpoint).
        num_res_blocks: Resnets per level, plus one.
        z_channels: Latent channels.
        groups: GroupNorm groups.
        post_quant_conv: Add the 1x1 ``post_quant_conv`` on the latent (FLUX.2).
    """

    def __init__(
        self,
        *,
        out_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        groups: int,
        post_quant_conv: bool = False,
    ) -> None:
        super().__init__()
        self.post_quant_conv = Conv2d(z_channels, z_channels, kernel_size=1) if post_quant_conv else None
        block_in = ch * ch_mult[-1]
        self.conv_in = Conv2d(z_channels, block_in, kernel_size=3, padding=1)
        self.mid = Mid(block_in, groups)
        levels: list[Level] = []
        for level in reversed(range(len(ch_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * ch_mult[level], groups))
                block_in = ch * ch_mult[level]
            levels.insert(0, Level(blocks, Upsample(block_in) if level else None, "upsample"))  # up.0: full size
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = Conv2d(block_in, out_channels, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """Decode a latent (unscaled: the families' autoencoders undo their latent scaling first), in ``z``'s dtype."""
        if float32_activations(z):
            return self.forward(z.float()).to(z.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        h: Tensor = self.mid(self.conv_in(z))
        for up in reversed(self.up):
            h = up(h)
        image: Tensor = self.conv_out(nn.functional.silu(self.norm_out(h)))
        return image
