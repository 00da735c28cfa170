"""The shared LDM encoder/decoder: BFL key layout, shapes, and the optional quant convs."""

from __future__ import annotations

import pytest
import torch
from diffstudio.nn.ldm import Decoder, Encoder

SIZES = {"ch": 8, "ch_mult": (1, 2), "num_res_blocks": 1, "z_channels": 4, "groups": 4}


def test_encoder_and_decoder_keys_follow_bfl_layout() -> None:
    encoder = Encoder(in_channels=3, quant_conv=True, **SIZES)
    decoder = Decoder(out_channels=3, **SIZES)
    enc, dec = set(encoder.state_dict()), set(decoder.state_dict())
    assert {"conv_in.weight", "down.0.block.0.norm1.weight", "down.0.downsample.conv.weight",
            "down.1.block.0.nin_shortcut.weight", "mid.attn_1.q.weight", "mid.block_2.conv2.bias",
            "norm_out.weight", "conv_out.weight", "quant_conv.weight"} <= enc  # fmt: skip
    assert not any(k.startswith("down.1.downsample") for k in enc)  # the last level does not downsample
    assert {"up.1.upsample.conv.weight", "up.0.block.1.conv1.weight", "mid.attn_1.proj_out.weight"} <= dec
    assert not any(k.startswith(("up.0.upsample", "post_quant_conv")) for k in dec)


def test_shapes_round_trip() -> None:
    torch.manual_seed(0)
    encoder = Encoder(in_channels=3, **SIZES)
    decoder = Decoder(out_channels=3, post_quant_conv=True, **SIZES)
    moments = encoder(torch.randn(2, 3, 16, 12))
    assert moments.shape == (2, 8, 8, 6)
    assert decoder(moments[:, :4]).shape == (2, 3, 16, 12)


class _LayoutError(Exception):
    pass


def _fail(what: str, keys: list[str]) -> Exception:
    return _LayoutError(f"{what}: {', '.join(keys)}")


def test_vae_key_renames_round_trip_and_reject_unknown_keys() -> None:
    from diffstudio.loading.ldm_vae import LDM_VAE_TOP, ldm_vae_bfl_to_diffusers, ldm_vae_diffusers_to_bfl

    top = {**LDM_VAE_TOP, "encoder.quant_conv": "quant_conv"}
    bfl = {f"encoder.{k}": v for k, v in Encoder(in_channels=3, quant_conv=True, **SIZES).state_dict().items()}
    bfl |= {f"decoder.{k}": v for k, v in Decoder(out_channels=3, **SIZES).state_dict().items()}
    diffusers = ldm_vae_bfl_to_diffusers(bfl, top=top, what="test AE", fail=_fail)
    assert diffusers["decoder.up_blocks.0.upsamplers.0.conv.weight"] is bfl["decoder.up.1.upsample.conv.weight"]
    assert diffusers["encoder.mid_block.attentions.0.to_q.weight"].shape == (16, 16)  # 1x1 conv -> linear
    assert "quant_conv.weight" in diffusers and "encoder.down_blocks.1.resnets.0.conv_shortcut.weight" in diffusers
    back = ldm_vae_diffusers_to_bfl(diffusers, top=top, what="test AE", fail=_fail)
    assert back.keys() == bfl.keys()
    assert all(torch.equal(back[k], bfl[k]) for k in bfl)
    with pytest.raises(_LayoutError, match="keys that are not part of a test AE: encoder.quant_conv.weight"):
        ldm_vae_bfl_to_diffusers(bfl, top=LDM_VAE_TOP, what="test AE", fail=_fail)
