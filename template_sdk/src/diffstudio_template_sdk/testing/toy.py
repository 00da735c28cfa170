"""A tiny "toy" family for testing runners, command lines and adapters without a real model.

It is a complete family plugin in miniature: a denoiser with random weights saved as a real safetensors file,
claimed by key patterns through ``load_model``, a pipeline registered through ``register_pipelines``, and
units contributed through ``pipeline_unit``. Its latent space is the image itself patchified 4×4
(48 channels per token), so no VAE is needed; its text encoder is a byte-level embedding inside the denoiser.
Besides its prompt encoder, its units are core's standard flow-matching units
(:mod:`diffstudio.pipeline.flow_units`), given the toy's :class:`~diffstudio.pipeline.flow_units.LatentGeometry`.

Its entry module is :mod:`.toy_plugin`: register it with ``Runtime(plugins=[toy_plugin])`` or
``DIFFSTUDIO_PLUGINS=diffstudio_template_sdk.testing.toy_plugin``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffstudio.loading.assign import build_on_meta, load_state_dict_into
from diffstudio.loading.checkpoint import Checkpoint
from diffstudio.pipeline.base import BasePipeline
from diffstudio.pipeline.flow_units import FlowFamily, LatentGeometry, flow_unit_class
from diffstudio.pipeline.units import InputParam, OutputParam, PipelineUnit
from diffstudio.scheduler import FlowMatchScheduler
from diffstudio.types import LoadRequest
from einops import rearrange
from torch import nn

PATCH = 4
CHANNELS = 3 * PATCH * PATCH  # 48 latent channels per token
TEXT_TOKENS = 16


class ToyDenoiser(nn.Module):
    """A one-hidden-layer velocity predictor over patch tokens.

    Args:
        dim: Hidden width.
    """

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.img_in = nn.Linear(CHANNELS, dim)
        self.txt_embed = nn.Embedding(256, dim)
        self.time_in = nn.Linear(1, dim)
        self.hidden = nn.Linear(dim, dim)
        self.img_out = nn.Linear(dim, CHANNELS)

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Embed prompts byte by byte: ``(B, TEXT_TOKENS, dim)`` (zero-padded UTF-8, truncated)."""
        rows = []
        for prompt in prompts:
            data = list(prompt.encode("utf-8")[:TEXT_TOKENS])
            rows.append(data + [0] * (TEXT_TOKENS - len(data)))
        ids = torch.tensor(rows, dtype=torch.long, device=self.txt_embed.weight.device)
        embeds: torch.Tensor = self.txt_embed(ids)
        return embeds

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """Predict velocity.

        Args:
            x: ``(B, L, 48)`` noisy patch tokens.
            timesteps: ``(B,)`` in ``[0, 1]``.
            ctx: ``(B, T, dim)`` prompt embeddings.

        Returns:
            ``(B, L, 48)``.
        """
        h = self.img_in(x)  # (B, L, D)
        h = h + self.time_in(timesteps.to(h.dtype)[:, None, None]) + ctx.mean(dim=1, keepdim=True)
        out: torch.Tensor = self.img_out(torch.nn.functional.silu(self.hidden(torch.nn.functional.silu(h))))
        return out


def write_toy_checkpoint(path: str | Path, *, dim: int = 32, seed: int = 0) -> Path:
    """Save a randomly initialised toy denoiser as a safetensors file; returns the path."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = ToyDenoiser(dim)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"toy": "1"})
    return path


def load_toy(checkpoint: Checkpoint, request: LoadRequest) -> ToyDenoiser:
    dim = checkpoint.shape("txt_embed.weight")[1]
    model = build_on_meta(lambda: ToyDenoiser(dim))
    load_state_dict_into(model, checkpoint.state_dict(), dtype=request.torch_dtype, device=request.device)
    return model.eval()


def patchify(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` → ``(B, H/4 * W/4, 48)`` tokens."""
    return rearrange(images, "b c (h p) (w q) -> b (h w) (c p q)", p=PATCH, q=PATCH)


def unpatchify(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, H/4 * W/4, 48)`` tokens → ``(B, 3, H, W)``."""
    return rearrange(tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=height // PATCH, p=PATCH, q=PATCH)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Latents ``(B, 48, h, w)`` → tokens ``(B, h*w, 48)``, row-major (a view)."""
    return rearrange(latents, "b c h w -> b (h w) c")


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens ``(B, h*w, 48)`` → latents ``(B, 48, h, w)`` (a view)."""
    return rearrange(tokens, "b (h w) c -> b c h w", h=h, w=w)


def latent_geometry(pipe: Any) -> LatentGeometry:
    """The toy's latent layout: 4×4 pixel patches folded into 48 channels, one token per latent pixel.

    The toy draws its noise directly in token layout ``(H/4 * W/4, 48)`` per image (``noise_in_tokens``), and its
    denoiser takes no position ids.
    """
    return LatentGeometry(PATCH, CHANNELS, pack_latents, unpack_latents, noise_in_tokens=True)


class ToyPipeline(BasePipeline):
    """Text-to-image with the toy denoiser (tests only)."""

    family = "toy"
    pipeline_name = "toy"
    slots = {"dit": "the toy denoiser"}

    def default_scheduler(self) -> FlowMatchScheduler:
        """FLUX.1-style shifted flow matching."""
        return FlowMatchScheduler(shift_mode="static", shift=3.0)

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        cfg_scale: float = 1.0,
        height: int = 32,
        width: int = 32,
        seed: int | None = None,
        rand_device: str = "cpu",
        num_inference_steps: int = 4,
        denoising_strength: float = 1.0,
        sigmas: Sequence[float] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        progress_bar_cmd: Callable[..., Any] | None = None,
        callback_on_step_end: Callable[..., Any] | None = None,
        **extra: Any,
    ) -> Any:
        """Generate images; one PIL image for one prompt, a list for a list of prompts."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        inputs: dict[str, Any] = {
            "prompt": prompts,
            "negative_prompt": negatives,
            "cfg_scale": cfg_scale,
            "height": height,
            "width": width,
            "seed": seed,
            "rand_device": rand_device,
            "num_inference_steps": num_inference_steps,
            "denoising_strength": denoising_strength,
            "sigmas": sigmas,
            "latents": latents,
            "output_type": output_type,
            "single": isinstance(prompt, str),
            **extra,
        }
        self.check_inputs(extra)
        return self.generate(inputs, progress_bar_cmd=progress_bar_cmd, callback_on_step_end=callback_on_step_end)

    def encode_image(self, pixels: torch.Tensor, **options: Any) -> torch.Tensor:
        """The toy's "VAE": pixels ``(B, 3, H, W)`` → latents ``(B, 48, H/4, W/4)`` (4×4 patches, channel-major)."""
        latents = rearrange(pixels, "b c (h p) (w q) -> b (c p q) h w", p=PATCH, q=PATCH)
        return latents.to(self.device, self.torch_dtype)

    def decode_latents(self, latents: torch.Tensor, **options: Any) -> torch.Tensor:
        """Latents ``(B, 48, h, w)`` → pixels ``(B, 3, 4h, 4w)`` (float32)."""
        return rearrange(latents.float(), "b (c p q) h w -> b c (h p) (w q)", p=PATCH, q=PATCH)

    def predict_velocity(self, inputs: Mapping[str, Any], step_index: int, timestep: torch.Tensor) -> torch.Tensor:
        """Call the toy denoiser on the branch's prompt embeddings."""
        latents = inputs["latents"]
        t = (timestep / 1000).expand(latents.shape[0]).to(latents)
        velocity: torch.Tensor = self.dit(latents, t, inputs["prompt_embeds"])
        return velocity


class ToyEncodePrompt(PipelineUnit):
    """Byte-level prompt embedding, once per CFG branch."""

    name = "encode_prompt"
    description = "Embeds the (negative) prompts with the denoiser's byte embedding: (B, 16, dim)."
    components = ("dit",)
    per_branch = True
    after = ("check_size",)
    inputs = (InputParam("prompt", "list of B prompts", True, per_branch=True),)
    outputs = (OutputParam("prompt_embeds", "(B, 16, dim) prompt embeddings"),)

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        return {"prompt_embeds": pipe.dit.encode_text(inputs["prompt"])}


TOY_UNITS = FlowFamily("", latent_geometry, tokens="(B, L, 48)", latents="(B, 48, H/4, W/4)", vae=None)
"""The toy's standard units (:mod:`diffstudio.pipeline.flow_units`): no VAE, no position ids."""

ToyCheckSize = flow_unit_class("check_size", TOY_UNITS)
ToySetTimesteps = flow_unit_class("set_timesteps", TOY_UNITS)
ToyNoise = flow_unit_class("noise", TOY_UNITS)
ToyDecode = flow_unit_class("decode", TOY_UNITS)
