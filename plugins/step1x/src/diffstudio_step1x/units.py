"""The units of :class:`~diffstudio_step1x.pipeline.Step1XEditPipeline`.

Prepare stage: FLUX.1's standard flow units under the ``step1x_`` prefix (``step1x_check_size`` ->
``step1x_set_timesteps`` -> ``step1x_noise`` -> ``step1x_image_ids`` -> ... -> ``step1x_extensions``), then
``step1x_reference`` (the reference image, resized to the output size, VAE-encoded and packed into ``extra_img``
``(1, L_img, 64)`` with ids equal to the target grid's ``(0, row, col)``), ``step1x_encode_prompt`` (per CFG
branch: Qwen2.5-VL embeddings ``(B, 640, 3584)`` and masks ``step1x_mask (B, 640)``, each branch with the same
reference image). Per DiT call, ``Step1XEditPipeline.predict_velocity`` installs :class:`ConnectorHook` over the
branch's mask: the connector runs on the call's timestep and replaces the text stream (``txt (B, 640, 4096)``,
zero ids, ``y (B, 768)``). Finish: ``step1x_decode``.

Split training (``--task sft:data_process``) caches ``step1x_reference`` and ``step1x_encode_prompt`` (VAE and
Qwen2.5-VL only); the connector is part of the trained DiT and runs in every training step.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from diffstudio.dit.extensions import DitCall, TextStream
from diffstudio.errors import PipelineInputError
from diffstudio.pipeline.flow_units import TILING_INPUTS, FlowFamily, flow_units, tiling_options
from diffstudio.pipeline.images import as_image_list, pil_to_tensor
from diffstudio.pipeline.units import InputParam, OutputParam, PipelineUnit
from diffstudio_flux1.math import image_ids, pack_latents
from diffstudio_flux1.units import latent_geometry

if TYPE_CHECKING:
    from diffstudio_step1x.pipeline import Step1XEditPipeline

STEP1X_UNITS = FlowFamily("step1x_", latent_geometry, tokens="(B, L, 64)", latents="(B, 16, H/8, W/8)",
                          ids="(B, L, 3) ids (0, row, col)", tiling=True, sigma_shift=True)  # fmt: skip


class ReferenceResizedWarning(UserWarning):
    """The reference image was resized to the output size (the reference tokens share the target grid)."""


class Reference(PipelineUnit["Step1XEditPipeline"]):
    """The reference image -> extra image tokens on the target grid (ids ``(0, row, col)``)."""

    name = "step1x_reference"
    description = "Resizes step1x_reference_image to the output size and packs its latents (1, L, 64) as extra_img."
    components = ("vae",)
    after = ("step1x_image_ids",)
    inputs = (
        InputParam("step1x_reference_image", "PIL image to edit", True),
        InputParam("height", "output height"),
        InputParam("width", "output width"),
        *TILING_INPUTS,
    )
    outputs = (
        OutputParam("extra_img", "(1, L_img, 64) reference tokens"),
        OutputParam("extra_img_ids", "(1, L_img, 3) ids equal to the target grid's (0, row, col)"),
        OutputParam("step1x_reference", "the resized PIL reference (what the LLM sees)"),
    )

    def process(self, pipe: Step1XEditPipeline, **inputs: Any) -> Mapping[str, Any]:
        images = as_image_list(inputs["step1x_reference_image"], "step1x_reference_image")
        if len(images) != 1:
            raise PipelineInputError(f"step1x_reference_image holds {len(images)} images; pass exactly one")
        image, size = images[0].convert("RGB"), (int(inputs["width"]), int(inputs["height"]))
        if image.size != size:
            warnings.warn(f"step1x_reference_image {image.size[0]}x{image.size[1]} resized to the output size "
                          f"{size[0]}x{size[1]}", ReferenceResizedWarning, stacklevel=2)  # fmt: skip
            image = image.resize(size, resample=3)
        latents = pipe.encode_image(pil_to_tensor(image, argument="step1x_reference_image"), **tiling_options(inputs))
        ids = image_ids(1, latents.shape[2] // 2, latents.shape[3] // 2, device=pipe.device)
        return {"extra_img": pack_latents(latents), "extra_img_ids": ids, "step1x_reference": image}


class EncodePrompt(PipelineUnit["Step1XEditPipeline"]):
    """Qwen2.5-VL prompt embeddings, once per CFG branch, each with the same reference image."""

    name = "step1x_encode_prompt"
    description = "Embeds (prefix, reference, prompt) with Qwen2.5-VL: (B, 640, 3584) states and (B, 640) masks."
    components = ("qwen_vl",)
    per_branch = True
    after = ("step1x_reference",)
    inputs = (
        InputParam("prompt", "list of B instructions", True, per_branch=True),
        InputParam("step1x_reference", "the resized reference image", True),
    )
    outputs = (
        OutputParam("prompt_emb", "(B, 640, 3584) LLM states (the connector turns them into txt per call)"),
        OutputParam("text_ids", "(B, 640, 3) zeros"),
        OutputParam("pooled_prompt_emb", "(B, 768) zeros (replaced per call by the connector's y)"),
        OutputParam("step1x_mask", "(B, 640) 0/1 mask of the LLM states"),
    )

    def process(self, pipe: Step1XEditPipeline, **inputs: Any) -> Mapping[str, Any]:
        prompts: Sequence[str] = list(inputs["prompt"])
        embs, masks = pipe.prompt_encoder().encode(prompts, [inputs["step1x_reference"]] * len(prompts))
        batch, length = masks.shape
        device, dtype = pipe.device, pipe.torch_dtype
        return {
            "prompt_emb": embs.to(device, dtype),
            "text_ids": torch.zeros(batch, length, 3, device=device),
            "pooled_prompt_emb": torch.zeros(batch, int(pipe.dit.params.vec_in_dim), device=device, dtype=dtype),
            "step1x_mask": masks.to(device),
        }


class ConnectorHook:
    """A DiT call hook: the connector on the call's LLM states and timestep replaces the text stream."""

    def __init__(self, dit: Any, mask: torch.Tensor) -> None:
        self.dit, self.mask = dit, mask

    def __call__(self, call: DitCall) -> Mapping[str, Any]:
        """``{"text_stream": TextStream(txt (B, 640, 4096), zero ids (B, 640, 3), y (B, 768))}``."""
        txt, y = self.dit.text_stream(call.txt, call.timesteps, self.mask.to(call.txt.device))
        return {"text_stream": TextStream(txt, torch.zeros_like(call.txt_ids), y)}


class WrongPipeline(PipelineUnit[Any]):
    """On FLUX.1 pipelines: ``step1x_reference_image`` needs the Step1X pipeline (a typed error, not a silent no-op)."""

    name = "step1x_needs_its_pipeline"
    description = "Rejects step1x_reference_image on FluxImagePipeline: Step1X-Edit runs in Step1XEditPipeline."
    inputs = (InputParam("step1x_reference_image", "Step1X reference image"),)

    def process(self, pipe: Any, **inputs: Any) -> Mapping[str, Any]:
        if inputs["step1x_reference_image"] is not None:
            raise PipelineInputError(
                "step1x_reference_image is served by Step1XEditPipeline (diffstudio-step1x), not "
                f"{type(pipe).__name__}; load the Step1X-Edit files with diffstudio_step1x.Step1XEditPipeline"
            )
        return {}


def step1x_units() -> Sequence[PipelineUnit[Any]]:
    """Every unit of the Step1X-Edit pipeline."""
    return [*flow_units(STEP1X_UNITS), Reference(), EncodePrompt()]
