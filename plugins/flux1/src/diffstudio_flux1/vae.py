"""The FLUX.1 autoencoder (``AutoEncoder``), attribute names equal to BFL's ``ae.safetensors`` keys.

An LDM autoencoder with 16 latent channels and no quant convs. ``encode`` maps images in ``[-1, 1]`` to the
latents the DiT works on: the posterior mean (no sampling; diffusers' Kontext pipeline uses the mode too) is
scaled as ``scale_factor * (mean - shift_factor)`` (0.3611, 0.1159 for FLUX.1). ``decode`` inverts that and
runs the decoder. This equals diffusers' ``AutoencoderKL`` followed by the FLUX pipelines' scaling.
``encode``/``decode`` take ``tiled=True`` to process large images in overlapping tiles (see
:mod:`diffstudio_flux1.tiling`).
"""

from __future__ import annotations

from typing import ClassVar

from diffstudio.nn import attention
from einops import rearrange
from torch import Tensor, nn

from diffstudio_flux1.params import AutoEncoderParams
from diffstudio_flux1.tiling import tiled_apply


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
        out = rearrange(attention(q, k, v), "b (h w) 1 c -> b c h w", h=x.shape[2], w=x.shape[3])
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


class Level(nn.Module):
    """One resolution level: resnets (``block``) then an optional ``downsample`` / ``upsample``."""

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
    """Image ``(B, 3, H, W)`` to posterior moments ``(B, 2 z, H / 2^(levels-1), W / 2^(levels-1))``."""

    def __init__(self, p: AutoEncoderParams) -> None:
        super().__init__()
        groups = p.norm_groups
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        block_in = p.ch
        for level, mult in enumerate(p.ch_mult):
            blocks = []
            for _ in range(p.num_res_blocks):
                blocks.append(ResnetBlock(block_in, p.ch * mult, groups))
                block_in = p.ch * mult
            last = level == len(p.ch_mult) - 1
            self.down.append(Level(blocks, None if last else Downsample(block_in), "downsample"))
        self.mid = Mid(block_in, groups)
        self.norm_out = _group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Encode to moments (mean channels first, then log-variance)."""
        h: Tensor = self.conv_in(x)
        for down in self.down:
            h = down(h)
        moments: Tensor = self.conv_out(nn.functional.silu(self.norm_out(self.mid(h))))
        return moments


class Decoder(nn.Module):
    """Latent ``(B, z, h, w)`` to image ``(B, out_ch, h * 2^(levels-1), w * 2^(levels-1))``."""

    def __init__(self, p: AutoEncoderParams) -> None:
        super().__init__()
        groups = p.norm_groups
        block_in = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, kernel_size=3, padding=1)
        self.mid = Mid(block_in, groups)
        levels: list[Level] = []
        for level in reversed(range(len(p.ch_mult))):
            blocks = []
            for _ in range(p.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, p.ch * p.ch_mult[level], groups))
                block_in = p.ch * p.ch_mult[level]
            # up[0] is the full-resolution level, as in BFL's checkpoint
            levels.insert(0, Level(blocks, Upsample(block_in) if level else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """Decode an unscaled latent."""
        h: Tensor = self.mid(self.conv_in(z))
        for up in reversed(self.up):
            h = up(h)
        image: Tensor = self.conv_out(nn.functional.silu(self.norm_out(h)))
        return image


class AutoEncoder(nn.Module):
    """FLUX.1 VAE: images ``(B, 3, H, W)`` in ``[-1, 1]`` <-> scaled latents ``(B, 16, H/8, W/8)``."""

    repeated_blocks: ClassVar[tuple[str, ...]] = ()
    memory_leaves: ClassVar[tuple[type[nn.Module], ...]] = (nn.Conv2d, nn.GroupNorm)  # memory metadata (vram)
    no_split_modules: ClassVar[tuple[str, ...]] = ("ResnetBlock", "AttnBlock")
    keep_in_high_precision: ClassVar[tuple[str, ...]] = ()
    supports_gradient_checkpointing: ClassVar[bool] = False

    def __init__(self, params: AutoEncoderParams) -> None:
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)

    def _encode(self, x: Tensor) -> Tensor:
        mean = self.encoder(x)[:, : self.params.z_channels]
        return self.params.scale_factor * (mean - self.params.shift_factor)

    def _decode(self, z: Tensor) -> Tensor:
        image: Tensor = self.decoder(z / self.params.scale_factor + self.params.shift_factor)
        return image

    def encode(self, x: Tensor, *, tiled: bool = False, tile_size: int = 128, tile_stride: int = 64) -> Tensor:
        """Images ``(B, 3, H, W)`` to scaled latents ``(B, 16, H/8, W/8)`` (posterior mean).

        Args:
            x: Images in ``[-1, 1]``.
            tiled: Encode overlapping tiles and blend them (bounded memory for large images).
            tile_size: Tile side in latent pixels (the image tile is ``8 x`` larger).
            tile_stride: Distance between tile origins in latent pixels (``< tile_size`` overlaps).
        """
        if not tiled:
            return self._encode(x)
        f = self.params.downsample_factor
        return tiled_apply(self._encode, x, tile_size * f, tile_stride * f, 1 / f)

    def decode(self, z: Tensor, *, tiled: bool = False, tile_size: int = 128, tile_stride: int = 64) -> Tensor:
        """Scaled latents ``(B, 16, h, w)`` to images ``(B, 3, 8h, 8w)`` (roughly in ``[-1, 1]``).

        Args:
            z: Latents.
            tiled: Decode overlapping tiles and blend them.
            tile_size: Tile side in latent pixels.
            tile_stride: Distance between tile origins in latent pixels.
        """
        if not tiled:
            return self._decode(z)
        return tiled_apply(self._decode, z, tile_size, tile_stride, float(self.params.downsample_factor))

    def forward(self, x: Tensor) -> Tensor:
        """Round trip ``decode(encode(x))``."""
        return self.decode(self.encode(x))
