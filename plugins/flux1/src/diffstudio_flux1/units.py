"""The units of :class:`~diffstudio_flux1.pipeline.FluxImagePipeline`.

Prepare stage, in anchor order: ``flux1_check_size`` -> ``flux1_encode_prompt`` (per CFG branch) ->
``flux1_set_timesteps`` -> ``flux1_noise`` -> ``flux1_image_ids`` -> ``flux1_input_image`` ->
``flux1_inpaint_mask`` -> ``flux1_guidance`` -> ``flux1_kontext`` -> ``flux1_extensions`` (per branch).
Finish stage: ``flux1_decode``.

Token layout: a latent image ``(B, 16, H/8, W/8)`` becomes ``(B, H/16 * W/16, 64)`` tokens (2 x 2 patches,
row-major); image ids are ``(0, row, col)``, Kontext ids ``(1, row, col)``, text ids zeros.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from diffstudio.errors import PipelineInputError
from diffstudio.pipeline.images import as_image_list, convert_output, pil_to_tensor, to_rgb
from diffstudio.pipeline.units import InputParam, OutputParam, PipelineUnit
from PIL import Image

from diffstudio_flux1.math import KONTEXT_T, image_ids, pack_latents, unpack_latents

if TYPE_CHECKING:
    from diffstudio.pipeline.base import BasePipeline

    from diffstudio_flux1.pipeline import FluxImagePipeline

_HW = (InputParam("height", "image height in pixels", True), InputParam("width", "image width in pixels", True))
_TILING = (
    InputParam("tiled", "VAE in overlapping tiles (large images, less memory)"),
    InputParam("tile_size", "tile side in latent pixels (128)"),
    InputParam("tile_stride", "tile stride in latent pixels (64)"),
)


def _pipe(pipe: BasePipeline) -> FluxImagePipeline:
    return cast("FluxImagePipeline", pipe)


def _tiling(inputs: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "tiled": bool(inputs.get("tiled")),
        "tile_size": int(inputs.get("tile_size") or 128),
        "tile_stride": int(inputs.get("tile_stride") or 64),
    }


class CheckSize(PipelineUnit):
    """Reject sizes that are not multiples of 16."""

    name = "flux1_check_size"
    description = "Checks that height and width are positive multiples of 16 (VAE factor 8 x 2x2 patches)."
    inputs = _HW

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        pipe.check_size(inputs["height"], inputs["width"])
        return {}


class EncodePrompt(PipelineUnit):
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

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        encoded = _pipe(pipe).prompt_encoder().encode(list(inputs["prompt"]), int(inputs["t5_sequence_length"] or 512))
        dtype, device = pipe.torch_dtype, pipe.device
        return {
            "prompt_emb": encoded.txt.to(device, dtype),
            "text_ids": encoded.txt_ids.to(device),
            "pooled_prompt_emb": encoded.y.to(device, dtype),
        }


class SetTimesteps(PipelineUnit):
    """The FLUX.1 schedule: dynamic shift from the token count, or a static ``sigma_shift``."""

    name = "flux1_set_timesteps"
    description = "Sets the schedule: FLUX.1 dynamic shift (mu from the token count) or static sigma_shift."
    after = ("flux1_check_size",)
    inputs = (
        InputParam("num_inference_steps", "number of denoising steps", True),
        InputParam("denoising_strength", "image-to-image strength in (0, 1]; 1.0 for text-to-image"),
        InputParam("sigmas", "explicit (N,) unshifted sigmas, overrides the step count"),
        InputParam("sigma_shift", "static shift s (sigma -> s sigma / (1 + (s - 1) sigma)) instead of dynamic"),
        *_HW,
    )
    outputs = (OutputParam("timesteps", "(N,) timesteps in [0, 1000]"),)

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        sigmas, shift = inputs["sigmas"], inputs["sigma_shift"]
        steps = len(sigmas) if sigmas is not None else inputs["num_inference_steps"]
        h, w = _pipe(pipe).latent_grid(inputs["height"], inputs["width"])
        if shift is not None and not float(shift) > 0:
            raise PipelineInputError(f"sigma_shift must be a positive number, got {shift!r}")
        mu = None if shift is None else math.log(float(shift))  # static shift s == exponential shift mu = ln s
        pipe.scheduler.set_timesteps(
            steps, image_seq_len=h * w, denoising_strength=inputs["denoising_strength"] or 1.0, sigmas=sigmas, mu=mu
        )
        return {"timesteps": pipe.scheduler.timesteps}


class Noise(PipelineUnit):
    """Seeded initial noise (seed + i per image) in the VAE latent layout, or the caller's ``latents``."""

    name = "flux1_noise"
    description = "Draws seeded noise (B, 16, H/8, W/8) on rand_device and packs it to tokens, or takes latents=."
    after = ("flux1_set_timesteps",)
    inputs = (
        InputParam("prompt", "list of B prompts (sets the batch size)", True),
        InputParam("seed", "base seed; None draws one"),
        InputParam("rand_device", "device of the random generator ('cpu' gives the same noise everywhere)"),
        InputParam("latents", "initial noise (B, H/16 * W/16, 64) in token layout"),
        *_HW,
    )
    outputs = (
        OutputParam("latents", "(B, L, 64) noisy tokens"),
        OutputParam("noise", "(B, L, 64) the initial noise"),
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
            if given.ndim != 3 or tuple(given.shape[1:]) != (h * w, 4 * channels) or given.shape[0] not in (1, batch):
                raise PipelineInputError(
                    f"latents= has shape {tuple(given.shape)}; expected (B, {h * w}, {4 * channels}) tokens for "
                    f"{inputs['height']}x{inputs['width']}"
                )
            noise = given.to(pipe.device, pipe.torch_dtype).expand(batch, -1, -1)
        else:
            noise = pack_latents(pipe.generate_noise((channels, 2 * h, 2 * w), seeds, inputs["rand_device"] or "cpu"))
        return {"latents": noise, "noise": noise, "seeds": seeds}


class ImageIds(PipelineUnit):
    """Position ids of the target-image tokens."""

    name = "flux1_image_ids"
    description = "Builds (0, row, col) ids (B, L, 3) for the target latent token grid."
    after = ("flux1_noise",)
    inputs = (InputParam("latents", "(B, L, 64) tokens", True), *_HW)
    outputs = (OutputParam("image_ids", "(B, L, 3) int64 ids"),)

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        h, w = _pipe(pipe).latent_grid(inputs["height"], inputs["width"])
        return {"image_ids": image_ids(inputs["latents"].shape[0], h, w, device=pipe.device)}


def _pixels(images: Sequence[Image.Image], size: tuple[int, int], argument: str) -> torch.Tensor:
    rgb = [to_rgb(img, argument=argument) for img in images]
    resized = [img if img.size == size else img.resize(size, Image.Resampling.LANCZOS) for img in rgb]
    return torch.cat([pil_to_tensor(img, argument=argument) for img in resized])


class InputImage(PipelineUnit):
    """Image-to-image: encode ``input_image`` and start from it, noised to the first sigma."""

    name = "flux1_input_image"
    description = "VAE-encodes input_image to input_latents (B, L, 64) and noises it to the schedule's start."
    components = ("vae",)
    after = ("flux1_noise", "flux1_set_timesteps")
    inputs = (
        InputParam("input_image", "PIL image (or one per prompt) for image-to-image or training"),
        InputParam("noise", "(B, L, 64) initial noise", True),
        *_HW,
        *_TILING,
    )
    outputs = (
        OutputParam("input_latents", "(B, L, 64) clean latents of input_image", optional=True),
        OutputParam("latents", "(B, L, 64) start of denoising", optional=True),
    )

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        if inputs["input_image"] is None:
            return {}
        noise = inputs["noise"]
        images = as_image_list(inputs["input_image"], "input_image")
        if len(images) not in (1, noise.shape[0]):
            raise PipelineInputError(f"got {len(images)} input images for {noise.shape[0]} prompts")
        pixels = _pixels(images, (inputs["width"], inputs["height"]), "input_image")
        latents = pack_latents(_pipe(pipe).encode_image(pixels, **_tiling(inputs))).expand(noise.shape[0], -1, -1)
        start = pipe.scheduler.add_noise(latents, noise, float(pipe.scheduler.sigmas[0]))
        return {"input_latents": latents, "latents": start}


class InpaintMask(PipelineUnit):
    """Inpainting: the mask (white = repaint) at the latent token grid."""

    name = "flux1_inpaint_mask"
    description = "Turns inpaint_mask (PIL, white = repaint) into (1, L, 1) weights at the latent token grid."
    after = ("flux1_input_image",)
    inputs = (
        InputParam("inpaint_mask", "PIL mask, white where the image is repainted (needs input_image)"),
        InputParam("input_image", "the image being inpainted"),
        *_HW,
    )
    outputs = (OutputParam("inpaint_mask", "(1, L, 1) repaint weights in [0, 1]", optional=True),)

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
        return {"inpaint_mask": weights.flatten(2).transpose(1, 2).to(pipe.device, pipe.torch_dtype)}


class Guidance(PipelineUnit):
    """Embedded (distilled) guidance for dev / Kontext; schnell has none."""

    name = "flux1_guidance"
    description = "Turns embedded_guidance (3.5) into a (B,) tensor for guidance-distilled DiTs (None for schnell)."
    components = ("dit",)
    after = ("flux1_noise",)
    inputs = (InputParam("embedded_guidance", "distilled guidance strength (3.5)"), InputParam("noise", "tokens"))
    outputs = (OutputParam("guidance", "(B,) guidance values", optional=True),)

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        if not pipe.dit.guidance_embed:
            return {}
        value = 3.5 if inputs["embedded_guidance"] is None else float(inputs["embedded_guidance"])
        return {"guidance": torch.full((inputs["noise"].shape[0],), value, device=pipe.device)}


class Kontext(PipelineUnit):
    """Kontext editing: reference images become extra image tokens with ids (1, row, col)."""

    name = "flux1_kontext"
    description = "VAE-encodes kontext_images to kontext_latents (1, L_ref, 64) with ids (1, row, col)."
    components = ("vae",)
    after = ("flux1_image_ids",)
    inputs = (InputParam("kontext_images", "PIL image or list of PIL images to edit / refer to"), *_TILING)
    outputs = (
        OutputParam("kontext_latents", "(1, L_ref, 64) reference tokens", optional=True),
        OutputParam("kontext_image_ids", "(1, L_ref, 3) their ids, t = 1", optional=True),
    )

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        if inputs["kontext_images"] is None:
            return {}
        flux = _pipe(pipe)
        tokens, ids = [], []
        for image in as_image_list(inputs["kontext_images"], "kontext_images"):
            w, h = image.size
            f = flux.spatial_factor
            if w < f or h < f:
                raise PipelineInputError(f"kontext image of size {w}x{h} is smaller than {f} pixels")
            if w % f or h % f:
                left, top = (w % f) // 2, (h % f) // 2
                image = image.crop((left, top, left + w // f * f, top + h // f * f))
            latents = flux.encode_image(pil_to_tensor(image, argument="kontext_images"), **_tiling(inputs))
            tokens.append(pack_latents(latents))
            ids.append(image_ids(1, latents.shape[2] // 2, latents.shape[3] // 2, t=KONTEXT_T, device=pipe.device))
        return {"kontext_latents": torch.cat(tokens, dim=1), "kontext_image_ids": torch.cat(ids, dim=1)}


class Extensions(PipelineUnit):
    """Template-cache inputs the DiT accepts per CFG branch (K/V cache, extra text tokens)."""

    name = "flux1_extensions"
    description = "Passes kv_cache ({'double_i'|'single_i': (K, V)}) and extra_text_embedding to each branch."
    per_branch = True
    after = ("flux1_encode_prompt",)
    inputs = (
        InputParam("kv_cache", "per-block (K, V) appended after RoPE, each (1|B, L_kv, H, Dh)", per_branch=True),
        InputParam("extra_text_embedding", "(1|B, L_extra, 4096) extra T5-space tokens", per_branch=True),
    )
    outputs = (
        OutputParam("kv_extension", "the branch's per-block K/V extension", optional=True),
        OutputParam("extra_txt", "the branch's extra text tokens", optional=True),
    )

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        out: dict[str, Any] = {}
        if inputs["kv_cache"] is not None:
            out["kv_extension"] = dict(inputs["kv_cache"])
        if inputs["extra_text_embedding"] is not None:
            out["extra_txt"] = inputs["extra_text_embedding"].to(pipe.device, pipe.torch_dtype)
        return out


class Decode(PipelineUnit):
    """Latents -> images."""

    name = "flux1_decode"
    stage = "finish"
    description = "Unpacks the final tokens to (B, 16, H/8, W/8), VAE-decodes them (optionally tiled)."
    components = ("vae",)
    inputs = (
        InputParam("latents", "(B, L, 64) final tokens", True),
        *_HW,
        *_TILING,
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
        images = flux.decode_latents(unpack_latents(latents, 2 * h, 2 * w), **_tiling(inputs))
        return {"output": convert_output(images, output_type, bool(inputs["single"]))}


def flux1_units() -> Sequence[PipelineUnit]:
    """Every unit of the FLUX.1 image pipeline."""
    return [
        CheckSize(),
        EncodePrompt(),
        SetTimesteps(),
        Noise(),
        ImageIds(),
        InputImage(),
        InpaintMask(),
        Guidance(),
        Kontext(),
        Extensions(),
        Decode(),
    ]
