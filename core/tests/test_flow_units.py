"""The standard flow-matching units (``diffstudio.pipeline.flow_units``), through the SDK toy family that uses them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.errors import PipelineInputError, UnitGraphError
from diffstudio.pipeline.flow_units import (
    STANDARD_UNITS,
    FlowFamily,
    LatentGeometry,
    flow_unit_class,
    flow_units,
    gaussian_blur,
)
from diffstudio.pipeline.units import order_units
from diffstudio.runtime import Runtime
from diffstudio_template_sdk.testing import UnitConformance, toy, toy_plugin


def _geometry(pipe: object) -> LatentGeometry:
    return LatentGeometry(16, 4, toy.pack_latents, toy.unpack_latents, patch=1)


FAMILY = FlowFamily("fam_", _geometry, tiling=True, sigma_shift=True, inpaint_blur=True)


class TestStandardUnits(UnitConformance):
    units = tuple(flow_unit_class(name, FAMILY) for name in STANDARD_UNITS)


@pytest.fixture
def pipe(tmp_path: Path) -> toy.ToyPipeline:
    runtime = Runtime(env={}, load_entrypoints=False, plugins=[toy_plugin])
    path = toy.write_toy_checkpoint(tmp_path / "toy.safetensors", seed=3)
    loaded = toy.ToyPipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", model_configs=[ModelConfig(path=str(path))], runtime=runtime
    )
    assert isinstance(loaded, toy.ToyPipeline)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def test_family_prefix_names_every_unit_and_anchor() -> None:
    units = {unit.name: unit for unit in flow_units(FAMILY)}
    assert sorted(units) == sorted(f"fam_{name}" for name in STANDARD_UNITS)
    assert units["fam_noise"].after == ("fam_set_timesteps",)
    assert units["fam_extensions"].after == ("fam_encode_prompt",) and units["fam_extensions"].per_branch
    decode_inputs = [p.name for p in units["fam_decode"].inputs]
    assert decode_inputs[3:6] == ["tiled", "tile_size", "tile_stride"]
    assert "sigma_shift" in {p.name for p in units["fam_set_timesteps"].inputs}
    order = [unit.name for unit in order_units(list(units.values()))]
    assert order.index("fam_noise") < order.index("fam_image_ids") < order.index("fam_decode")


def test_opt_in_inputs_stay_out_by_default() -> None:
    plain = {unit.name: unit for unit in flow_units(FlowFamily("p_", _geometry))}
    assert "sigma_shift" not in {p.name for p in plain["p_set_timesteps"].inputs}
    assert "inpaint_blur_size" not in {p.name for p in plain["p_inpaint_mask"].inputs}
    assert "tiled" not in {p.name for p in plain["p_decode"].inputs}
    assert plain["p_decode"].components == ("vae",)


def test_unit_class_is_made_once_per_family() -> None:
    assert flow_unit_class("noise", FAMILY) is flow_unit_class("noise", FAMILY)
    assert type(flow_units(FAMILY, ["noise"])[0]) is flow_unit_class("noise", FAMILY)


def test_unknown_standard_unit_is_a_unit_graph_error() -> None:
    with pytest.raises(UnitGraphError, match="'encode_prompt' is not a standard flow unit"):
        flow_units(FAMILY, ["check_size", "encode_prompt"])


def test_geometry_grid_rejects_a_size_off_the_token_grid() -> None:
    geometry = _geometry(None)
    assert geometry.grid(32, 48) == (2, 3)
    with pytest.raises(PipelineInputError, match="40x48 is not a multiple of 16"):
        geometry.grid(40, 48)


def test_geometry_noise_shape_latents_or_tokens() -> None:
    packed = LatentGeometry(16, 16, toy.pack_latents, toy.unpack_latents, patch=2)
    assert packed.token_channels == 64 and packed.noise_shape(2, 3) == (16, 4, 6)
    tokens = LatentGeometry(4, 48, toy.pack_latents, toy.unpack_latents, noise_in_tokens=True)
    assert tokens.noise_shape(2, 3) == (6, 48)


def test_toy_pack_and_unpack_are_views() -> None:
    latents = torch.randn(2, 48, 3, 5)
    tokens = toy.pack_latents(latents)
    assert tokens.shape == (2, 15, 48) and tokens.data_ptr() == latents.data_ptr()
    back = toy.unpack_latents(tokens, 3, 5)
    assert back.data_ptr() == latents.data_ptr() and torch.equal(back, latents)


def test_toy_units_are_the_standard_units(pipe: toy.ToyPipeline) -> None:
    by_name = {unit.name: unit for unit in pipe.units}
    assert isinstance(by_name["noise"], toy.ToyNoise) and type(by_name["noise"]).family is toy.TOY_UNITS
    assert by_name["decode"].components == ()


def test_toy_noise_is_drawn_in_token_layout(pipe: toy.ToyPipeline) -> None:
    inputs = {"prompt": ["a", "b"], "seed": 5, "rand_device": None, "latents": None, "height": 32, "width": 48}
    out = toy.ToyNoise().process(pipe, **inputs)
    assert out["seeds"] == [5, 6] and out["latents"] is out["noise"]
    assert torch.equal(out["noise"], pipe.generate_noise((8 * 12, toy.CHANNELS), [5, 6]))


def test_toy_decode_equals_unpatchify(pipe: toy.ToyPipeline) -> None:
    tokens = torch.randn(1, 8 * 12, toy.CHANNELS, generator=torch.Generator().manual_seed(0))
    out = pipe(["a"], latents=tokens, height=32, width=48, num_inference_steps=1, output_type="pt")
    final = pipe(["a"], latents=tokens, height=32, width=48, num_inference_steps=1, output_type="latent")
    assert torch.equal(out, ((toy.unpatchify(final, 32, 48) + 1) / 2).clamp(0, 1))


def test_given_latents_of_the_wrong_shape_are_a_typed_error(pipe: toy.ToyPipeline) -> None:
    with pytest.raises(PipelineInputError, match=r"latents= has shape \(1, 5, 48\); expected \(1 or 1, 96, 48\)"):
        pipe("a", latents=torch.zeros(1, 5, 48), height=32, width=48, num_inference_steps=1)


def test_gaussian_blur_keeps_a_constant_image() -> None:
    ones = torch.ones(1, 1, 6, 7)
    assert torch.allclose(gaussian_blur(ones, 3, 1.0), ones)
