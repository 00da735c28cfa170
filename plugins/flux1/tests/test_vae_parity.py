"""FLUX.1 autoencoder parity with diffusers' AutoencoderKL (FLUX scaling and shift), from both layouts."""

from __future__ import annotations

import pytest
import torch
from diffstudio_flux1.convert import convert_bfl_to_diffusers_vae, convert_diffusers_to_bfl_vae
from diffstudio_flux1.tiling import tile_starts, tiled_apply
from diffstudio_flux1.vae import AutoEncoder


def _image(seed: int = 0, size: tuple[int, int] = (32, 48)):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, *size, generator=gen) * 2 - 1


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_encode_decode_match_diffusers(vae_case, helpers, layout):
    vae = vae_case.load(layout)
    ref = vae_case.reference
    assert isinstance(vae, AutoEncoder)
    assert (vae.params.scale_factor, vae.params.shift_factor, vae.params.z_channels) == (0.3611, 0.1159, 16)
    x = _image()
    with torch.no_grad():
        expected = (ref.encode(x).latent_dist.mean - ref.config.shift_factor) * ref.config.scaling_factor
        got = vae.encode(x)
        assert got.shape == expected.shape == (2, 16, 16, 24)
        assert (got - expected).abs().max() <= helpers.TOL
        z = torch.randn(2, 16, 5, 7, generator=torch.Generator().manual_seed(3))
        image = ref.decode(z / ref.config.scaling_factor + ref.config.shift_factor).sample
        decoded = vae.decode(z)
    assert decoded.shape == image.shape == (2, 3, 10, 14)
    assert (decoded - image).abs().max() <= helpers.TOL and image.abs().max() > 0.1


def test_diffusers_config_factors_are_read(vae_case, helpers, tmp_path):
    import json
    import shutil

    folder = tmp_path / "vae"
    shutil.copytree(vae_case.files["diffusers"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(scaling_factor=1.5, shift_factor=-0.25)
    (folder / "config.json").write_text(json.dumps(config))
    vae, claim = helpers.load(folder)
    assert (claim.model_type, claim.component, claim.source_format) == ("flux1-vae", "vae", "diffusers")
    assert (vae.params.scale_factor, vae.params.shift_factor) == (1.5, -0.25)


def test_vae_converters_round_trip(vae_case, helpers):
    folder = helpers.read_folder(vae_case.files["diffusers"])
    back = convert_bfl_to_diffusers_vae(convert_diffusers_to_bfl_vae(folder))
    assert set(back) == set(folder) and all(torch.equal(back[k], folder[k]) for k in folder)
    with pytest.raises(Exception, match="quant_conv"):
        convert_diffusers_to_bfl_vae({**folder, "quant_conv.weight": torch.zeros(32, 32, 1, 1)})


def test_tiled_decode_and_encode(vae_case):
    vae = vae_case.load("bfl")
    z = torch.randn(1, 16, 12, 20, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = vae.decode(z)
        one_tile = vae.decode(z, tiled=True, tile_size=32, tile_stride=16)
        tiled = vae.decode(z, tiled=True, tile_size=8, tile_stride=4)
        x = full.clamp(-1, 1)
        enc_full = vae.encode(x)
        enc_tiled = vae.encode(x, tiled=True, tile_size=8, tile_stride=4)
    assert torch.equal(one_tile, full)
    assert tiled.shape == full.shape and enc_tiled.shape == enc_full.shape
    # tiles see less context (group norms, the mid attention): close, not equal
    assert 0 < (tiled - full).abs().mean() < 0.5 * full.abs().mean()
    assert 0 < (enc_tiled - enc_full).abs().mean() < 0.5 * enc_full.abs().mean()


def test_tiling_blends_an_identity_exactly():
    assert tile_starts(20, 8, 4) == [0, 4, 8, 12] and tile_starts(22, 8, 4) == [0, 4, 8, 12, 14]
    x = torch.randn(1, 2, 22, 30)
    assert torch.allclose(tiled_apply(lambda t: t, x, 8, 5, 1.0), x, atol=1e-6)
    up = tiled_apply(lambda t: t.repeat_interleave(2, 2).repeat_interleave(2, 3), x, 8, 6, 2.0)
    assert torch.allclose(up, x.repeat_interleave(2, 2).repeat_interleave(2, 3), atol=1e-6)
    with pytest.raises(ValueError, match="tile"):
        tiled_apply(lambda t: t, x, 4, 8, 1.0)
