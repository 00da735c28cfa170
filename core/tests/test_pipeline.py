"""The base pipeline, exercised through the toy family of the test kit."""

from __future__ import annotations

import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffstudio import ModelConfig, hookimpl
from diffstudio.errors import (
    AmbiguousCheckpointError,
    MissingPluginError,
    PipelineInputError,
    UnitGraphError,
    UnknownCheckpointError,
)
from diffstudio.pipeline.base import BasePipeline, WrongFamilyError
from diffstudio.pipeline.units import InputParam, OutputParam, PipelineUnit
from diffstudio.runtime import Runtime
from diffstudio.types import ModelClaim
from diffstudio_template_sdk.testing import FamilyConformance, UnitConformance, toy, toy_plugin
from PIL import Image


@pytest.fixture
def toy_file(tmp_path: Path) -> Path:
    return toy.write_toy_checkpoint(tmp_path / "toy.safetensors", seed=3)


@pytest.fixture
def runtime() -> Runtime:
    return Runtime(env={}, load_entrypoints=False, plugins=[toy_plugin])


@pytest.fixture
def pipe(runtime: Runtime, toy_file: Path) -> toy.ToyPipeline:
    loaded = toy.ToyPipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", model_configs=[ModelConfig(path=str(toy_file))], runtime=runtime
    )
    assert isinstance(loaded, toy.ToyPipeline)
    loaded.set_progress_bar_config(disable=True)
    return loaded


class TestToyFamily(FamilyConformance):
    plugin_module = "diffstudio_template_sdk.testing.toy_plugin"
    family = "toy"

    def make_checkpoint(self, tmp_path: Path) -> Path:
        return toy.write_toy_checkpoint(tmp_path / "toy.safetensors")


class TestToyUnits(UnitConformance):
    units = (toy.ToyCheckSize, toy.ToyEncodePrompt, toy.ToySetTimesteps, toy.ToyNoise, toy.ToyDecode)


def test_plan_of_units(pipe: toy.ToyPipeline) -> None:
    assert [u.name for u in pipe.units] == ["check_size", "encode_prompt", "set_timesteps", "noise", "decode"]
    assert pipe.unit_owner("noise") == "diffstudio_template_sdk.testing.toy_plugin"


def test_generates_a_pil_image_and_records_seed(pipe: toy.ToyPipeline) -> None:
    image = pipe("a red circle", seed=7, height=32, width=48, num_inference_steps=3)
    assert isinstance(image, Image.Image) and image.size == (48, 32)
    assert pipe.last_run.seeds == [7]


def test_same_seed_same_image_and_batch_uses_seed_plus_i(pipe: toy.ToyPipeline) -> None:
    a = pipe("x", seed=5, output_type="pt")
    batch = pipe(["x", "x"], seed=4, output_type="pt")
    assert pipe.last_run.seeds == [4, 5]
    torch.testing.assert_close(batch[1:2], a, rtol=0, atol=0)
    assert not torch.equal(batch[0], batch[1])


def test_output_types(pipe: toy.ToyPipeline) -> None:
    arr = pipe(["a", "b"], seed=0, output_type="np")
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 32, 32, 3) and 0 <= arr.min() and arr.max() <= 1
    lat = pipe("a", seed=0, output_type="latent")
    assert lat.shape == (1, 64, 48)
    pil_list = pipe(["a"], seed=0)
    assert isinstance(pil_list, list) and len(pil_list) == 1
    with pytest.raises(PipelineInputError, match="output_type"):
        pipe("a", output_type="jpeg")


def test_latents_argument_replaces_noise(pipe: toy.ToyPipeline) -> None:
    noise = pipe.generate_noise((64, 48), [11])
    a = pipe("a", latents=noise.clone(), output_type="latent", seed=999)
    b = pipe("a", seed=11, output_type="latent")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_explicit_sigmas_set_step_count(pipe: toy.ToyPipeline) -> None:
    calls: list[int] = []

    def callback(p: BasePipeline, index: int, timestep: torch.Tensor, kw: Mapping[str, Any]) -> dict[str, Any]:
        calls.append(index)
        return {}

    pipe("a", seed=0, sigmas=[1.0, 0.5], callback_on_step_end=callback)
    assert calls == [0, 1]


def test_callback_can_replace_latents(pipe: toy.ToyPipeline) -> None:
    def zero(p: BasePipeline, index: int, timestep: torch.Tensor, kw: Mapping[str, Any]) -> dict[str, Any]:
        return {"latents": torch.zeros_like(kw["latents"])}

    out = pipe("a", seed=0, output_type="latent", callback_on_step_end=zero)
    assert torch.count_nonzero(out) == 0


def test_cfg_runs_negative_branch(pipe: toy.ToyPipeline) -> None:
    plain = pipe("a", seed=1, output_type="latent")
    guided = pipe("a", negative_prompt="blurry", cfg_scale=3.0, seed=1, output_type="latent")
    same_neg = pipe("a", negative_prompt="a", cfg_scale=3.0, seed=1, output_type="latent")
    assert not torch.allclose(plain, guided)
    torch.testing.assert_close(same_neg, plain, rtol=1e-5, atol=1e-5)


def test_size_must_be_multiple_of_16(pipe: toy.ToyPipeline) -> None:
    with pytest.raises(PipelineInputError, match="height=30 is not a positive multiple of 16; use e.g. 16 or 32"):
        pipe("a", height=30)


def test_unknown_argument_lists_accepted(pipe: toy.ToyPipeline) -> None:
    with pytest.raises(PipelineInputError, match="unknown argument 'colour'.*Accepted:.*prompt"):
        pipe("a", colour="red")


def test_known_plugin_input_names_distribution(pipe: toy.ToyPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(toy.ToyPipeline, "plugin_inputs", {"controlnet_inputs": "diffstudio-controlnet"})
    with pytest.raises(MissingPluginError, match="pip install diffstudio-controlnet"):
        pipe("a", controlnet_inputs=[object()])


def test_progress_bar_receives_every_step(pipe: toy.ToyPipeline) -> None:
    seen: list[int] = []

    def bar(iterable: Any) -> Any:
        for item in iterable:
            seen.append(item)
            yield item

    pipe("a", num_inference_steps=3, progress_bar_cmd=bar)
    assert seen == [0, 1, 2]


class _Extra(PipelineUnit):
    name = "extra"
    description = "adds an output after the noise"
    after = ("noise",)
    inputs = (InputParam("extra_scale", "multiplies the latents"),)
    outputs = (OutputParam("latents", "scaled latents", optional=True),)

    def process(self, pipe: Any, **inputs: Any) -> Mapping[str, Any]:
        return {}


class _Broken(PipelineUnit):
    name = "broken"
    description = "forgets to write its declared output"
    after = ("noise",)
    outputs = (OutputParam("something", "never written"),)

    def process(self, pipe: Any, **inputs: Any) -> Mapping[str, Any]:
        return {}


def _unit_plugin(unit: PipelineUnit) -> types.ModuleType:
    module = types.ModuleType(f"units_{unit.name}")

    def pipeline_unit(pipeline: BasePipeline) -> list[PipelineUnit]:
        return [unit] if pipeline.family == "toy" else []

    module.pipeline_unit = hookimpl(pipeline_unit)  # type: ignore[attr-defined]
    return module


def test_adapter_unit_is_ordered_and_its_input_accepted(pipe: toy.ToyPipeline) -> None:
    pipe.runtime.register(_unit_plugin(_Extra()))
    pipe._units = None
    assert [u.name for u in pipe.units].index("extra") == 4
    pipe("a", extra_scale=2.0)


def test_declared_output_not_written_is_an_error(pipe: toy.ToyPipeline) -> None:
    pipe.runtime.register(_unit_plugin(_Broken()))
    pipe._units = None
    with pytest.raises(UnitGraphError, match="'broken' did not write its declared outputs"):
        pipe("a")


def test_unknown_checkpoint_error_names_file_keys_and_families(runtime: Runtime, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "mystery.safetensors"
    save_file({"encoder.layers.0.weight": torch.zeros(4, 4), "decoder.out.bias": torch.zeros(4)}, str(path))
    with pytest.raises(UnknownCheckpointError) as info:
        toy.ToyPipeline.from_pretrained(model_configs=[ModelConfig(path=str(path))], runtime=runtime, device="cpu")
    message = str(info.value)
    assert "mystery.safetensors" in message and "encoder.layers.0.weight" in message
    assert "diffstudio_template_sdk.testing.toy_plugin" in message


def test_two_claims_are_an_ambiguity_error(runtime: Runtime, toy_file: Path) -> None:
    rival = types.ModuleType("rival_family")

    def load_model(checkpoint: Any, config: Any) -> ModelClaim | None:
        return ModelClaim("rival", "rival-dit", "dit", "rival", lambda c, r: None) if "img_in.weight" in checkpoint \
            else None

    rival.load_model = hookimpl(load_model)  # type: ignore[attr-defined]
    runtime.register(rival)
    with pytest.raises(AmbiguousCheckpointError) as info:
        toy.ToyPipeline.from_pretrained(model_configs=[ModelConfig(path=str(toy_file))], runtime=runtime)
    assert "rival_family" in str(info.value) and "toy_plugin" in str(info.value)


def test_checkpoint_of_another_family_names_it(toy_file: Path) -> None:
    class OtherPipeline(toy.ToyPipeline):
        family = "other"

    runtime = Runtime(env={}, load_entrypoints=False, plugins=[toy_plugin])
    with pytest.raises(WrongFamilyError, match="'toy' family"):
        OtherPipeline.from_pretrained(model_configs=[ModelConfig(path=str(toy_file))], runtime=runtime)


def test_negative_vram_limit_rejected(runtime: Runtime) -> None:
    with pytest.raises(PipelineInputError, match="vram_limit"):
        toy.ToyPipeline.from_pretrained(vram_limit=-1, runtime=runtime)


def test_registered_pipelines_and_lookup(runtime: Runtime) -> None:
    spec = runtime.hooks.pipelines().get("toy")
    assert spec.factory() is toy.ToyPipeline
