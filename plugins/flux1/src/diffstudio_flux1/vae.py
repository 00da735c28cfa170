"""The FLUX.1 autoencoder (``AutoEncoder``), attribute names equal to BFL's ``ae.safetensors`` keys.

An LDM autoencoder with 16 latent channels and no quant convs. ``encode`` maps images in ``[-1, 1]`` to the
latents the DiT works on: the posterior mean (no sampling; diffusers' Kontext pipeline uses the mode too) is
scaled as ``scale_factor * (mean - shift_factor)`` (0.3611, 0.1159 for FLUX.1). ``decode`` inverts that and
runs the decoder. This equals diffusers' ``AutoencoderKL`` followed by the FLUX pipelines' scaling.
``encode``/``decode`` take ``tiled=True`` to process large images in overlapping tiles (see
:mod:`diffstudio_flux1.tiling`).

The convolutional encoder and decoder are core :mod:`diffstudio.nn.ldm` (shared with the other FLUX family).
"""

from __future__ import annotations

from typing import ClassVar

from diffstudio.nn.ldm import Decoder, Encoder
from torch import Tensor, nn

from diffstudio_flux1.params import AutoEncoderParams
from diffstudio_flux1.tiling import tiled_apply


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
        p = params
        self.encoder = Encoder(in_channels=p.in_channels, ch=p.ch, ch_mult=p.ch_mult, num_res_blocks=p.num_res_blocks,
                               z_channels=p.z_channels, groups=p.norm_groups)  # fmt: skip
        self.decoder = Decoder(out_channels=p.out_ch, ch=p.ch, ch_mult=p.ch_mult, num_res_blocks=p.num_res_blocks,
                               z_channels=p.z_channels, groups=p.norm_groups)  # fmt: skip

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
