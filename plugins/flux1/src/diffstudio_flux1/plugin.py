"""Entry module of diffstudio-flux1: hook implementations only (no torch at import time)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from diffstudio import hookimpl
from diffstudio.types import LoraFormat, ModelClaim, PipelineSpec

if TYPE_CHECKING:
    from diffstudio.config import ModelConfig
    from diffstudio.loading import Checkpoint
    from diffstudio.loading.convert import Converter
    from diffstudio.pipeline.base import BasePipeline
    from diffstudio.pipeline.units import PipelineUnit


def _pipeline_class() -> type[Any]:
    from diffstudio_flux1.pipeline import FluxImagePipeline

    return FluxImagePipeline


@hookimpl
def register_pipelines(register: Callable[[PipelineSpec], None]) -> None:
    """Offer ``FluxImagePipeline``."""
    register(PipelineSpec("flux1", "flux1", _pipeline_class, "FLUX.1 dev / schnell / Kontext image generation"))


@hookimpl
def load_model(checkpoint: Checkpoint, config: ModelConfig) -> ModelClaim | None:
    """Claim FLUX.1 DiTs (BFL, ComfyUI, diffusers), autoencoders and CLIP / T5 text encoders."""
    from diffstudio_flux1.loaders import claim, named_variant

    found = claim(checkpoint)
    return None if found is None else named_variant(found, checkpoint, config)


@hookimpl
def pipeline_unit(pipeline: BasePipeline) -> list[PipelineUnit] | None:
    """The FLUX.1 pipeline's units."""
    if pipeline.family != "flux1":
        return None
    from diffstudio_flux1.units import flux1_units

    return list(flux1_units())


@hookimpl
def register_converters(register: Callable[[Converter], None]) -> None:
    """BFL <-> diffusers converters for the DiT and the autoencoder."""
    from diffstudio.loading.convert import register_bfl_diffusers

    from diffstudio_flux1 import convert as c

    dit = (c.convert_bfl_to_diffusers_dit, c.convert_diffusers_to_bfl_dit, "FluxTransformer2DModel")
    vae = (c.convert_bfl_to_diffusers_vae, c.convert_diffusers_to_bfl_vae, "AutoencoderKL")
    register_bfl_diffusers(register, "flux1", "FLUX.1", dit=dit, vae=vae)


@hookimpl
def register_lora_formats(register: Callable[[LoraFormat], None]) -> None:
    """FLUX.1 LoRA layouts (diffusers/PEFT, kohya, BFL/ComfyUI, XLabs, DiffSynth)."""
    from diffstudio_flux1.lora_formats import layouts

    for spec in layouts():
        register(spec)
