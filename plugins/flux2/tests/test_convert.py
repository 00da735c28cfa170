"""Converters (exact both ways) and format probes (FLUX.2 vs FLUX.1, BFL vs diffusers)."""

from __future__ import annotations

import pytest
import torch
from diffstudio.errors import CheckpointError
from diffstudio_flux2.convert import (
    Flux2ConversionError,
    convert_bfl_to_diffusers_dit,
    convert_bfl_to_diffusers_vae,
    convert_diffusers_to_bfl_dit,
    convert_diffusers_to_bfl_vae,
    detect_flux2_dit_format,
    detect_flux2_vae_format,
)


def _identical(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("variant", ["klein", "dev"])
def test_dit_round_trips(dit_cases, variant):
    diffusers_sd = dit_cases[variant].reference.state_dict()
    bfl = convert_diffusers_to_bfl_dit(diffusers_sd)
    assert _identical(convert_bfl_to_diffusers_dit(bfl), diffusers_sd)
    assert _identical(convert_diffusers_to_bfl_dit(convert_bfl_to_diffusers_dit(bfl)), bfl)
    assert "double_blocks.1.img_attn.qkv.weight" in bfl and "single_blocks.1.norm.key_norm.scale" in bfl
    assert not any(k.endswith(".bias") for k in bfl)


def test_vae_round_trips(vae_case):
    diffusers_sd = vae_case.reference.state_dict()
    bfl = convert_diffusers_to_bfl_vae(diffusers_sd)
    assert _identical(convert_bfl_to_diffusers_vae(bfl), diffusers_sd)
    assert _identical(convert_diffusers_to_bfl_vae(convert_bfl_to_diffusers_vae(bfl)), bfl)
    # decoder levels are stored in reverse order by diffusers
    upsample = diffusers_sd["decoder.up_blocks.0.upsamplers.0.conv.weight"]
    assert torch.equal(bfl["decoder.up.1.upsample.conv.weight"], upsample)
    assert bfl["bn.num_batches_tracked"].item() == 7


def test_unknown_keys_are_errors(dit_cases, vae_case):
    bfl = convert_diffusers_to_bfl_dit(dit_cases["klein"].reference.state_dict())
    with pytest.raises(Flux2ConversionError, match="double_blocks.0.img_mod.lin.weight"):
        convert_bfl_to_diffusers_dit({**bfl, "double_blocks.0.img_mod.lin.weight": torch.zeros(1)})
    diffusers_sd = dict(dit_cases["klein"].reference.state_dict())
    del diffusers_sd["transformer_blocks.0.attn.to_k.weight"]
    with pytest.raises(CheckpointError, match="incomplete q/k/v"):
        convert_diffusers_to_bfl_dit(diffusers_sd)
    with pytest.raises(Flux2ConversionError, match="encoder.weird"):
        convert_bfl_to_diffusers_vae({"encoder.weird.weight": torch.zeros(1)})


def test_probes_on_flux2(dit_cases, vae_case):
    for case in dit_cases.values():
        diffusers_sd = case.reference.state_dict()
        assert detect_flux2_dit_format(_shapes(diffusers_sd)) == "diffusers"
        assert detect_flux2_dit_format(_shapes(convert_diffusers_to_bfl_dit(diffusers_sd))) == "bfl"
        assert detect_flux2_vae_format(_shapes(diffusers_sd)) is None
    vae_sd = vae_case.reference.state_dict()
    assert detect_flux2_vae_format(_shapes(vae_sd)) == "diffusers"
    assert detect_flux2_vae_format(_shapes(convert_diffusers_to_bfl_vae(vae_sd))) == "bfl"
    assert detect_flux2_dit_format(_shapes(vae_sd)) is None


def _flux1_bfl_dit_shapes(d=32):
    shapes = {
        "img_in.weight": (d, 64),
        "img_in.bias": (d,),
        "txt_in.weight": (d, 24),
        "txt_in.bias": (d,),
        "time_in.in_layer.weight": (d, 256),
        "vector_in.in_layer.weight": (d, 768),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.linear.weight": (64, d),
    }
    for i in range(2):
        shapes |= {
            f"double_blocks.{i}.img_mod.lin.weight": (6 * d, d),
            f"double_blocks.{i}.img_mod.lin.bias": (6 * d,),
            f"double_blocks.{i}.img_attn.qkv.weight": (3 * d, d),
            f"double_blocks.{i}.img_attn.norm.query_norm.scale": (16,),
            f"single_blocks.{i}.modulation.lin.weight": (3 * d, d),
            f"single_blocks.{i}.linear1.weight": (7 * d, d),
        }
    return shapes


def _flux1_bfl_ae_shapes():
    return {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
        "encoder.conv_out.weight": (32, 512, 3, 3),
        "decoder.conv_in.weight": (512, 16, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }


def test_probes_reject_flux1(dit_cases):
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    flux1 = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=8,
        axes_dims_rope=(4, 6, 6),
    )
    assert detect_flux2_dit_format(_shapes(flux1.state_dict())) is None
    assert detect_flux2_dit_format(_flux1_bfl_dit_shapes()) is None
    ae1 = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        latent_channels=16,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    assert detect_flux2_vae_format(_shapes(ae1.state_dict())) is None
    assert detect_flux2_vae_format(_flux1_bfl_ae_shapes()) is None
    # a FLUX.2 layout with an extra bias is not FLUX.2 either
    bfl = _shapes(convert_diffusers_to_bfl_dit(dit_cases["klein"].reference.state_dict()))
    assert detect_flux2_dit_format(bfl) == "bfl"
    assert detect_flux2_dit_format({**bfl, "img_in.bias": (32,)}) is None
