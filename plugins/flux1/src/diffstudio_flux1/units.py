"""The units of :class:`~diffstudio_flux1.pipeline.FluxImagePipeline`.

Prepare stage, in anchor order: ``flux1_check_size`` -> ``flux1_encode_prompt`` (per CFG branch) ->
``flux1_set_timesteps`` -> ``flux1_noise`` -> ``flux1_image_ids`` -> ``flux1_input_image`` ->
``flux1_inpaint_mask`` -> ``flux1_guidance`` -> ``flux1_kontext`` -> ``flux1_extensions`` (per branch).
Finish stage: ``flux1_decode``. The standard ones come from :mod:`diffstudio.pipeline.flow_units`, given
:data:`FLUX1_UNITS` (with the latent geometry of :func:`latent_geometry`); this module keeps what is FLUX.1's own:
the CLIP + T5 prompt encoder, embedded guidance and Kontext reference images.

Token layout: a latent image ``(B, 16, H/8, W/8)`` becomes ``(B, H/16 * W/16, 64)`` tokens (2 x 2 patches,
row-major); image ids are ``(0, row, col)``, Kontext ids ``(1, row, col)``, text ids zeros.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from diffstudio.errors import PipelineInputError
from diffstudio.pipeline.flow_units import TILING_INPUTS, FlowFamily, LatentGeometry, flow_units, tiling_options
from diffstudio.pipeline.images import as_image_list, pil_to_tensor
from diffstudio.pipeline.units import InputParam, OutputParam, PipelineUnit

from diffstudio_flux1.math import KONTEXT_T, image_ids, pack_latents, unpack_latents

if TYPE_CHECKING:
    from diffstudio_flux1.pipeline import FluxImagePipeline


def _unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return unpack_latents(tokens, 2 * h, 2 * w)


def latent_geometry(pipe: FluxImagePipeline) -> LatentGeometry:
    """FLUX.1's latent layout for ``pipe``'s components: 2 x 2 patches of VAE latents per token.

    Latents ``(B, C, 2h, 2w)`` (``C = 16``, ``2h = H/8`` for the official VAE) pack to ``(B, h*w, 4C)`` tokens,
    channel-major within a patch, row-major over the grid; target ids are ``(0, row, col)``, ``(B, h*w, 3)``.
    """
    return LatentGeometry(pipe.spatial_factor, pipe.latent_channels, pack_latents, _unpack, image_ids, patch=2)


FLUX1_UNITS = FlowFamily(
    "flux1_",
    latent_geometry,
    tokens="(B, L, 64)",
    latents="(B, 16, H/8, W/8)",
    ids="(B, L, 3) ids (0, row, col)",
    tiling=True,
    sigma_shift=True,
)
"""FLUX.1's standard units (:mod:`diffstudio.pipeline.flow_units`)."""


class EncodePrompt(PipelineUnit["FluxImagePipeline"]):
    """CLIP pooled vector + T5 tokens, once per CFG branch."""

    name = "flux1_encode_prompt"
    description = "Encodes the (negative) prompts: T5 tokens txt (B, L, 4096), zero txt_ids, CLIP pooled y (B, 768)."
    components = ("text_encoder", "text_encoder_2")
    per_branch = True
    after = ("flux1_check_size",)
    inputs = (
        InputParam("prompt", "list of B prompts", True, per_branch=True),
        InputParam("t5_sequence_length", "T5 tokens after padding/truncation (512)"),
    )
    outputs = (
        OutputParam("prompt_emb", "(B, L, 4096) T5 last hidden states"),
        OutputParam("text_ids", "(B, L, 3) zeros"),
        OutputParam("pooled_prompt_emb", "(B, 768) CLIP pooled output at the end-of-text token"),
    )

    def process(self, pipe: FluxImagePipeline, **inputs: Any) -> Mapping[str, Any]:
        encoded = pipe.prompt_encoder().encode(list(inputs["prompt"]), int(inputs["t5_sequence_length"] or 512))
        dtype, device = pipe.torch_dtype, pipe.device
        return {
            "prompt_emb": encoded.txt.to(device, dtype),
            "text_ids": encoded.txt_ids.to(device),
            "pooled_prompt_emb": encoded.y.to(device, dtype),
        }


class Guidance(PipelineUnit["FluxImagePipeline"]):
    """Embedded (distilled) guidance for dev / Kontext; schnell has none."""

    name = "flux1_guidance"
    description = (
        "Turns embedded_guidance (default 3.5, Krea 4.5) into a (B,) tensor for guidance-distilled DiTs (None for "
        "schnell)."
    )
    components = ("dit",)
    after = ("flux1_noise",)
    inputs = (
        InputParam("embedded_guidance", "distilled guidance strength (None: the variant's, 3.5 or Krea's 4.5)"),
        InputParam("noise", "tokens"),
    )
    outputs = (OutputParam("guidance", "(B,) guidance values", optional=True),)

    def process(self, pipe: FluxImagePipeline, **inputs: Any) -> Mapping[str, Any]:
        if not pipe.dit.guidance_embed:
            return {}
        given = inputs["embedded_guidance"]
        value = float(pipe.variant_defaults()["embedded_guidance"] if given is None else given)
        return {"guidance": torch.full((inputs["noise"].shape[0],), value, device=pipe.device)}


class Kontext(PipelineUnit["FluxImagePipeline"]):
    """Kontext editing: reference images become extra image tokens with ids (1, row, col)."""

    name = "flux1_kontext"
    description = "VAE-encodes kontext_images to kontext_latents (1, L_ref, 64) with ids (1, row, col)."
    components = ("vae",)
    after = ("flux1_image_ids",)
    inputs = (InputParam("kontext_images", "PIL image or list of PIL images to edit / refer to"), *TILING_INPUTS)
    outputs = (
        OutputParam("kontext_latents", "(1, L_ref, 64) reference tokens", optional=True),
        OutputParam("kontext_image_ids", "(1, L_ref, 3) their ids, t = 1", optional=True),
    )

    def process(self, pipe: FluxImagePipeline, **inputs: Any) -> Mapping[str, Any]:
        if inputs["kontext_images"] is None:
            return {}
        tokens, ids = [], []
        for image in as_image_list(inputs["kontext_images"], "kontext_images"):
            w, h = image.size
            f = pipe.spatial_factor
            if w < f or h < f:
                raise PipelineInputError(f"kontext image of size {w}x{h} is smaller than {f} pixels")
            if w % f or h % f:
                left, top = (w % f) // 2, (h % f) // 2
                image = image.crop((left, top, left + w // f * f, top + h // f * f))
            latents = pipe.encode_image(pil_to_tensor(image, argument="kontext_images"), **tiling_options(inputs))
            tokens.append(pack_latents(latents))
            ids.append(image_ids(1, latents.shape[2] // 2, latents.shape[3] // 2, t=KONTEXT_T, device=pipe.device))
        return {"kontext_latents": torch.cat(tokens, dim=1), "kontext_image_ids": torch.cat(ids, dim=1)}


def flux1_units() -> Sequence[PipelineUnit]:
    """Every unit of the FLUX.1 image pipeline."""
    return [*flow_units(FLUX1_UNITS), EncodePrompt(), Guidance(), Kontext()]
