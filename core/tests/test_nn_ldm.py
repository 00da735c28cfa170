"""The shared LDM encoder/decoder: BFL key layout, shapes, and the optional quant convs."""

from __future__ import annotations

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
