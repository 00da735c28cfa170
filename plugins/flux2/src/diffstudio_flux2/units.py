"""The units of :class:`~diffstudio_flux2.pipeline.Flux2ImagePipeline`.

Prepare stage, in anchor order: ``flux2_check_size`` -> ``flux2_encode_prompt`` (per CFG branch) ->
``flux2_set_timesteps`` -> ``flux2_noise`` -> ``flux2_image_ids`` -> ``flux2_input_image`` -> ``flux2_edit_images``
(-> ``flux2_reference_kv``) -> ``flux2_inpaint_mask`` -> ``flux2_extensions`` (template inputs, per branch). Finish
stage: ``flux2_decode``. The standard ones come from :mod:`diffstudio.pipeline.flow_units`, given
:data:`FLUX2_UNITS` (with the latent geometry of :func:`latent_geometry`); this module keeps what is FLUX.2's own:
the prompt encoder, edit (reference) images and their cached K/V.

Token layout: a latent image ``(B, C, h, w)`` (``C = 128`` and ``h = H/16`` for the official VAE) becomes
``(B, h*w, C)`` tokens in row-major order; image ids are ``(t, h, w, 0)``, text ids ``(0, 0, 0, l)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from diffstudio.errors import PipelineInputError
from diffstudio.nn.attention import merge_kv  # noqa: F401  (its old home; re-exported)
from diffstudio.pipeline.flow_units import FlowFamily, LatentGeometry, flow_units
from diffstudio.pipeline.flow_units import gaussian_blur as gaussian_blur  # its old home; re-exported
from diffstudio.pipeline.images import as_image_list, pil_to_tensor, to_rgb
from diffstudio.pipeline.units import InputParam, OutputParam, PipelineUnit
from PIL import Image

from diffstudio_flux2.math import image_ids, pack_latents, reference_image_ids, unpack_latents

if TYPE_CHECKING:
    from diffstudio_flux2.pipeline import Flux2ImagePipeline

EDIT_IMAGE_MAX_AREA = 1024 * 1024


def resize_edit_image(image: Image.Image, multiple: int, auto_resize: bool) -> Image.Image:
    """Prepare one edit (reference) image like diffusers' FLUX.2 pipelines.

    With ``auto_resize``, an image larger than 1024x1024 pixels in area is scaled down to that area (aspect
    ratio kept), then its sides are floored to multiples of ``multiple`` by a centre crop. Without it, the sides
    must already be multiples of ``multiple``.
    """
    width, height = image.size
    if not auto_resize:
        if width % multiple or height % multiple:
            raise PipelineInputError(
                f"edit image of size {width}x{height} is not a multiple of {multiple} on each side; pass "
                f"edit_image_auto_resize=True or resize it"
            )
        return image
    if width * height > EDIT_IMAGE_MAX_AREA:
        ratio = (EDIT_IMAGE_MAX_AREA / (width * height)) ** 0.5
        width, height = int(width * ratio), int(height * ratio)
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    new_w, new_h = (width // multiple) * multiple, (height // multiple) * multiple
    if new_w < multiple or new_h < multiple:
        raise PipelineInputError(f"edit image of size {width}x{height} is smaller than {multiple} pixels")
    if (new_w, new_h) != (width, height):
        left, top = (width - new_w) // 2, (height - new_h) // 2
        image = image.crop((left, top, left + new_w, top + new_h))
    return image


def latent_geometry(pipe: Flux2ImagePipeline) -> LatentGeometry:
    """FLUX.2's latent layout for ``pipe``'s components: the VAE folds 2 x 2 patches, tokens are the latent pixels.

    Latents ``(B, C, h, w)`` (``C = 128``, ``h = H/16`` for the official VAE) pack to ``(B, h*w, C)`` tokens in
    row-major order; target ids are ``(0, h, w, 0)``, ``(B, h*w, 4)``.
    """
    return LatentGeometry(pipe.spatial_factor, pipe.latent_channels, pack_latents, unpack_latents, image_ids)


FLUX2_UNITS = FlowFamily(
    "flux2_",
    latent_geometry,
    tokens="(B, h*w, C)",
    latents="(B, C, h, w)",
    ids="(B, h*w, 4) ids (t=0, h, w, 0)",
    extra_text_key="extra_txt",  # the shared DiT name (diffstudio.dit); "extra_ctx" is deprecated
    inpaint_blur=True,
)
"""FLUX.2's standard units (:mod:`diffstudio.pipeline.flow_units`)."""


class EncodePrompt(PipelineUnit["Flux2ImagePipeline"]):
    """Qwen3 (klein) or Mistral3 (dev) prompt embedding, once per CFG branch."""

    name = "flux2_encode_prompt"
    description = "Encodes the (negative) prompts with the text encoder: prompt_embeds (B, L, 3*hidden)."
    components = ("text_encoder",)
    per_branch = True
    after = ("flux2_check_size",)
    inputs = (
        InputParam("prompt", "list of B prompts", True, per_branch=True),
        InputParam("max_sequence_length", "text tokens after padding/truncation (512)"),
    )
    outputs = (
        OutputParam("prompt_embeds", "(B, L, 3*hidden) stacked hidden states"),
        OutputParam("text_ids", "(B, L, 4) text position ids (0, 0, 0, l)"),
    )

    def process(self, pipe: Flux2ImagePipeline, **inputs: Any) -> Mapping[str, Any]:
        embeds, ids = pipe.prompt_encoder().encode(
            list(inputs["prompt"]), int(inputs["max_sequence_length"] or 512), dtype=pipe.torch_dtype
        )
        return {"prompt_embeds": embeds.to(pipe.device), "text_ids": ids.to(pipe.device)}


class EditImages(PipelineUnit["Flux2ImagePipeline"]):
    """In-context editing: reference images become extra tokens with ids t = 10, 20, ..."""

    name = "flux2_edit_images"
    description = "VAE-encodes edit_image (one or a list) to edit_latents (1, L_ref, C) with ids t=10, 20, ..."
    components = ("vae",)
    after = ("flux2_image_ids",)
    inputs = (
        InputParam("edit_image", "PIL image or list of PIL images to edit from / refer to"),
        InputParam("edit_image_auto_resize", "scale images above 1024x1024 down and crop to multiples of 16"),
    )
    outputs = (
        OutputParam("edit_latents", "(1, L_ref, C) reference tokens", optional=True),
        OutputParam("edit_image_ids", "(1, L_ref, 4) their ids", optional=True),
    )

    def process(self, pipe: Flux2ImagePipeline, **inputs: Any) -> Mapping[str, Any]:
        if inputs["edit_image"] is None:
            return {}
        auto = True if inputs["edit_image_auto_resize"] is None else bool(inputs["edit_image_auto_resize"])
        tokens, sizes = [], []
        for image in as_image_list(inputs["edit_image"], "edit_image"):
            image = resize_edit_image(to_rgb(image, argument="edit_image"), pipe.spatial_factor, auto)
            latents = pipe.encode_image(pil_to_tensor(image, argument="edit_image"))  # (1, C, h, w)
            sizes.append((latents.shape[2], latents.shape[3]))
            tokens.append(pack_latents(latents))
        return {
            "edit_latents": torch.cat(tokens, dim=1),
            "edit_image_ids": reference_image_ids(sizes, device=pipe.device),
        }


def flux2_units() -> Sequence[PipelineUnit]:
    """Every unit of the FLUX.2 image pipeline."""
    return [*flow_units(FLUX2_UNITS), EncodePrompt(), EditImages(), ReferenceKV()]


class _CaptureKV:
    """Attention processor that records each block's post-RoPE keys and values, then attends normally."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: Any) -> torch.Tensor:
        self.captured[f"{context.kind}_{context.index}"] = (k, v)
        out: torch.Tensor = self.inner(q, k, v, context)
        return out


def reference_kv(
    dit: Any, ref_tokens: torch.Tensor, ref_ids: torch.Tensor, ref_timestep: float = 0.0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of reference tokens in every block, computed once (the klein-9b-kv scheme).

    Reference tokens attend only to themselves and are modulated at a fixed time, so their K/V do not depend
    on the prompt or the step: one DiT pass over the reference tokens alone (no text) yields them all.

    Args:
        dit: The FLUX.2 DiT.
        ref_tokens: ``(1, L_ref, C)`` packed reference latents.
        ref_ids: ``(1, L_ref, 4)`` their ids (t = 10, 20, ...).
        ref_timestep: The fixed flow time of the reference tokens, in ``[0, 1]``.

    Returns:
        ``{"double_i" | "single_i": (K, V)}``, each ``(1, L_ref, H, Dh)``, for ``kv_extension``.
    """
    processors = dit.attn_processors
    capture = _CaptureKV(next(iter(processors.values())))
    ctx = ref_tokens.new_zeros(ref_tokens.shape[0], 0, dit.params.context_in_dim)
    ctx_ids = ref_ids.new_zeros(ref_ids.shape[0], 0, 4)
    t = torch.full((ref_tokens.shape[0],), float(ref_timestep), device=ref_tokens.device)
    dit.set_attn_processor(capture)
    try:
        with torch.no_grad():
            dit(ref_tokens, ref_ids, t.to(ref_tokens.dtype), ctx, ctx_ids, None)
    finally:
        for name, processor in processors.items():
            dit.set_attn_processor(processor, [name])
    return capture.captured


class ReferenceKV(PipelineUnit["Flux2ImagePipeline"]):
    """Optional: compute the edit images' K/V once instead of running their tokens at every step."""

    name = "flux2_reference_kv"
    description = "With edit_kv_cache=True, caches the reference tokens' per-block K/V (klein-9b-kv scheme)."
    components = ("dit",)
    after = ("flux2_edit_images",)
    inputs = (
        InputParam("edit_kv_cache", "compute reference K/V once (for models trained for it, e.g. klein-9b-kv)"),
        InputParam("edit_latents", "(1, L_ref, C) reference tokens"),
        InputParam("edit_image_ids", "(1, L_ref, 4) their ids"),
        InputParam("edit_kv_timestep", "fixed flow time of the reference tokens (0.0)"),
    )
    outputs = (OutputParam("reference_kv", "{'double_i'|'single_i': (K, V)} of the references", optional=True),)

    def process(self, pipe: Flux2ImagePipeline, **inputs: Any) -> Mapping[str, Any]:
        if not inputs["edit_kv_cache"] or inputs["edit_latents"] is None:
            return {}
        tokens = inputs["edit_latents"].to(pipe.device, pipe.torch_dtype)
        kv = reference_kv(pipe.dit, tokens, inputs["edit_image_ids"], float(inputs["edit_kv_timestep"] or 0.0))
        return {"reference_kv": kv}
