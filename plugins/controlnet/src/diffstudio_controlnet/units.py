"""The ControlNet unit of ``FluxImagePipeline`` and the per-call hook it installs.

``controlnet_prepare`` (prepare stage, after the schedule and the noise) encodes every control image once with
the pipeline's VAE (tiled when ``tiled=True``), packs it to condition tokens ``(1, L_img, 64)`` (inpainting:
``(1, L_img, 68)``) and adds a :class:`ControlNetHook` to ``call_hooks``. On every DiT call (each step, each CFG
branch, and in training) the hook runs each active ControlNet on the call's noisy latents, text, timestep and
guidance and returns one ``block_residual`` that sums their stacks, repeated to the DiT's depth: DiT block ``i``
gets sample ``i // ceil(N_dit / N_controlnet)``, the same rule as diffusers' ``FluxTransformer2DModel``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffstudio.dit.extensions import DitCall
from diffstudio.errors import PipelineInputError
from diffstudio.pipeline.base import BasePipeline
from diffstudio.pipeline.flow_units import HOOK_UNIT_INPUTS, tiling_options
from diffstudio.pipeline.images import pil_to_tensor
from diffstudio.pipeline.units import InputParam, OutputParam, PipelineUnit
from PIL import Image
from torch import Tensor, nn

from diffstudio_controlnet.inputs import ControlNetInput, as_controlnet_inputs
from diffstudio_controlnet.model import ControlNetOutput, FluxControlNet


class ControlImageResizedWarning(UserWarning):
    """A control image (or its inpainting mask) did not have the generated size and was resized."""


class ControlNetGroup(nn.ModuleList):
    """Several ControlNets in the ``controlnet`` slot; ``ControlNetInput.controlnet_id`` indexes them."""


@dataclass
class Condition:
    """One prepared input: which net, its condition tokens ``(1, L_img, C)``, mode id, scale and active range."""

    net: int
    tokens: Tensor
    mode: Tensor | None
    scale: float
    start: float
    end: float


class ResidualStacks:
    """``block_residual`` that sums several ControlNets' stacks, each repeated to the DiT's block counts."""

    def __init__(self, outputs: Sequence[ControlNetOutput], depth: int, depth_single: int) -> None:
        self.outputs = list(outputs)
        self.depth = {"double": depth, "single": depth_single}

    def __call__(self, kind: str, index: int, img: Tensor) -> Tensor | None:
        """Sum of the samples for DiT block ``kind_index`` ``(B, L_img, D)``, or None."""
        total: Tensor | None = None
        for out in self.outputs:
            samples = out.double if kind == "double" else out.single
            if not samples:
                continue
            interval = math.ceil(self.depth[kind] / len(samples))
            sample = samples[min(index // interval, len(samples) - 1)].to(img.dtype)
            total = sample if total is None else total + sample
        return total


class ControlNetHook:
    """Runs the active ControlNets on one DiT call (a :class:`~diffstudio.dit.extensions.CallHook`).

    Args:
        nets: The ControlNets (index = ``controlnet_id``).
        conditions: Prepared inputs.
        num_steps: Steps of the schedule (for ``start`` / ``end``).
        depth: The DiT's double and single block counts.
    """

    def __init__(
        self, nets: Sequence[FluxControlNet], conditions: Sequence[Condition], num_steps: int, depth: tuple[int, int]
    ) -> None:
        self.nets = list(nets)
        self.conditions = list(conditions)
        self.num_steps = num_steps
        self.depth = depth

    def progress(self, step_index: int) -> float:
        """1.0 at the first step, 0.0 at the last (DiffSynth's ``(N - 1 - i) / (N - 1)``)."""
        return (self.num_steps - 1 - step_index) / max(self.num_steps - 1, 1)

    def __call__(self, call: DitCall) -> Mapping[str, Any]:
        """``{"block_residual": ResidualStacks}`` for the ControlNets active at this step (``{}`` when none)."""
        progress = self.progress(call.step_index)
        outputs = []
        for cond in self.conditions:
            if not cond.end <= progress <= cond.start:
                continue
            net = self.nets[cond.net]
            outputs.append(
                net(call.img, call.img_ids, cond.tokens.to(call.img.device), call.txt, call.txt_ids, call.timesteps,
                    call.y, call.guidance, cond.mode, cond.scale)
            )  # fmt: skip
        if not outputs:
            return {}
        return {"block_residual": ResidualStacks(outputs, *self.depth)}


def _pack(z: Tensor) -> Tensor:
    """Latent image to FLUX.1 tokens: 2 x 2 patches, channel-major, ``(B, C, H, W) -> (B, H/2 * W/2, 4 C)``."""
    b, c, h, w = z.shape
    patches = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, H/2, W/2, C, 2, 2)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def controlnets(pipe: BasePipeline) -> list[FluxControlNet]:
    """The ControlNets in the pipeline's ``controlnet`` slot (one, or a :class:`ControlNetGroup`)."""
    if not pipe.has("controlnet"):
        raise PipelineInputError(
            "controlnet_inputs were given but no ControlNet is loaded; add its ModelConfig (e.g. "
            "InstantX/FLUX.1-dev-Controlnet-Union-alpha diffusion_pytorch_model.safetensors) to from_pretrained"
        )
    module = pipe.controlnet
    return list(module) if isinstance(module, ControlNetGroup) else [module]


def _resized(image: Image.Image, size: tuple[int, int], where: str) -> Image.Image:
    if image.size == size:
        return image
    warnings.warn(
        f"{where} is {image.size[0]}x{image.size[1]}; it was resized to the generated {size[0]}x{size[1]}",
        ControlImageResizedWarning,
        stacklevel=4,
    )
    return image.resize(size, Image.Resampling.BICUBIC if where.endswith("image") else Image.Resampling.NEAREST)


def condition_tokens(pipe: Any, item: ControlNetInput, index: int, height: int, width: int, tiling: dict[str, Any],
                     cond_channels: int) -> Tensor:  # fmt: skip
    """Condition tokens ``(1, L_img, cond_channels)`` of one input.

    Plain / Union / Upscaler: the packed VAE latents of the control image. Inpainting (alimama): the control
    image with the repainted pixels set to black (-1), VAE-encoded, followed by the keep mask ``1 - mask`` at
    the latent resolution (nearest), packed together: ``16 + 1`` latent channels, ``68`` per token.

    Raises:
        PipelineInputError: The mask is given to a non-inpainting ControlNet or missing for an inpainting one.
    """
    where = f"controlnet_inputs[{index}]"
    pixels = pil_to_tensor(_resized(item.image, (width, height), f"{where}.image"), argument=f"{where}.image")
    inpainting = cond_channels == 4 * (pipe.latent_channels + 1)
    if inpainting != (item.inpaint_mask is not None):
        need = "needs an inpaint_mask (white = repaint)" if inpainting else "takes no inpaint_mask"
        raise PipelineInputError(
            f"{where}: ControlNet {item.controlnet_id} ({cond_channels} condition channels) {need}"
        )
    if item.inpaint_mask is None:
        return _pack(pipe.encode_image(pixels, **tiling))
    mask_image = _resized(item.inpaint_mask.convert("L"), (width, height), f"{where}.inpaint_mask")
    mask = torch.from_numpy(np.asarray(mask_image, dtype=np.float32) / 255.0)[None, None]
    masked = torch.where(mask > 0.5, torch.full_like(pixels, -1.0), pixels)
    latents = pipe.encode_image(masked, **tiling)  # (1, 16, H/8, W/8)
    keep = 1.0 - torch.nn.functional.interpolate(mask, size=latents.shape[2:], mode="nearest")
    return _pack(torch.cat([latents, keep.to(latents)], dim=1))


class ControlNetPrepare(PipelineUnit):
    """Encode the control images and install the per-call ControlNet hook."""

    name = "controlnet_prepare"
    description = (
        "VAE-encodes controlnet_inputs to condition tokens (1, L, 64|68) and adds a hook to call_hooks that runs "
        "the ControlNet(s) on every DiT call and adds their summed, repeated residual stacks after each block."
    )
    components = ("vae", "controlnet")
    optional_components = ("vae", "controlnet")
    after = ("flux1_set_timesteps", "flux1_noise", "flux1_image_ids")
    inputs = (
        InputParam("controlnet_inputs", "list of ControlNetInput (image, scale, processor_id, start, end, ...)"),
        *HOOK_UNIT_INPUTS,
    )
    outputs = (OutputParam("call_hooks", "{name: hook(DitCall)}, with 'controlnet' added", optional=True),)

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        if inputs["controlnet_inputs"] is None:
            return {}
        items = as_controlnet_inputs(inputs["controlnet_inputs"])
        if not items:
            return {}
        nets = controlnets(pipe)
        tiling = tiling_options(inputs)
        conditions = []
        for i, item in enumerate(items):
            if not 0 <= item.controlnet_id < len(nets):
                raise PipelineInputError(
                    f"controlnet_inputs[{i}].controlnet_id={item.controlnet_id}, but {len(nets)} ControlNet(s) "
                    "are loaded"
                )
            net = nets[item.controlnet_id]
            mode = item.mode_id(f"controlnet_inputs[{i}]")
            if net.is_union and mode is None:
                raise PipelineInputError(
                    f"controlnet_inputs[{i}] goes to a Union ControlNet: set processor_id to a mode "
                    "('canny', 'tile', 'depth', 'blur', 'pose', 'gray', 'lq') or an integer id"
                )
            if net.is_union and not 0 <= int(mode or 0) < net.params.num_modes:
                raise PipelineInputError(f"controlnet_inputs[{i}]: mode {mode} >= the model's {net.params.num_modes}")
            tokens = condition_tokens(
                pipe, item, i, inputs["height"], inputs["width"], tiling, net.params.cond_channels
            )
            mode_tensor = None if not net.is_union else torch.tensor([int(mode or 0)], device=pipe.device)
            conditions.append(Condition(item.controlnet_id, tokens.to(pipe.device, pipe.torch_dtype), mode_tensor,
                                        item.scale, item.start, item.end))  # fmt: skip
        dit = pipe.dit
        hook = ControlNetHook(
            nets, conditions, len(inputs["timesteps"]), (len(dit.double_blocks), len(dit.single_blocks))
        )
        return {"call_hooks": {**(inputs["call_hooks"] or {}), "controlnet": hook}}
