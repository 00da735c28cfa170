"""Flex.2 in ``FluxImagePipeline``: the DiT's 196-channel input equals, element by element, an oracle transcribed
from the published packing (DiffSynth-Studio's ``FluxImageUnit_Flex`` and the Flex branch of ``model_fn_flux_image``),
for inpainting, control and both, with the control stopping at 0, 0.5 and 1 of the schedule; bad input is typed."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from einops import rearrange
from PIL import Image

SIZE, STEPS = 32, 3


# --- the oracle ------------------------------------------------------------------------------------------------


def _preprocess(image: Image.Image) -> torch.Tensor:
    """DiffSynth's ``preprocess_image``: PIL -> ``(1, C, H, W)`` in ``[-1, 1]``."""
    array = np.asarray(image, dtype=np.float32)
    array = array[..., None] if array.ndim == 2 else array
    return torch.from_numpy(array / 127.5 - 1).permute(2, 0, 1)[None]


def oracle_dit_input(latents, timestep, timesteps, encode, inpaint_image=None, inpaint_mask=None, control_image=None,
                     strength=0.5, stop=0.5):  # fmt: skip
    """What Flex.2's ``img_in`` receives on one call: ``(1, L, 196)``.

    ``latents`` ``(1, 16, H/8, W/8)`` are the call's noisy latents, ``timestep`` in [0, 1000] its time, ``timesteps``
    the schedule, ``encode(pixels)`` the VAE. The mask is resized with bilinear filtering (diffstudio's choice).
    """
    if inpaint_image is None:
        inpaint = torch.zeros_like(latents)
    else:
        inpaint = encode(_preprocess(inpaint_image))
    if inpaint_mask is None:
        mask = torch.ones_like(latents)[:, 0:1, :, :]
    else:
        mask = inpaint_mask.resize((latents.shape[3], latents.shape[2]), Image.Resampling.BILINEAR)
        mask = (_preprocess(mask)[:, 0:1, :, :] + 1) / 2
    inpaint = inpaint * (1 - mask)
    control = torch.zeros_like(latents) if control_image is None else encode(_preprocess(control_image)) * strength
    condition = torch.concat([inpaint, mask, control], dim=1)
    uncondition = torch.concat([inpaint, mask, torch.zeros_like(control)], dim=1)
    stop_timestep = timesteps[int(stop * (len(timesteps) - 1))]
    hidden = torch.concat([latents, condition if timestep >= stop_timestep else uncondition], dim=1)
    return rearrange(hidden, "B C (H P) (W Q) -> B (H W) (C P Q)", P=2, Q=2)


# --- helpers ---------------------------------------------------------------------------------------------------


def _mask(seed: int, size: int = SIZE) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    values = (torch.rand(size, size, generator=gen) > 0.5).float() * 255
    return Image.fromarray(values.numpy().astype("uint8"), mode="L")


def _run(pipe, **flex: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run the pipeline; return what img_in received on each call and the schedule."""
    seen: list[torch.Tensor] = []
    handle = pipe.dit.img_in.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        pipe("a red circle", seed=0, height=SIZE, width=SIZE, num_inference_steps=STEPS, t5_sequence_length=16,
             output_type="latent", **flex)  # fmt: skip
    finally:
        handle.remove()
    return seen, pipe.scheduler.timesteps.clone()


def _encoder(pipe):
    return lambda pixels: pipe.encode_image(pixels)


CASES = {
    "inpaint": lambda fp: {"flex_inpaint_image": fp.image(SIZE, SIZE, 1), "flex_inpaint_mask": _mask(2)},
    "control": lambda fp: {"flex_control_image": fp.image(SIZE, SIZE, 3)},
    "both": lambda fp: {"flex_inpaint_image": fp.image(SIZE, SIZE, 1), "flex_inpaint_mask": _mask(2),
                        "flex_control_image": fp.image(SIZE, SIZE, 3), "flex_control_strength": 0.8},
}  # fmt: skip


@pytest.mark.parametrize(
    ("case", "stop"), [("inpaint", 0.5), *((c, s) for c in ("control", "both") for s in (0.0, 0.5, 1.0))]
)
def test_dit_input_equals_the_published_packing(flex_pipe, fp, case, stop):
    flex = {**CASES[case](fp), "flex_control_stop": stop}
    seen, timesteps = _run(flex_pipe, **flex)
    assert len(seen) == STEPS
    grid = SIZE // flex_pipe.spatial_factor
    strength = flex.pop("flex_control_strength", 0.5)
    flex.pop("flex_control_stop")
    kwargs = {k.replace("flex_", ""): v for k, v in flex.items()}
    for step, got in enumerate(seen):
        latents = rearrange(got[..., :64], "B (H W) (C P Q) -> B C (H P) (W Q)", H=grid, P=2, Q=2)
        expected = oracle_dit_input(latents, timesteps[step], timesteps, _encoder(flex_pipe), strength=strength,
                                    stop=stop, **kwargs)  # fmt: skip
        assert got.shape == expected.shape == (1, grid * grid, 196)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    control = [bool(s[..., 132:].abs().max() > 0) for s in seen]
    if "control_image" in kwargs:
        assert control == [i <= int(stop * (STEPS - 1)) for i in range(STEPS)]
    else:
        assert not any(control)


def test_without_flex_inputs_the_dit_gets_the_default_conditions(flex_pipe):
    seen, timesteps = _run(flex_pipe)
    grid = SIZE // flex_pipe.spatial_factor
    for step, got in enumerate(seen):
        latents = rearrange(got[..., :64], "B (H W) (C P Q) -> B C (H P) (W Q)", H=grid, P=2, Q=2)
        torch.testing.assert_close(got, oracle_dit_input(latents, timesteps[step], timesteps, None), rtol=0, atol=0)
    assert torch.equal(seen[0][..., 128:132], torch.ones_like(seen[0][..., 128:132]))  # mask: repaint everything


def test_the_known_region_is_not_blended_back(flex_pipe, fp):
    """The model inpaints by itself: the result is the plain sampler's, with no blend of the known region."""
    flex = CASES["inpaint"](fp)
    with torch.no_grad():
        flex_out = flex_pipe("a red circle", seed=0, height=SIZE, width=SIZE, num_inference_steps=2,
                             t5_sequence_length=16, output_type="latent", **flex)  # fmt: skip
    state = flex_pipe.prepare(flex_pipe.call_inputs("a red circle", seed=0, height=SIZE, width=SIZE,
                                                    num_inference_steps=2, t5_sequence_length=16, **flex))  # fmt: skip
    assert state.shared.get("inpaint_mask") is None and state.shared.get("input_latents") is None
    assert torch.isfinite(flex_out).all()


# --- bad input -------------------------------------------------------------------------------------------------


def test_a_mask_of_another_size_is_resized_with_a_warning(flex_pipe, fp):
    from diffstudio_flex.units import FlexInputResizedWarning

    flex = {"flex_inpaint_image": fp.image(SIZE, SIZE, 1), "flex_inpaint_mask": _mask(2, size=48)}
    with pytest.warns(FlexInputResizedWarning, match="flex_inpaint_mask"):
        seen, timesteps = _run(flex_pipe, **flex)
    grid = SIZE // flex_pipe.spatial_factor
    latents = rearrange(seen[0][..., :64], "B (H W) (C P Q) -> B C (H P) (W Q)", H=grid, P=2, Q=2)
    inpaint = {"inpaint_image": flex["flex_inpaint_image"], "inpaint_mask": flex["flex_inpaint_mask"]}
    expected = oracle_dit_input(latents, timesteps[0], timesteps, _encoder(flex_pipe), **inpaint)
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("flex", "match"),
    [
        ({"flex_control_stop": 1.5}, "flex_control_stop"),
        ({"flex_control_stop": -0.1}, "flex_control_stop"),
        ({"flex_control_strength": float("nan")}, "flex_control_strength"),
        ({"flex_inpaint_mask": "colour"}, "flex_inpaint_mask.*single-channel"),
        ({"flex_inpaint_mask": "alone"}, "flex_inpaint_mask needs flex_inpaint_image"),
        ({"flex_inpaint_image": "alone"}, "flex_inpaint_image needs flex_inpaint_mask"),
    ],
)
def test_bad_flex_input_is_a_typed_error_naming_the_argument(flex_pipe, fp, flex, match):
    from diffstudio.errors import PipelineInputError

    image = fp.image(SIZE, SIZE, 1)
    if flex.get("flex_inpaint_mask") == "colour":
        flex = {"flex_inpaint_image": image, "flex_inpaint_mask": fp.image(SIZE, SIZE, 5)}
    elif flex.get("flex_inpaint_mask") == "alone":
        flex = {"flex_inpaint_mask": _mask(2)}
    elif flex.get("flex_inpaint_image") == "alone":
        flex = {"flex_inpaint_image": image}
    with pytest.raises(PipelineInputError, match=match):
        flex_pipe("a red circle", seed=0, height=SIZE, width=SIZE, num_inference_steps=1, t5_sequence_length=16,
                  output_type="latent", **flex)  # fmt: skip


def test_a_grey_mask_stored_as_rgb_is_accepted(flex_pipe, fp):
    mask = _mask(2)
    seen_l, _ = _run(flex_pipe, flex_inpaint_image=fp.image(SIZE, SIZE, 1), flex_inpaint_mask=mask)
    seen_rgb, _ = _run(flex_pipe, flex_inpaint_image=fp.image(SIZE, SIZE, 1), flex_inpaint_mask=mask.convert("RGB"))
    assert torch.equal(seen_l[0][..., 64:], seen_rgb[0][..., 64:])


def test_a_control_image_without_a_vae_is_a_typed_error(flex_repo, fp):
    from diffstudio import ModelConfig
    from diffstudio.errors import PipelineInputError
    from diffstudio.runtime import Runtime
    from diffstudio_flux1 import FluxImagePipeline

    paths = [p for p in flex_repo.paths() if not p.endswith("vae")]
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", runtime=Runtime(),
                                             model_configs=[ModelConfig(path=p) for p in paths])  # fmt: skip
    from diffstudio_flex.units import FlexConditioning

    # FLUX.1's own image units need the VAE too, so the unit is called directly with what they would leave
    inputs = {"flex_control_image": fp.image(SIZE, SIZE, 3), "timesteps": torch.linspace(1000, 250, 4),
              "height": SIZE, "width": SIZE}  # fmt: skip
    with pytest.raises(PipelineInputError, match="flex_control_image needs the VAE"):
        FlexConditioning().process(pipe, **inputs)


def test_flex_inputs_on_another_dit_name_the_distribution(repo, fp):
    from diffstudio import ModelConfig
    from diffstudio.errors import PipelineInputError
    from diffstudio.runtime import Runtime
    from diffstudio_flux1 import FluxImagePipeline

    pipe = FluxImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", runtime=Runtime(),
        model_configs=[ModelConfig(path=str(repo.root / n)) for n in ("flux1-dev.safetensors", "vae", "text_encoder",
                                                                       "text_encoder_2")],
    )  # fmt: skip
    with pytest.raises(PipelineInputError, match=r"flex_control_image is an input of Flex.2 \(diffstudio-flex\)"):
        pipe("a red circle", seed=0, height=SIZE, width=SIZE, num_inference_steps=1, t5_sequence_length=16,
             output_type="latent", flex_control_image=fp.image(SIZE, SIZE, 3))  # fmt: skip
    out = pipe(
        "a red circle",
        seed=0,
        height=SIZE,
        width=SIZE,
        num_inference_steps=1,
        t5_sequence_length=16,
        output_type="latent",
    )  # the unit stays out of the way of other DiTs
    assert out.shape[-1] == 64


# --- without the plugin ----------------------------------------------------------------------------------------


def _without_flex(flex_repo):
    from diffstudio import ModelConfig
    from diffstudio.runtime import Runtime
    from diffstudio_flux1 import FluxImagePipeline

    runtime = Runtime(env={"DIFFSTUDIO_DISABLED_PLUGINS": "flex"})
    configs = [ModelConfig(path=p) for p in flex_repo.paths()]
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", runtime=runtime,
                                             model_configs=configs)  # fmt: skip


def test_seed_arguments_without_the_plugin_name_the_distribution(flex_repo, fp):
    from diffstudio.errors import MissingPluginError

    pipe = _without_flex(flex_repo)
    with pytest.raises(
        MissingPluginError, match="'flex_control_image' needs the plugin distribution 'diffstudio-flex'"
    ):
        pipe("a red circle", seed=0, height=SIZE, width=SIZE, num_inference_steps=1, t5_sequence_length=16,
             flex_control_image=fp.image(SIZE, SIZE, 3))  # fmt: skip


def test_a_196_channel_dit_without_the_plugin_names_the_distribution(flex_repo):
    from diffstudio.errors import MissingPluginError

    pipe = _without_flex(flex_repo)
    with pytest.raises(MissingPluginError, match="196 input channels.*'diffstudio-flex'"):
        pipe("a red circle", seed=0, height=SIZE, width=SIZE, num_inference_steps=1, t5_sequence_length=16,
             output_type="latent")  # fmt: skip


def test_the_plugin_shows_in_diffstudio_plugins():
    from diffstudio.runtime import Runtime

    statuses = {s.name: s for s in Runtime().statuses}
    assert "flex" in statuses and statuses["flex"].distribution.startswith("diffstudio-flex")
