"""The units of :class:`~diffstudio_flux2.pipeline.Flux2ImagePipeline`.

Prepare stage, in anchor order: ``flux2_check_size`` -> ``flux2_encode_prompt`` (per CFG branch) ->
``flux2_set_timesteps`` -> ``flux2_noise`` -> ``flux2_image_ids`` -> ``flux2_input_image`` -> ``flux2_edit_images``
-> ``flux2_inpaint_mask`` -> ``flux2_extensions`` (template inputs, per branch). Finish stage: ``flux2_decode``.

Token layout: a latent image ``(B, C, h, w)`` (``C = 128`` and ``h = H/16`` for the official VAE) becomes
``(B, h*w, C)`` tokens in row-major order; image ids are ``(t, h, w, 0)``, text ids ``(0, 0, 0, l)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from diffstudio.errors import PipelineInputError
from diffstudio.nn.attention import merge_kv  # noqa: F401  (its old home; re-exported)
from diffstudio.pipeline.images import as_image_list, convert_output, pil_to_tensor, to_rgb
from diffstudio.pipeline.units import InputParam, OutputParam, PipelineUnit
from PIL import Image

from diffstudio_flux2.math import image_ids, pack_latents, reference_image_ids, unpack_latents

if TYPE_CHECKING:
    from diffstudio.pipeline.base import BasePipeline

    from diffstudio_flux2.pipeline import Flux2ImagePipeline

EDIT_IMAGE_MAX_AREA = 1024 * 1024


def _pipe(pipe: BasePipeline) -> Flux2ImagePipeline:
    return cast("Flux2ImagePipeline", pipe)


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


class CheckSize(PipelineUnit):
    """Reject sizes that are not multiples of 16."""

    name = "flux2_check_size"
    description = "Checks that height and width are positive multiples of 16 (the latent patch size)."
    inputs = (InputParam("height", "image height in pixels", True), InputParam("width", "image width", True))

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        pipe.check_size(inputs["height"], inputs["width"])
        return {}


class EncodePrompt(PipelineUnit):
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

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        flux = _pipe(pipe)
        embeds, ids = flux.prompt_encoder().encode(
            list(inputs["prompt"]), int(inputs["max_sequence_length"] or 512), dtype=pipe.torch_dtype
        )
        return {"prompt_embeds": embeds.to(pipe.device), "text_ids": ids.to(pipe.device)}


class SetTimesteps(PipelineUnit):
    """The FLUX.2 schedule: empirical ``mu`` from the token count and the step count."""

    name = "flux2_set_timesteps"
    description = "Sets the flow-matching schedule (FLUX.2 empirical mu, strength, explicit sigmas)."
    after = ("flux2_check_size",)
    inputs = (
        InputParam("num_inference_steps", "number of denoising steps", True),
        InputParam("denoising_strength", "image-to-image strength in (0, 1]; 1.0 for text-to-image"),
        InputParam("sigmas", "explicit (N,) unshifted sigmas, overrides the step count"),
        InputParam("height", "image height", True),
        InputParam("width", "image width", True),
    )
    outputs = (OutputParam("timesteps", "(N,) timesteps in [0, 1000]"),)

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        flux = _pipe(pipe)
        sigmas = inputs["sigmas"]
        steps = len(sigmas) if sigmas is not None else inputs["num_inference_steps"]
        h, w = flux.latent_grid(inputs["height"], inputs["width"])
        pipe.scheduler.set_timesteps(
            steps, image_seq_len=h * w, denoising_strength=inputs["denoising_strength"] or 1.0, sigmas=sigmas
        )
        return {"timesteps": pipe.scheduler.timesteps}


class Noise(PipelineUnit):
    """Seeded initial noise (seed + i per image), or the caller's ``latents``."""

    name = "flux2_noise"
    description = "Draws seeded noise (B, C, h, w) on rand_device and packs it to tokens, or takes latents=."
    after = ("flux2_set_timesteps",)
    inputs = (
        InputParam("prompt", "list of B prompts (sets the batch size)", True),
        InputParam("seed", "base seed; None draws one"),
        InputParam("rand_device", "device of the random generator ('cpu' gives the same noise everywhere)"),
        InputParam("latents", "initial noise (B, h*w, C) in token layout"),
        InputParam("height", "image height", True),
        InputParam("width", "image width", True),
    )
    outputs = (
        OutputParam("latents", "(B, h*w, C) noisy tokens"),
        OutputParam("noise", "(B, h*w, C) the initial noise"),
        OutputParam("seeds", "per-image seeds"),
    )

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        flux = _pipe(pipe)
        batch = len(inputs["prompt"])
        seeds = pipe.seeds_for(inputs["seed"], batch)
        h, w = flux.latent_grid(inputs["height"], inputs["width"])
        channels = flux.latent_channels
        given = inputs["latents"]
        if given is not None:
            if given.ndim != 3 or tuple(given.shape[1:]) != (h * w, channels) or given.shape[0] not in (1, batch):
                raise PipelineInputError(
                    f"latents= has shape {tuple(given.shape)}; expected (1 or {batch}, {h * w}, {channels}) tokens "
                    f"for {batch} image(s) of {inputs['height']}x{inputs['width']}"
                )
            noise = given.to(pipe.device, pipe.torch_dtype).expand(batch, -1, -1)
        else:
            drawn = pipe.generate_noise((channels, h, w), seeds, inputs["rand_device"] or "cpu")
            noise = pack_latents(drawn)
        return {"latents": noise, "noise": noise, "seeds": seeds}


class ImageIds(PipelineUnit):
    """Position ids of the target-image tokens."""

    name = "flux2_image_ids"
    description = "Builds (t=0, h, w, 0) ids (B, h*w, 4) for the target latent grid."
    after = ("flux2_noise",)
    inputs = (
        InputParam("latents", "(B, h*w, C) tokens", True),
        InputParam("height", "image height", True),
        InputParam("width", "image width", True),
    )
    outputs = (OutputParam("image_ids", "(B, h*w, 4) int64 ids"),)

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        h, w = _pipe(pipe).latent_grid(inputs["height"], inputs["width"])
        return {"image_ids": image_ids(inputs["latents"].shape[0], h, w, device=pipe.device)}


class InputImage(PipelineUnit):
    """Image-to-image: encode ``input_image`` and start from it, noised to the first sigma."""

    name = "flux2_input_image"
    description = "VAE-encodes input_image to input_latents (B, h*w, C) and noises it to the schedule's start."
    components = ("vae",)
    after = ("flux2_noise", "flux2_set_timesteps")
    inputs = (
        InputParam("input_image", "PIL image (or one per prompt) for image-to-image or training"),
        InputParam("noise", "(B, h*w, C) initial noise", True),
        InputParam("height", "image height", True),
        InputParam("width", "image width", True),
    )
    outputs = (
        OutputParam("input_latents", "(B, h*w, C) clean latents of input_image", optional=True),
        OutputParam("latents", "(B, h*w, C) start of denoising", optional=True),
    )

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        if inputs["input_image"] is None:
            return {}
        flux = _pipe(pipe)
        noise = inputs["noise"]
        images = as_image_list(inputs["input_image"], "input_image")
        if len(images) not in (1, noise.shape[0]):
            raise PipelineInputError(f"got {len(images)} input images for {noise.shape[0]} prompts")
        size = (inputs["width"], inputs["height"])
        rgb = [to_rgb(img, argument="input_image") for img in images]
        resized = [img.resize(size, Image.Resampling.LANCZOS) if img.size != size else img for img in rgb]
        pixels = torch.cat([pil_to_tensor(img, argument="input_image") for img in resized])
        latents = pack_latents(flux.encode_image(pixels)).expand(noise.shape[0], -1, -1)
        sigma = float(pipe.scheduler.sigmas[0])
        start = pipe.scheduler.add_noise(latents, noise, sigma)
        return {"input_latents": latents, "latents": start}


class EditImages(PipelineUnit):
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

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        if inputs["edit_image"] is None:
            return {}
        flux = _pipe(pipe)
        auto = True if inputs["edit_image_auto_resize"] is None else bool(inputs["edit_image_auto_resize"])
        tokens, sizes = [], []
        for image in as_image_list(inputs["edit_image"], "edit_image"):
            image = resize_edit_image(to_rgb(image, argument="edit_image"), flux.spatial_factor, auto)
            latents = flux.encode_image(pil_to_tensor(image, argument="edit_image"))  # (1, C, h, w)
            sizes.append((latents.shape[2], latents.shape[3]))
            tokens.append(pack_latents(latents))
        return {
            "edit_latents": torch.cat(tokens, dim=1),
            "edit_image_ids": reference_image_ids(sizes, device=pipe.device),
        }


class InpaintMask(PipelineUnit):
    """Inpainting: the mask (white = repaint) at the latent grid, optionally blurred."""

    name = "flux2_inpaint_mask"
    description = "Turns inpaint_mask (PIL, white = repaint) into (1, h*w, 1) weights at the latent grid."
    after = ("flux2_input_image",)
    inputs = (
        InputParam("inpaint_mask", "PIL mask, white where the image is repainted (needs input_image)"),
        InputParam("inpaint_blur_size", "Gaussian blur kernel size in latent cells (odd), 0/None: none"),
        InputParam("inpaint_blur_sigma", "Gaussian blur sigma in latent cells"),
        InputParam("input_image", "the image being inpainted"),
        InputParam("height", "image height", True),
        InputParam("width", "image width", True),
    )
    outputs = (OutputParam("inpaint_mask", "(1, h*w, 1) repaint weights in [0, 1]", optional=True),)

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        mask = inputs["inpaint_mask"]
        if mask is None:
            return {}
        if inputs["input_image"] is None:
            raise PipelineInputError("inpaint_mask needs input_image (the picture to repaint)")
        if not isinstance(mask, Image.Image):
            raise PipelineInputError(f"inpaint_mask must be a PIL image, got {type(mask).__name__}")
        h, w = _pipe(pipe).latent_grid(inputs["height"], inputs["width"])
        rgb = to_rgb(mask, argument="inpaint_mask").resize((w, h), Image.Resampling.BILINEAR)
        grey = pil_to_tensor(rgb, argument="inpaint_mask").mean(1, keepdim=True)
        weights = (grey + 1) / 2  # (1, 1, h, w) in [0, 1]
        size = int(inputs["inpaint_blur_size"] or 0)
        if size > 1:
            weights = gaussian_blur(weights, size, float(inputs["inpaint_blur_sigma"] or size / 3))
        tokens = pack_latents(weights).to(pipe.device, pipe.torch_dtype)
        return {"inpaint_mask": tokens}


def gaussian_blur(x: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` with an odd ``size`` kernel and reflect padding."""
    size = size + 1 - size % 2
    coords = torch.arange(size, dtype=torch.float32) - size // 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(x)
    channels = x.shape[1]
    pad = size // 2
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, size), groups=channels)
    return torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, size, 1), groups=channels)


class Extensions(PipelineUnit):
    """Template-cache inputs the DiT accepts per CFG branch (K/V cache, extra text tokens)."""

    name = "flux2_extensions"
    description = "Passes kv_cache ({'double_i'|'single_i': (K, V)}) and extra_text_embedding to each branch."
    per_branch = True
    after = ("flux2_encode_prompt",)
    inputs = (
        InputParam("kv_cache", "per-block (K, V) appended after RoPE, each (1|B, L_kv, H, Dh)", per_branch=True),
        InputParam("extra_text_embedding", "(1|B, L_extra, context width) extra text tokens", per_branch=True),
    )
    outputs = (
        OutputParam("kv_extension", "the branch's per-block K/V extension", optional=True),
        OutputParam("extra_ctx", "the branch's extra text tokens", optional=True),
    )

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        out: dict[str, Any] = {}
        if inputs["kv_cache"] is not None:
            out["kv_extension"] = dict(inputs["kv_cache"])
        if inputs["extra_text_embedding"] is not None:
            out["extra_ctx"] = inputs["extra_text_embedding"].to(pipe.device, pipe.torch_dtype)
        return out


class Decode(PipelineUnit):
    """Latents -> images."""

    name = "flux2_decode"
    stage = "finish"
    description = "Unpacks the final tokens to (B, C, h, w), VAE-decodes them and converts to output_type."
    components = ("vae",)
    inputs = (
        InputParam("latents", "(B, h*w, C) final tokens", True),
        InputParam("height", "image height", True),
        InputParam("width", "image width", True),
        InputParam("output_type", "pil | np | pt | latent"),
        InputParam("single", "one prompt was given: return one image"),
    )
    outputs = (OutputParam("output", "the images (or the latents for output_type='latent')"),)

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        latents = inputs["latents"]
        output_type = inputs["output_type"] or "pil"
        if output_type == "latent":
            return {"output": latents}
        flux = _pipe(pipe)
        h, w = flux.latent_grid(inputs["height"], inputs["width"])
        images = flux.decode_latents(unpack_latents(latents, h, w))
        return {"output": convert_output(images, output_type, bool(inputs["single"]))}


def flux2_units() -> Sequence[PipelineUnit]:
    """Every unit of the FLUX.2 image pipeline."""
    return [
        CheckSize(),
        EncodePrompt(),
        SetTimesteps(),
        Noise(),
        ImageIds(),
        InputImage(),
        EditImages(),
        InpaintMask(),
        Extensions(),
        ReferenceKV(),
        Decode(),
    ]


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


class ReferenceKV(PipelineUnit):
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

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        if not inputs["edit_kv_cache"] or inputs["edit_latents"] is None:
            return {}
        tokens = inputs["edit_latents"].to(pipe.device, pipe.torch_dtype)
        kv = reference_kv(pipe.dit, tokens, inputs["edit_image_ids"], float(inputs["edit_kv_timestep"] or 0.0))
        return {"reference_kv": kv}
