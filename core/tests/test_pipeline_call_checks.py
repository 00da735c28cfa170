"""Pipeline call checks (issue 21.5-21.7) and the diffusers names (issue 22.2, 22.11), on the toy family."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.errors import ConfigError, LimitExceededError, NonFiniteOutputError, PipelineInputError
from diffstudio.pipeline.diffusers_api import PipelineOutput
from diffstudio.pipeline.limits import Limits
from diffstudio.runtime import Runtime
from diffstudio_template_sdk.testing import toy, toy_plugin
from PIL import Image

SMALL = {"height": 16, "width": 16, "num_inference_steps": 1}


@pytest.fixture
def runtime() -> Runtime:
    return Runtime(env={}, load_entrypoints=False, plugins=[toy_plugin])


@pytest.fixture
def toy_file(tmp_path: Path) -> Path:
    return toy.write_toy_checkpoint(tmp_path / "toy.safetensors", seed=3)


@pytest.fixture
def pipe(runtime: Runtime, toy_file: Path) -> toy.ToyPipeline:
    loaded = toy.ToyPipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", model_configs=[ModelConfig(path=str(toy_file))], runtime=runtime
    )
    assert isinstance(loaded, toy.ToyPipeline)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` but whose pixel data is cut short (decoding fails)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    return path


# ---------------------------------------------------------------------------------------------------------------
# 21.5: prompts of other types
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [None, 123, b"a cat", 1.5, {"a": 1}])
def test_prompt_none_int_bytes_are_typed_errors(pipe: toy.ToyPipeline, prompt: object) -> None:
    with pytest.raises(PipelineInputError, match=r"prompt=.* pass a str or a non-empty list of str"):
        pipe(prompt, **SMALL)


def test_prompt_list_holding_none_names_the_entry(pipe: toy.ToyPipeline) -> None:
    with pytest.raises(PipelineInputError, match=r"prompt\[1\]=None is a NoneType; pass a str"):
        pipe(["a", None], **SMALL)
    with pytest.raises(PipelineInputError, match=r"prompt=\[\] holds no prompt"):
        pipe([], **SMALL)


def test_negative_prompt_none_means_empty(pipe: toy.ToyPipeline) -> None:
    none = pipe("a", negative_prompt=None, cfg_scale=2.0, seed=1, output_type="pt", **SMALL)
    empty = pipe("a", negative_prompt="", cfg_scale=2.0, seed=1, output_type="pt", **SMALL)
    torch.testing.assert_close(none, empty, rtol=0, atol=0)
    with pytest.raises(PipelineInputError, match=r"negative_prompt=3 is an int"):
        pipe("a", negative_prompt=3, **SMALL)


def test_prompt_with_a_lone_surrogate_is_a_typed_error(pipe: toy.ToyPipeline) -> None:
    with pytest.raises(PipelineInputError, match="not valid Unicode"):
        pipe("a\ud800", **SMALL)


# ---------------------------------------------------------------------------------------------------------------
# 21.6: values accepted silently before
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "4", True])
def test_cfg_scale_nan_is_refused(pipe: toy.ToyPipeline, value: object) -> None:
    with pytest.raises(PipelineInputError, match="cfg_scale="):
        pipe("a", cfg_scale=value, **SMALL)


@pytest.mark.parametrize("seed", [1.5, True, "3", -1, 2**64])
def test_seed_float_bool_and_out_of_range_are_refused(pipe: toy.ToyPipeline, seed: object) -> None:
    with pytest.raises(PipelineInputError, match="seed="):
        pipe("a", seed=seed, **SMALL)


def test_seed_range_counts_the_batch(pipe: toy.ToyPipeline) -> None:
    pipe("a", seed=2**64 - 1, output_type="latent", **SMALL)
    with pytest.raises(PipelineInputError, match=r"outside \[0, 2\*\*64 - 2\] for 2 image"):
        pipe(["a", "b"], seed=2**64 - 1, **SMALL)


def test_zero_by_zero_input_image_is_refused(pipe: toy.ToyPipeline) -> None:
    # the toy family has no image unit: the check is generic, on every PIL image argument, before unknown names
    with pytest.raises(PipelineInputError, match=r"input_image is 0 x 0 pixels"):
        pipe("a", input_image=Image.new("RGB", (0, 0)), **SMALL)
    with pytest.raises(PipelineInputError, match=r"edit_image\[1\] is 5 x 0 pixels"):
        pipe("a", edit_image=[Image.new("RGB", (4, 4)), Image.new("RGB", (5, 0))], **SMALL)


def test_nan_weights_give_a_non_finite_output_error(pipe: toy.ToyPipeline) -> None:
    with torch.no_grad():
        next(pipe.dit.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteOutputError, match=r"after denoising step 1: the weights may contain NaN/Inf"):
        pipe("a", seed=0, num_inference_steps=3, height=16, width=16)


def test_decoded_nan_images_are_refused() -> None:
    from diffstudio.pipeline.images import convert_output

    images = torch.zeros(1, 3, 4, 4)
    images[0, 1, 2, 3] = float("inf")
    with pytest.raises(NonFiniteOutputError, match="in the decoded images"):
        convert_output(images, "pil", True)


def test_callback_returning_garbage_is_a_typed_error(pipe: toy.ToyPipeline) -> None:
    with pytest.raises(PipelineInputError, match="callback_on_step_end returned a list"):
        pipe("a", callback_on_step_end=lambda *a: [1], **SMALL)
    with pytest.raises(PipelineInputError, match="must keep the shape"):
        pipe("a", callback_on_step_end=lambda p, i, t, kw: {"latents": torch.zeros(1)}, **SMALL)
    with pytest.raises(PipelineInputError, match="not callable"):
        pipe("a", callback_on_step_end=3, **SMALL)


# ---------------------------------------------------------------------------------------------------------------
# 21.7: limits, checked before allocating
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "limit"),
    [
        ({"height": 65536, "width": 65536}, "max_pixels"),
        ({"num_inference_steps": 10**9}, "max_steps"),
        ({"sigmas": [0.5] * 1001}, "max_steps"),
        ({"max_sequence_length": 10**6}, "max_sequence_length"),
        ({"t5_sequence_length": 10**6}, "max_sequence_length"),
    ],
)
def test_limits_refuse_before_allocating(pipe: toy.ToyPipeline, arguments: dict[str, object], limit: str) -> None:
    with pytest.raises(LimitExceededError, match=rf"above the limit {limit}=.*DIFFSTUDIO_{limit.upper()}=N"):
        pipe("a", **{**SMALL, **arguments})


def test_8000px_edit_image_is_refused_from_its_header(pipe: toy.ToyPipeline, tmp_path: Path) -> None:
    image = Image.open(_png_header(tmp_path / "big.png", 8000, 8000))  # decoding it would fail: truncated
    with pytest.raises(LimitExceededError, match=r"edit_image \(8000 x 8000\) is 64,000,000.*max_input_pixels"):
        pipe("a", edit_image=image, **SMALL)


def test_too_many_images_is_refused(pipe: toy.ToyPipeline) -> None:
    pipe.limits.max_batch = 4
    with pytest.raises(LimitExceededError, match="max_batch=4"):
        pipe(["a"] * 5, **SMALL)
    with pytest.raises(LimitExceededError, match="max_batch=4"):
        pipe(["a", "b"], num_images_per_prompt=3, **SMALL)


def test_limits_are_overridable_by_env_and_attribute(pipe: toy.ToyPipeline) -> None:
    limits = Limits.from_env({"DIFFSTUDIO_MAX_STEPS": "2_000", "DIFFSTUDIO_MAX_PIXELS": "256"})
    assert (limits.max_steps, limits.max_pixels, limits.max_batch) == (2000, 256, Limits().max_batch)
    pipe.limits = limits
    with pytest.raises(LimitExceededError, match="max_pixels=256"):
        pipe("a", height=32, width=16, num_inference_steps=1)
    pipe.limits.max_pixels = 32 * 16
    assert pipe("a", height=32, width=16, num_inference_steps=1, output_type="latent").shape[0] == 1


@pytest.mark.parametrize("raw", ["many", "0", "-5", "1e9"])
def test_bad_limit_env_value_is_a_config_error(raw: str) -> None:
    with pytest.raises(ConfigError, match=r"DIFFSTUDIO_MAX_PIXELS=.* is not a positive integer"):
        Limits.from_env({"DIFFSTUDIO_MAX_PIXELS": raw})


# ---------------------------------------------------------------------------------------------------------------
# 22.2: from_pretrained arguments
# ---------------------------------------------------------------------------------------------------------------


def test_from_pretrained_path_first_is_a_repository_not_a_dtype(runtime: Runtime, toy_file: Path) -> None:
    pipe = toy.ToyPipeline.from_pretrained(str(toy_file), torch_dtype=torch.float32, device="cpu", runtime=runtime)
    assert pipe.has("dit") and pipe.torch_dtype == torch.float32
    with pytest.raises(ConfigError, match="no such file or folder"):
        toy.ToyPipeline.from_pretrained("/path/to/repo", runtime=runtime)


def test_from_pretrained_keeps_the_seed_positional_form(runtime: Runtime, toy_file: Path) -> None:
    pipe = toy.ToyPipeline.from_pretrained(torch.float64, "cpu", [ModelConfig(path=str(toy_file))], runtime=runtime)
    assert pipe.torch_dtype == torch.float64 and pipe.has("dit")
    with pytest.raises(ConfigError, match="both by position and by name"):
        toy.ToyPipeline.from_pretrained(torch.float64, torch_dtype=torch.float32, runtime=runtime)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"torch_dtype": "/path/to/repo"}, "torch_dtype='/path/to/repo' is not a known dtype"),
        ({"torch_dtype": torch.int8}, "torch_dtype=torch.int8 is not a floating-point dtype"),
        ({"torch_dtype": 16}, "torch_dtype=16 is a int, not a dtype"),
        ({"device": 0}, "device=0 is a int, not a device"),
        ({"device": "gpu"}, "device='gpu' is not a known device"),
        ({"model_configs": "model.safetensors"}, "model_configs='model.safetensors' is not a list of ModelConfig"),
        ({"model_configs": ["model.safetensors"]}, r"model_configs\[0\] is a str, not a ModelConfig"),
        ({"variant": "fp16"}, r"unknown argument\(s\) \['variant'\]"),
    ],
)
def test_from_pretrained_type_checks_dtype_device_and_configs(
    runtime: Runtime, arguments: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        toy.ToyPipeline.from_pretrained(runtime=runtime, **arguments)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_from_pretrained_cuda_on_a_cpu_build_is_a_config_error(runtime: Runtime) -> None:
    with pytest.raises(ConfigError, match="device='cuda'.*no usable CUDA device"):
        toy.ToyPipeline.from_pretrained(device="cuda", runtime=runtime)


# ---------------------------------------------------------------------------------------------------------------
# 22.11: diffusers names
# ---------------------------------------------------------------------------------------------------------------


def test_generator_is_the_seed_of_its_initial_state(pipe: toy.ToyPipeline) -> None:
    by_seed = pipe("a", seed=11, output_type="pt", **SMALL)
    by_generator = pipe("a", generator=torch.Generator().manual_seed(11), output_type="pt", **SMALL)
    torch.testing.assert_close(by_generator, by_seed, rtol=0, atol=0)
    assert pipe.last_run.seeds == [11]
    with pytest.raises(PipelineInputError, match="pass seed= or generator=, not both"):
        pipe("a", seed=1, generator=torch.Generator().manual_seed(11), **SMALL)
    with pytest.raises(PipelineInputError, match="generator= is a list"):
        pipe("a", generator=[torch.Generator()], **SMALL)


def test_guidance_scale_alias_and_its_primary_together_are_refused(pipe: toy.ToyPipeline) -> None:
    aliased = pipe("a", guidance_scale=3.0, seed=2, output_type="pt", **SMALL)
    primary = pipe("a", cfg_scale=3.0, seed=2, output_type="pt", **SMALL)
    torch.testing.assert_close(aliased, primary, rtol=0, atol=0)
    with pytest.raises(PipelineInputError, match="guidance_scale= is the diffusers name of cfg_scale="):
        pipe("a", guidance_scale=3.0, cfg_scale=3.0, **SMALL)


def test_num_images_per_prompt_and_return_dict(pipe: toy.ToyPipeline) -> None:
    out = pipe(["a", "b"], num_images_per_prompt=2, seed=5, return_dict=True, **SMALL)
    assert isinstance(out, PipelineOutput) and len(out.images) == 4 and out.seeds == [5, 6, 7, 8]
    assert out[0] is out.images
    single = pipe("a", seed=5, return_dict=True, **SMALL)
    assert isinstance(single.images, list) and isinstance(single.images[0], Image.Image)
    (images,) = pipe("a", seed=5, return_dict=False, **SMALL)
    assert isinstance(images, list) and len(images) == 1
    with pytest.raises(PipelineInputError, match="num_images_per_prompt=0"):
        pipe("a", num_images_per_prompt=0, **SMALL)


def test_callback_on_step_end_has_the_diffusers_signature(pipe: toy.ToyPipeline) -> None:
    seen: list[tuple[object, int, list[str]]] = []

    def callback(p: object, step: int, timestep: torch.Tensor, kwargs: dict[str, torch.Tensor]) -> dict[str, object]:
        seen.append((p, step, sorted(kwargs)))
        return {}

    pipe("a", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"], **SMALL)
    assert seen == [(pipe, 0, ["latents"])]
    with pytest.raises(PipelineInputError, match="callback_on_step_end_tensor_inputs"):
        pipe("a", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"], **SMALL)


def test_pipe_to_moves_components_and_checks_the_device(pipe: toy.ToyPipeline) -> None:
    assert pipe.to("cpu", torch.float64) is pipe
    assert pipe.torch_dtype == torch.float64 and next(pipe.dit.parameters()).dtype == torch.float64
    assert pipe("a", seed=0, output_type="latent", **SMALL).dtype == torch.float64
    with pytest.raises(ConfigError, match="to\\(3\\)"):
        pipe.to(3)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no usable CUDA device"):
            pipe.to("cuda")


@pytest.mark.parametrize("limit", [float("nan"), float("inf")])
def test_non_finite_vram_limit_is_refused(runtime: Runtime, limit: float) -> None:
    # found by tests/fuzz/test_fuzz_call_args.py: NaN passed the "< 0" check
    with pytest.raises(PipelineInputError, match="must be a finite number >= 0"):
        toy.ToyPipeline.from_pretrained(vram_limit=limit, runtime=runtime)
