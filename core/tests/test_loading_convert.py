"""Exact state-dict conversion primitives and the Converter record: round trips are bit-identical."""

from __future__ import annotations

import re
from collections.abc import Mapping

import pytest
import torch
from diffstudio.loading import (
    ConversionError,
    Converter,
    conv_to_linear,
    fuse_qkv,
    linear_to_conv,
    map_tensors,
    rename_keys,
    split_qkv,
    swap_halves,
)

D = 6


def bfl_state() -> dict[str, torch.Tensor]:
    """A miniature BFL-layout block: fused qkv, 1x1-conv style projection, final modulation (shift, scale)."""
    torch.manual_seed(0)
    return {
        "double_blocks.0.img_attn.qkv.weight": torch.randn(3 * D, D),
        "double_blocks.0.img_attn.qkv.bias": torch.randn(3 * D),
        "double_blocks.0.img_attn.proj.weight": torch.randn(D, D),
        "final_layer.adaLN_modulation.1.weight": torch.randn(2 * D, D),
        "final_layer.adaLN_modulation.1.bias": torch.randn(2 * D),
        "vae.quant_conv.weight": torch.randn(D, D, 1, 1),
    }


def bfl_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "double_blocks.0.img_attn."
    out: dict[str, torch.Tensor] = dict(sd)
    for kind in ("weight", "bias"):
        out = split_qkv(out, f"{prefix}qkv.{kind}", [f"{prefix}to_{n}.{kind}" for n in "qkv"])
    out = map_tensors(out, r"^final_layer\.adaLN_modulation\.1\.", swap_halves)
    out = map_tensors(out, r"quant_conv\.weight$", conv_to_linear)
    return rename_keys(
        out,
        [
            (r"^double_blocks\.(\d+)\.img_attn\.to_([qkv])\.", r"transformer_blocks.\1.attn.to_\2."),
            (r"^double_blocks\.(\d+)\.img_attn\.proj\.", r"transformer_blocks.\1.attn.to_out.0."),
            (r"^final_layer\.adaLN_modulation\.1\.", "norm_out.linear."),
            (r"^vae\.", "vae."),
        ],
        keep_unmatched=False,
    )


def diffusers_to_bfl(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = rename_keys(
        sd,
        [
            (r"^transformer_blocks\.(\d+)\.attn\.to_([qkv])\.", r"double_blocks.\1.img_attn.to_\2."),
            (r"^transformer_blocks\.(\d+)\.attn\.to_out\.0\.", r"double_blocks.\1.img_attn.proj."),
            (r"^norm_out\.linear\.", "final_layer.adaLN_modulation.1."),
        ],
    )
    prefix = "double_blocks.0.img_attn."
    for kind in ("weight", "bias"):
        q, k, v = (f"{prefix}to_{n}.{kind}" for n in "qkv")
        out = fuse_qkv(out, q, k, v, f"{prefix}qkv.{kind}")
    out = map_tensors(out, r"^final_layer\.adaLN_modulation\.1\.", swap_halves)
    return map_tensors(out, r"quant_conv\.weight$", linear_to_conv)


def assert_same(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_converter_round_trip_is_exact() -> None:
    converter = Converter.pair("bfl", "diffusers", bfl_to_diffusers, diffusers_to_bfl, description="toy")
    assert converter.name == "convert_bfl_to_diffusers" and converter.source == "bfl"
    assert converter.reverse is not None and converter.reverse.name == "convert_diffusers_to_bfl"
    assert converter.reverse.reverse is converter
    original = bfl_state()
    snapshot = {k: v.clone() for k, v in original.items()}
    diffusers = converter(original)
    assert diffusers["transformer_blocks.0.attn.to_k.weight"].shape == (D, D)
    assert torch.equal(
        diffusers["transformer_blocks.0.attn.to_v.bias"],
        original["double_blocks.0.img_attn.qkv.bias"][2 * D :],
    )
    assert torch.equal(
        diffusers["norm_out.linear.bias"][:D], original["final_layer.adaLN_modulation.1.bias"][D:]
    )
    assert diffusers["vae.quant_conv.weight"].shape == (D, D)
    assert_same(converter.reverse(diffusers), original)
    assert_same(original, snapshot)  # inputs are never modified
    assert "fn" not in repr(converter) and "reverse" not in repr(converter)


def test_converter_names_are_checked() -> None:
    with pytest.raises(ValueError, match="convert_bfl_to_diffusers"):
        Converter("bfl2diffusers", "bfl", "diffusers", bfl_to_diffusers)
    with pytest.raises(ValueError):
        Converter("convert_diffusers_to_bfl", "bfl", "diffusers", bfl_to_diffusers)
    named = Converter("convert_flux2_bfl_to_diffusers", "bfl", "diffusers", bfl_to_diffusers)
    assert named.reverse is None
    assert Converter.pair("a", "b", dict, dict, family="flux2").name == "convert_flux2_a_to_b"


def test_rename_first_rule_wins_and_keeps_tensor_objects() -> None:
    t1, t2, t3 = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    sd = {"a.x.w": t1, "a.y.w": t2, "b.w": t3}
    out = rename_keys(sd, [(r"^a\.x\.", "first."), (r"^a\.", "second."), (re.compile(r"\.w$"), ".weight")])
    assert list(out) == ["first.w", "second.y.w", "b.weight"]
    assert out["first.w"] is t1 and out["b.weight"] is t3
    assert list(sd) == ["a.x.w", "a.y.w", "b.w"]


def test_rename_unmatched_and_collisions() -> None:
    sd = {"a": torch.zeros(1), "b": torch.zeros(1), "c": torch.zeros(1)}
    assert list(rename_keys(sd, [("^a$", "z")])) == ["z", "b", "c"]
    with pytest.raises(ConversionError, match=r"2 key\(s\) match no rule: b, c"):
        rename_keys(sd, [("^a$", "z")], keep_unmatched=False)
    with pytest.raises(ConversionError, match="both 'a' and 'b' become 'same'"):
        rename_keys(sd, [("^[ab]$", "same")])


def test_fuse_split_round_trip_with_uneven_sizes() -> None:
    q, k, v = torch.randn(4, 3), torch.randn(2, 3), torch.randn(2, 3)
    sd = {"before": torch.zeros(1), "q": q, "k": k, "v": v, "after": torch.ones(1)}
    fused = fuse_qkv(sd, "q", "k", "v", "qkv")
    assert list(fused) == ["before", "qkv", "after"] and fused["qkv"].shape == (8, 3)
    assert torch.equal(fused["qkv"], torch.cat([q, k, v]))
    back = split_qkv(fused, "qkv", ["q", "k", "v"], sizes=[4, 2, 2])
    assert list(back) == ["before", "q", "k", "v", "after"]
    assert_same(back, sd)
    assert back["k"].untyped_storage().data_ptr() == fused["qkv"].untyped_storage().data_ptr()  # views


def test_fuse_split_errors() -> None:
    sd = {"q": torch.zeros(2, 3), "k": torch.zeros(2, 4), "v": torch.zeros(2, 3)}
    with pytest.raises(ConversionError, match="cannot be stacked"):
        fuse_qkv(sd, "q", "k", "v", "qkv")
    with pytest.raises(ConversionError, match="has no 'x'"):
        fuse_qkv(sd, "q", "x", "v", "qkv")
    with pytest.raises(ConversionError, match="already exists"):
        fuse_qkv({"q": sd["q"], "k": sd["q"], "v": sd["v"], "out": sd["q"]}, "q", "k", "v", "out")
    with pytest.raises(ConversionError, match="not divisible into 3"):
        split_qkv({"w": torch.zeros(7, 2)}, "w", ["a", "b", "c"])
    with pytest.raises(ConversionError, match="do not split"):
        split_qkv({"w": torch.zeros(6, 2)}, "w", ["a", "b"], sizes=[2, 2])
    with pytest.raises(ConversionError, match="repeat or already exist"):
        split_qkv({"w": torch.zeros(6, 2), "a": torch.zeros(1)}, "w", ["a", "b"])


def test_swap_halves_is_an_involution() -> None:
    t = torch.arange(12.0).reshape(4, 3)
    swapped = swap_halves(t)
    assert torch.equal(swapped, torch.cat([t[2:], t[:2]]))
    assert torch.equal(swap_halves(swapped), t)
    assert torch.equal(
        swap_halves(torch.arange(4.0).reshape(2, 2), dim=1), torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    )
    with pytest.raises(ConversionError, match="even"):
        swap_halves(torch.zeros(3, 2))


def test_conv_linear_round_trip() -> None:
    conv = torch.randn(5, 4, 1, 1)
    linear = conv_to_linear(conv)
    assert linear.shape == (5, 4) and linear.data_ptr() == conv.data_ptr()
    assert torch.equal(linear_to_conv(linear), conv)
    with pytest.raises(ConversionError, match=r"\[O, I, 1, 1\]"):
        conv_to_linear(torch.zeros(5, 4, 3, 3))
    with pytest.raises(ConversionError, match=r"\[O, I\]"):
        linear_to_conv(torch.zeros(5, 4, 1))
