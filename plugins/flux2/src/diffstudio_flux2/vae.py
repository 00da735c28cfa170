"""The FLUX.2 autoencoder (``Flux2AutoEncoder``), with attribute names equal to BFL's ``ae.safetensors`` keys.

``encode`` maps images in ``[-1, 1]`` to the normalised latents the DiT works on: the encoder's posterior mean
(32 channels at H/8) is patchified 2 x 2 (channel-major, 128 channels at H/16) and standardised with the
stored BatchNorm running statistics, ``(z - running_mean) / sqrt(running_var + 1e-4)``. ``decode`` inverts
that and runs the decoder. This equals diffusers' ``AutoencoderKLFlux2`` followed by the FLUX.2 pipelines'
``_patchify_latents`` and BatchNorm normalisation (diffusers' VAE itself returns the unpatchified
distribution; its pipelines do the rest).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from diffstudio.nn import attention
from einops import rearrange
from torch import Tensor, nn

from diffstudio_flux2.math import patchify_latents, unpatchify_latents
from diffstudio_flux2.params import AutoEncoderParams


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        h = self.norm(x)
        q, k, v = (rearrange(conv(h), "b c h w -> b (h w) 1 c") for conv in (self.q, self.k, self.v))
        out = attention(q, k, v)  # (B, H*W, 1, C)
        out = rearrange(out, "b (h w) 1 c -> b c h w", h=x.shape[2], w=x.shape[3])
        projected: Tensor = self.proj_out(out)
        return x + projected


class ResnetBlock(nn.Module):
    """Two GroupNorm-SiLU-conv3x3 stages with a (1x1-projected when widths differ) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

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
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        """Downsample by two."""
        out: Tensor = self.conv(nn.functional.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return out


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv: ``(B, C, H, W) -> (B, C, 2H, 2W)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Upsample by two."""
        out: Tensor = self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
        return out


class _DownLevel(nn.Module):
    """One encoder resolution level: resnets (``block``) and an optional ``downsample``."""

    def __init__(self, blocks: list[ResnetBlock], downsample: Downsample | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, h: Tensor) -> Tensor:
        """Run the level."""
        for block in self.block:
            h = block(h)
        return h if self.downsample is None else self.downsample(h)


class _UpLevel(nn.Module):
    """One decoder resolution level: resnets (``block``) and an optional ``upsample``."""

    def __init__(self, blocks: list[ResnetBlock], upsample: Upsample | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.upsample = upsample

    def forward(self, h: Tensor) -> Tensor:
        """Run the level."""
        for block in self.block:
            h = block(h)
        return h if self.upsample is None else self.upsample(h)


class _Mid(nn.Module):
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
    """Image ``(B, 3, H, W)`` to posterior moments ``(B, 2 * z_channels, H / 2^(levels-1), ...)``."""

    def __init__(self, p: AutoEncoderParams) -> None:
        super().__init__()
        groups = p.norm_groups
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        block_in = p.ch
        for level, mult in enumerate(p.ch_mult):
            block_out = p.ch * mult
            blocks = []
            for _ in range(p.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, groups))
                block_in = block_out
            last = level == len(p.ch_mult) - 1
            self.down.append(_DownLevel(blocks, None if last else Downsample(block_in)))
        self.mid = _Mid(block_in, groups)
        self.norm_out = _group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, kernel_size=3, padding=1)
        self.quant_conv = nn.Conv2d(2 * p.z_channels, 2 * p.z_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """Encode to moments (mean channels first, then log-variance)."""
        h: Tensor = self.conv_in(x)
        for down in self.down:
            h = down(h)
        h = self.conv_out(nn.functional.silu(self.norm_out(self.mid(h))))
        moments: Tensor = self.quant_conv(h)
        return moments


class Decoder(nn.Module):
    """Latent ``(B, z_channels, h, w)`` to image ``(B, out_ch, h * 2^(levels-1), ...)``."""

    def __init__(self, p: AutoEncoderParams) -> None:
        super().__init__()
        groups = p.norm_groups
        self.post_quant_conv = nn.Conv2d(p.z_channels, p.z_channels, kernel_size=1)
        block_in = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, kernel_size=3, padding=1)
        self.mid = _Mid(block_in, groups)
        levels: list[_UpLevel] = []
        for level in reversed(range(len(p.ch_mult))):
            block_out = p.ch * p.ch_mult[level]
            blocks = []
            for _ in range(p.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, groups))
                block_in = block_out
            levels.insert(
                0, _UpLevel(blocks, Upsample(block_in) if level else None)
            )  # up[0] is the full-resolution level, as in BFL's checkpoint
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """Decode a (denormalised, unpatchified) latent."""
        h: Tensor = self.mid(self.conv_in(self.post_quant_conv(z)))
        for up in reversed(self.up):
            h = up(h)
        image: Tensor = self.conv_out(nn.functional.silu(self.norm_out(h)))
        return image


class Flux2AutoEncoder(nn.Module):
    """FLUX.2 VAE: images ``(B, 3, H, W)`` in ``[-1, 1]`` <-> normalised latents ``(B, 128, H/16, W/16)``.

    ``bn`` holds only running statistics (no affine weights); it is never updated by ``encode``.
    """

    repeated_blocks: ClassVar[tuple[str, ...]] = ()
    memory_leaves: ClassVar[tuple[type[nn.Module], ...]] = (nn.Conv2d, nn.GroupNorm)  # bn stats: read by helpers
    no_split_modules: ClassVar[tuple[str, ...]] = ("ResnetBlock", "AttnBlock")
    keep_in_high_precision: ClassVar[tuple[str, ...]] = ("bn.*",)
    supports_gradient_checkpointing: ClassVar[bool] = False

    def __init__(self, params: AutoEncoderParams) -> None:
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.bn = nn.BatchNorm2d(params.latent_channels, eps=params.bn_eps, affine=False, track_running_stats=True)

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        assert self.bn.running_mean is not None and self.bn.running_var is not None
        mean = self.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.params.bn_eps).to(like.device, like.dtype)
        return mean, std

    def normalize(self, z: Tensor) -> Tensor:
        """Standardise patchified latents ``(B, 128, h, w)`` with the running statistics."""
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, z: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`."""
        mean, std = self._stats(z)
        return z * std + mean

    def encode(self, x: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` to normalised latents ``(B, 128, H/16, W/16)`` (posterior mean)."""
        moments: Tensor = self.encoder(x)  # (B, 2 * z, H/8, W/8)
        mean = moments[:, : self.params.z_channels]  # (B, z, H/8, W/8)
        return self.normalize(patchify_latents(mean, self.params.patch_size))

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents ``(B, 128, h, w)`` to images ``(B, 3, 16h, 16w)`` (roughly in ``[-1, 1]``)."""
        image: Tensor = self.decoder(unpatchify_latents(self.denormalize(z), self.params.patch_size))
        return image

    def forward(self, x: Tensor) -> Tensor:
        """Round trip ``decode(encode(x))``."""
        return self.decode(self.encode(x))
