"""The ``flex_conditioning`` unit of ``FluxImagePipeline``: Flex.2's inpainting and control channels.

It runs whenever the loaded DiT has 196 input channels, with or without Flex inputs (the model always needs its
132 conditioning channels: zeros / ones / zeros by default, see :mod:`diffstudio_flex.conditioning`). Inputs:

* ``flex_inpaint_image`` + ``flex_inpaint_mask`` (PIL, given together): the image is resized to the generated
  size (Lanczos) and VAE-encoded (posterior mean); the mask must be single-channel (mode ``"1"`` / ``"L"``, or a
  grey picture stored as RGB), white = repaint, and is resized straight to the unpacked latent grid ``(H/8, W/8)``
  with bilinear filtering, whatever its size (a size other than the image's gives a
  :class:`FlexInputResizedWarning`). The known region is *not* blended back during sampling: the model
  inpaints by itself.
* ``flex_control_image`` (PIL, an annotated map such as edges or depth; no annotator runs here), resized like
  the inpaint image and VAE-encoded, times ``flex_control_strength`` (0.5), used for steps
  ``0 .. int(flex_control_stop * (N - 1))`` (``flex_control_stop`` 0.5, in ``[0, 1]``).

Training options (``--pipeline_args``; they need the training image, ``input_image``):
``flex_random_inpaint`` (probability that a sample gets a random rectangular repaint mask at the latent grid, with
its own image as the inpaint image) and ``flex_control_dropout`` (probability that a sample's
``flex_control_image`` is dropped). Both draw from torch's global generator (seeded by ``--seed``).

The conditioning goes to the DiT as ``img_cond`` (``(1, L, 132)``, shared by both CFG branches) when it is the
same at every step (no control, or a control that never stops within the schedule, as in training), else as a
per-call hook ``call_hooks["flex"]`` that picks the tensor with or without the control by step index.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from diffstudio.errors import PipelineInputError
from diffstudio.pipeline.base import BasePipeline
from diffstudio.pipeline.flow_units import HOOK_UNIT_INPUTS, tiling_options
from diffstudio.pipeline.images import as_image_list, pil_to_tensor, to_rgb
from diffstudio.pipeline.units import InputParam, OutputParam, PipelineUnit
from PIL import Image
from torch import Tensor

from diffstudio_flex import FLEX_IN_CHANNELS
from diffstudio_flex.conditioning import FlexControlHook, condition_channels, control_last_step, unpack

DISTRIBUTION = "diffstudio-flex"
FLEX_INPUTS = ("flex_inpaint_image", "flex_inpaint_mask", "flex_control_image", "flex_control_strength",
               "flex_control_stop", "flex_random_inpaint", "flex_control_dropout")  # fmt: skip
DEFAULTS = {"flex_control_strength": 0.5, "flex_control_stop": 0.5, "flex_random_inpaint": 0.0,
            "flex_control_dropout": 0.0}  # fmt: skip


class FlexInputResizedWarning(UserWarning):
    """A Flex image or mask did not have the generated size and was resized."""


def _number(inputs: Mapping[str, Any], name: str, low: float | None = None, high: float | None = None) -> float:
    value = inputs.get(name)
    value = DEFAULTS[name] if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PipelineInputError(f"{name}={value!r} must be a finite number")
    if (low is not None and value < low) or (high is not None and value > high):
        raise PipelineInputError(f"{name}={value!r} must be in [{low}, {high}]; {DEFAULTS[name]} is the default")
    return float(value)


def _one_image(value: Any, name: str) -> Image.Image:
    images = as_image_list(value, name)
    if len(images) != 1:
        raise PipelineInputError(f"{name} takes one image (shared by every prompt of the call), got {len(images)}")
    return images[0]


def _resized(image: Image.Image, size: tuple[int, int], name: str, resample: Image.Resampling) -> Image.Image:
    if image.size != size:
        warnings.warn(f"{name} is {image.size[0]}x{image.size[1]}; it was resized to {size[0]}x{size[1]}",
                      FlexInputResizedWarning, stacklevel=4)  # fmt: skip
    return image if image.size == size else image.resize(size, resample)


def mask_weights(mask: Any, grid: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
    """``flex_inpaint_mask`` (PIL, white = repaint) as weights ``(1, 1, 2h, 2w)`` in ``[0, 1]`` at the latent grid.

    Raises:
        PipelineInputError: Not one PIL image, or not single-channel (an RGB(A) picture whose colours differ).
    """
    name = "flex_inpaint_mask"
    image = _one_image(mask, name)
    if image.size != image_size:
        warnings.warn(
            f"{name} is {image.size[0]}x{image.size[1]}, the image {image_size[0]}x{image_size[1]}; the mask is "
            "resized to the latent grid either way",
            FlexInputResizedWarning,
            stacklevel=3,
        )
    if image.mode in ("1", "L"):
        grey = image.convert("L")
    else:
        rgb = np.asarray(to_rgb(image, argument=name))
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise PipelineInputError(
                f"{name} is a colour {image.mode} image; pass a single-channel mask (white = repaint), e.g. "
                "mask.convert('L')"
            )
        grey = Image.fromarray(rgb[..., 0])
    small = grey.resize((grid[1], grid[0]), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)[None, None]


def _random_box(grid: tuple[int, int]) -> Tensor:
    """A random axis-aligned repaint box at the latent grid, ``(1, 1, 2h, 2w)`` (global torch generator)."""
    mask = torch.zeros(1, 1, *grid)
    top, left = int(torch.randint(0, grid[0], ())), int(torch.randint(0, grid[1], ()))
    bottom, right = int(torch.randint(top + 1, grid[0] + 1, ())), int(torch.randint(left + 1, grid[1] + 1, ()))
    mask[..., top:bottom, left:right] = 1.0
    return mask


class FlexConditioning(PipelineUnit):
    """Build Flex.2's 132 conditioning channels (always, for a 196-channel DiT)."""

    name = "flex_conditioning"
    description = (
        "For a 196-channel (Flex.2) DiT: VAE-encodes flex_inpaint_image / flex_control_image and packs inpaint "
        "latent x (1 - mask) | mask (1 = repaint) | control latent x strength into img_cond (1, L, 132), or a "
        "call hook that drops the control after step int(flex_control_stop * (N - 1))."
    )
    components = ("vae",)
    optional_components = ("vae",)
    after = ("flux1_set_timesteps", "flux1_noise", "flux1_input_image")
    inputs = (
        InputParam("flex_inpaint_image", "PIL image to inpaint (with flex_inpaint_mask)"),
        InputParam("flex_inpaint_mask", "single-channel PIL mask, white = repaint (with flex_inpaint_image)"),
        InputParam("flex_control_image", "PIL control map (edges, depth, pose, ...)"),
        InputParam("flex_control_strength", "factor on the control latent (0.5)"),
        InputParam("flex_control_stop", "fraction of the schedule that sees the control, in [0, 1] (0.5)"),
        InputParam("flex_random_inpaint", "training: probability of a random repaint box on the training image (0)"),
        InputParam("flex_control_dropout", "training: probability of dropping flex_control_image (0)"),
        InputParam("input_latents", "(1, L, 64) clean latents of input_image (training)"),
        *HOOK_UNIT_INPUTS,
    )
    outputs = (
        OutputParam("img_cond", "(1, L, 132) conditioning channels when they do not change over the schedule",
                    optional=True),
        OutputParam("call_hooks", "{name: hook(DitCall)}, with 'flex' added when the control stops", optional=True),
    )  # fmt: skip

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        """The conditioning for a Flex.2 DiT; a typed error for Flex inputs on another DiT."""
        channels = int(getattr(pipe.dit, "in_channels", 0)) if pipe.has("dit") else 0
        if channels != FLEX_IN_CHANNELS:
            given = [n for n in FLEX_INPUTS if inputs.get(n) is not None]
            if given:
                raise PipelineInputError(
                    f"{given[0]} is an input of Flex.2 ({DISTRIBUTION}), but the loaded DiT has {channels} input "
                    f"channels, not {FLEX_IN_CHANNELS}; load ostris/Flex.2-preview or drop the flex_* arguments"
                )
            return {}
        strength = _number(inputs, "flex_control_strength")
        stop = _number(inputs, "flex_control_stop", 0.0, 1.0)
        random_inpaint = _number(inputs, "flex_random_inpaint", 0.0, 1.0)
        dropout = _number(inputs, "flex_control_dropout", 0.0, 1.0)
        height, width = int(inputs["height"]), int(inputs["width"])
        h, w = pipe.latent_grid(height, width)
        grid = (2 * h, 2 * w)
        latent_channels = (FLEX_IN_CHANNELS // 4 - 1) // 3
        image, mask = inputs.get("flex_inpaint_image"), inputs.get("flex_inpaint_mask")
        if (image is None) != (mask is None):
            have, need = ("flex_inpaint_image", "flex_inpaint_mask") if mask is None else (
                "flex_inpaint_mask", "flex_inpaint_image")  # fmt: skip
            raise PipelineInputError(f"{have} needs {need} (Flex.2 inpaints the mask's white region of the image)")
        inpaint = weights = None
        if image is not None:
            inpaint = self._encode(pipe, image, "flex_inpaint_image", (width, height), grid, inputs)
            weights = mask_weights(mask, grid, (width, height))
        elif random_inpaint > 0 and float(torch.rand(())) < random_inpaint:
            clean = inputs.get("input_latents")
            if clean is None:
                raise PipelineInputError("flex_random_inpaint needs the training image (input_image)")
            inpaint, weights = unpack(clean[:1], h, w), _random_box(grid)
        control = None
        if inputs.get("flex_control_image") is not None and not (dropout > 0 and float(torch.rand(())) < dropout):
            control = self._encode(pipe, inputs["flex_control_image"], "flex_control_image", (width, height), grid,
                                   inputs)  # fmt: skip
        device, dtype = pipe.device, pipe.torch_dtype
        with_control, without_control = (
            t.to(device, dtype)
            for t in condition_channels(
                grid, latent_channels, strength=strength,
                inpaint=None if inpaint is None else inpaint.to(device, dtype),
                mask=None if weights is None else weights.to(device, dtype),
                control=None if control is None else control.to(device, dtype),
            )
        )  # fmt: skip
        last = control_last_step(stop, len(inputs["timesteps"]))
        if control is None or last >= len(inputs["timesteps"]) - 1:
            return {"img_cond": with_control}
        hook = FlexControlHook(with_control, without_control, last)
        return {"call_hooks": {**(inputs.get("call_hooks") or {}), "flex": hook}}

    @staticmethod
    def _encode(pipe: BasePipeline, value: Any, name: str, size: tuple[int, int], grid: tuple[int, int],
                inputs: Mapping[str, Any]) -> Tensor:  # fmt: skip
        """VAE latents ``(1, C, 2h, 2w)`` of one image argument, resized to the generated ``size``."""
        if not pipe.has("vae"):
            raise PipelineInputError(
                f"{name} needs the VAE to encode it; add the FLUX.1 VAE (ae.safetensors or vae/) to from_pretrained"
            )
        image = _resized(to_rgb(_one_image(value, name), argument=name), size, name, Image.Resampling.LANCZOS)
        tiling = tiling_options(inputs)
        latents: Tensor = pipe.encode_image(pil_to_tensor(image, argument=name), **tiling)
        if tuple(latents.shape[2:]) != grid:
            raise PipelineInputError(f"{name} encodes to a {tuple(latents.shape[2:])} latent, expected {grid}")
        return latents
