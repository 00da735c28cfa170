"""The FLUX.2 autoencoder (``Flux2AutoEncoder``), with attribute names equal to BFL's ``ae.safetensors`` keys.

``encode`` maps images in ``[-1, 1]`` to the normalised latents the DiT works on: the encoder's posterior mean
(32 channels at H/8) is patchified 2 x 2 (channel-major, 128 channels at H/16) and standardised with the
stored BatchNorm running statistics, ``(z - running_mean) / sqrt(running_var + 1e-4)``. ``decode`` inverts
that and runs the decoder. This equals diffusers' ``AutoencoderKLFlux2`` followed by the FLUX.2 pipelines'
``_patchify_latents`` and BatchNorm normalisation (diffusers' VAE itself returns the unpatchified
distribution; its pipelines do the rest).

The convolutional encoder and decoder are core :mod:`diffstudio.nn.ldm` (shared with the other FLUX family).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from diffstudio.nn.ldm import Decoder, Encoder
from torch import Tensor, nn

from diffstudio_flux2.math import patchify_latents, unpatchify_latents
from diffstudio_flux2.params import AutoEncoderParams


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
        p = params
        self.encoder = Encoder(in_channels=p.in_channels, ch=p.ch, ch_mult=p.ch_mult, num_res_blocks=p.num_res_blocks,
                               z_channels=p.z_channels, groups=p.norm_groups, quant_conv=True)  # fmt: skip
        self.decoder = Decoder(out_channels=p.out_ch, ch=p.ch, ch_mult=p.ch_mult, num_res_blocks=p.num_res_blocks,
                               z_channels=p.z_channels, groups=p.norm_groups, post_quant_conv=True)  # fmt: skip
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
