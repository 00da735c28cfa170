"""The legacy-name converter: exact round trips, DiffSynth's own renaming as the oracle, typed errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffstudio_nexus_gen.convert import (
    LegacyDitKeyError,
    convert_bfl_to_legacy_dit,
    convert_legacy_to_bfl_dit,
    split_decoder,
)

# --- oracle: DiffSynth-Studio's FluxDiTStateDictConverter (BFL -> its module names), transcribed -------------------
DS_TOP = {
    "time_in.in_layer": "time_embedder.timestep_embedder.0", "time_in.out_layer": "time_embedder.timestep_embedder.2",
    "txt_in": "context_embedder", "vector_in.in_layer": "pooled_text_embedder.0",
    "vector_in.out_layer": "pooled_text_embedder.2", "final_layer.linear": "final_proj_out",
    "guidance_in.in_layer": "guidance_embedder.timestep_embedder.0",
    "guidance_in.out_layer": "guidance_embedder.timestep_embedder.2", "img_in": "x_embedder",
    "final_layer.adaLN_modulation.1": "final_norm_out.linear",
}  # fmt: skip
DS_SUFFIX = {
    "img_attn.norm.key_norm.scale": "attn.norm_k_a.weight", "img_attn.norm.query_norm.scale": "attn.norm_q_a.weight",
    "img_attn.proj.bias": "attn.a_to_out.bias", "img_attn.proj.weight": "attn.a_to_out.weight",
    "img_attn.qkv.bias": "attn.a_to_qkv.bias", "img_attn.qkv.weight": "attn.a_to_qkv.weight",
    "img_mlp.0.bias": "ff_a.0.bias", "img_mlp.0.weight": "ff_a.0.weight", "img_mlp.2.bias": "ff_a.2.bias",
    "img_mlp.2.weight": "ff_a.2.weight", "img_mod.lin.bias": "norm1_a.linear.bias",
    "img_mod.lin.weight": "norm1_a.linear.weight", "txt_attn.norm.key_norm.scale": "attn.norm_k_b.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_q_b.weight", "txt_attn.proj.bias": "attn.b_to_out.bias",
    "txt_attn.proj.weight": "attn.b_to_out.weight", "txt_attn.qkv.bias": "attn.b_to_qkv.bias",
    "txt_attn.qkv.weight": "attn.b_to_qkv.weight", "txt_mlp.0.bias": "ff_b.0.bias", "txt_mlp.0.weight": "ff_b.0.weight",
    "txt_mlp.2.bias": "ff_b.2.bias", "txt_mlp.2.weight": "ff_b.2.weight", "txt_mod.lin.bias": "norm1_b.linear.bias",
    "txt_mod.lin.weight": "norm1_b.linear.weight", "linear1.bias": "to_qkv_mlp.bias",
    "linear1.weight": "to_qkv_mlp.weight", "linear2.bias": "proj_out.bias", "linear2.weight": "proj_out.weight",
    "modulation.lin.bias": "norm.linear.bias", "modulation.lin.weight": "norm.linear.weight",
    "norm.key_norm.scale": "norm_k_a.weight", "norm.query_norm.scale": "norm_q_a.weight",
}  # fmt: skip


def ds_from_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DiffSynth's BFL -> FluxDiT names (no half swap: its final norm is in BFL order internally)."""
    out = {}
    for name, value in sd.items():
        parts = name.split(".")
        module, _, param = name.rpartition(".")
        if module in DS_TOP:
            out[f"{DS_TOP[module]}.{param}"] = value
        elif parts[0] == "double_blocks":
            out[f"blocks.{parts[1]}." + DS_SUFFIX[".".join(parts[2:])]] = value
        elif parts[0] == "single_blocks":
            out[f"single_blocks.{parts[1]}." + DS_SUFFIX[".".join(parts[2:])]] = value
    return out


def nexus_gen_file_from_ds(ds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a decoder file stores: ``pipe.dit.`` + DS names, final norm halves as DS un-swaps them on load."""
    out = {}
    for key, value in ds.items():
        if key.startswith("final_norm_out.linear."):
            half = value.shape[0] // 2
            value = torch.cat([value[half:], value[:half]])  # DS: param = cat(param[3072:], param[:3072])
        out["pipe.dit." + key] = value
    return out


# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bfl_dit(helpers: Any, fx: Any) -> dict[str, torch.Tensor]:
    """A tiny perturbed FLUX.1-dev DiT in BFL names (from the family's kit)."""
    from diffstudio_flux1.convert import convert_diffusers_to_bfl_dit

    model = helpers.diffusers_dit(True, seed=11, context=fx.T5_HIDDEN, pooled=fx.CLIP_HIDDEN)
    return convert_diffusers_to_bfl_dit(model.state_dict())


def test_legacy_converter_round_trips_a_tiny_flux1_dit_exactly(bfl_dit: dict[str, torch.Tensor]) -> None:
    legacy = convert_bfl_to_legacy_dit(bfl_dit)
    assert len(legacy) == len(bfl_dit)
    back = convert_legacy_to_bfl_dit({"pipe.dit." + k: v for k, v in legacy.items()})
    assert set(back) == set(bfl_dit)
    for key, value in bfl_dit.items():
        assert torch.equal(back[key], value), key


def test_legacy_names_equal_diffsynths_own_renaming_with_the_final_norm_swapped(
    bfl_dit: dict[str, torch.Tensor],
) -> None:
    file_state = nexus_gen_file_from_ds(ds_from_bfl(bfl_dit))
    assert set(file_state) == {"pipe.dit." + k for k in convert_bfl_to_legacy_dit(bfl_dit)}
    converted = convert_legacy_to_bfl_dit(file_state)
    for key, value in bfl_dit.items():
        assert torch.equal(converted[key], value), key
    final = "final_layer.adaLN_modulation.1.weight"
    assert not torch.equal(file_state["pipe.dit.final_norm_out.linear.weight"], bfl_dit[final])


def test_converted_decoder_dit_computes_what_the_bfl_dit_computes(
    bfl_dit: dict[str, torch.Tensor], helpers: Any
) -> None:
    """After conversion the decoder's DiT is a plain FLUX.1 DiT: the family builds it and it runs the same."""
    from diffstudio.config import ModelConfig
    from diffstudio.loading.checkpoint import tensors_view
    from diffstudio.runtime import Runtime
    from diffstudio.types import LoadRequest

    legacy = {"pipe.dit." + k: v for k, v in convert_bfl_to_legacy_dit(bfl_dit).items()}
    dit_part, head = split_decoder({**legacy, "adapter.0.weight": torch.zeros(2, 2)})
    assert set(head) == {"adapter.0.weight"}
    view = tensors_view("decoder [DiT part]", dit_part)
    config = ModelConfig(path="decoder.bin", config={"axes_dims_rope": list(helpers.AXES)})
    claims = Runtime().hooks.load_model(view, config)
    assert [c.model_type for c in claims] == ["flux1-dit/custom"]
    dit = claims[0].load(view, LoadRequest(config, torch.float32, "cpu"))
    reference = claims[0].load(tensors_view("bfl", dict(bfl_dit)), LoadRequest(config, torch.float32, "cpu"))
    inp = helpers.dit_inputs(batch=1)
    args = (inp["img"], inp["img_ids"], inp["txt"], inp["txt_ids"], inp["timesteps"], inp["y"], inp["guidance"])
    with torch.no_grad():
        assert torch.equal(dit(*args), reference(*args))


def test_unknown_legacy_keys_are_a_typed_error_naming_them() -> None:
    with pytest.raises(LegacyDitKeyError, match="pipe.dit.blocks.0.attn.mystery.weight"):
        convert_legacy_to_bfl_dit({"pipe.dit.blocks.0.attn.mystery.weight": torch.zeros(1)})
    with pytest.raises(LegacyDitKeyError, match="lm_head.weight"):
        split_decoder({"pipe.dit.x_embedder.weight": torch.zeros(1), "lm_head.weight": torch.zeros(1)})
