"""FLUX.2 autoencoder parity with diffusers' AutoencoderKLFlux2 plus the FLUX.2 pipelines' latent handling."""

from __future__ import annotations

import pytest
import torch
from diffstudio_flux2.math import patchify_latents, unpatchify_latents
from diffstudio_flux2.params import AutoEncoderParams
from diffstudio_flux2.vae import Flux2AutoEncoder

LAYOUTS = ("bfl", "diffusers", "diffusers-sharded")


def _bn_stats(ref):
    mean = ref.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    return mean, std


@torch.no_grad()
def reference_encode(ref, image):
    """diffusers: posterior mode, then Flux2Pipeline._patchify_latents and the BatchNorm standardisation."""
    latents = ref.encode(image).latent_dist.mode()
    b, c, h, w = latents.shape
    latents = (
        latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
    )
    mean, std = _bn_stats(ref)
    return (latents - mean) / std


@torch.no_grad()
def reference_decode(ref, z):
    """diffusers: de-standardise, Flux2Pipeline._unpatchify_latents, decode."""
    mean, std = _bn_stats(ref)
    z = z * std + mean
    b, c, h, w = z.shape
    z = z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)
    return ref.decode(z).sample


@pytest.mark.parametrize("layout", LAYOUTS)
def test_encode_decode_match_diffusers(vae_case, helpers, layout):
    vae = vae_case.load(layout)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 16, 24, generator=gen) * 2 - 1
    with torch.no_grad():
        z = vae.encode(image)
        expected = reference_encode(vae_case.reference, image)
        assert z.shape == (2, 32, 4, 6) == expected.shape
        assert (z - expected).abs().max() <= helpers.TOL
        latent = torch.randn(2, 32, 4, 6, generator=gen)
        decoded = vae.decode(latent)
        expected_image = reference_decode(vae_case.reference, latent)
    assert decoded.shape == (2, 3, 16, 24)
    assert (decoded - expected_image).abs().max() <= helpers.TOL
    assert expected_image.abs().max() > 0.1 and expected.abs().max() > 0.1


def test_statistics_are_applied_and_frozen(vae_case):
    vae = vae_case.load("bfl").train()
    stats = (vae.bn.running_mean.clone(), vae.bn.running_var.clone())
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = vae.encode(image)
        raw = patchify_latents(vae.encoder(image)[:, : vae.params.z_channels])
    assert torch.equal(vae.bn.running_mean, stats[0]) and torch.equal(vae.bn.running_var, stats[1])
    assert torch.allclose(vae.denormalize(z), raw, atol=1e-5)
    assert (z - raw).abs().max() > 0.1  # the statistics are not trivial
    assert torch.equal(unpatchify_latents(patchify_latents(raw)), raw)


def test_params_from_shapes_and_metadata(vae_case, helpers):
    sd = helpers.load_file(vae_case.files["bfl"])
    params = AutoEncoderParams.from_state_dict_shapes({k: tuple(v.shape) for k, v in sd.items()})
    assert (params.ch, params.ch_mult, params.num_res_blocks, params.z_channels) == (32, (1, 2), 1, 8)
    assert params.latent_channels == 32 and params.downsample_factor == 4
    official = AutoEncoderParams()
    assert official.latent_channels == 128 and official.downsample_factor == 16
    assert "bn.*" in Flux2AutoEncoder.keep_in_high_precision
    assert not Flux2AutoEncoder.supports_gradient_checkpointing
    assert "encoder.quant_conv.weight" in sd and "decoder.post_quant_conv.weight" in sd
    assert sd["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
