"""Entry module of diffstudio-flux2: hook implementations only (no torch at import time)."""

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
    from diffstudio_flux2.pipeline import Flux2ImagePipeline

    return Flux2ImagePipeline


@hookimpl
def register_pipelines(register: Callable[[PipelineSpec], None]) -> None:
    """Offer ``Flux2ImagePipeline``."""
    register(PipelineSpec("flux2", "flux2", _pipeline_class, "FLUX.2 dev / klein image generation and editing"))


@hookimpl
def load_model(checkpoint: Checkpoint, config: ModelConfig) -> ModelClaim | None:
    """Claim FLUX.2 DiTs (BFL, ComfyUI, diffusers), autoencoders and Qwen3/Mistral3 text encoders."""
    from diffstudio_flux2.loaders import claim

    return claim(checkpoint)


@hookimpl
def pipeline_unit(pipeline: BasePipeline) -> list[PipelineUnit] | None:
    """The FLUX.2 pipeline's units."""
    if pipeline.family != "flux2":
        return None
    from diffstudio_flux2.units import flux2_units

    return list(flux2_units())


@hookimpl
def register_converters(register: Callable[[Converter], None]) -> None:
    """BFL <-> diffusers converters for the DiT and the autoencoder."""
    from diffstudio.loading.convert import register_bfl_diffusers

    from diffstudio_flux2 import convert as c

    dit = (c.convert_bfl_to_diffusers_dit, c.convert_diffusers_to_bfl_dit, "Flux2Transformer2DModel")
    vae = (c.convert_bfl_to_diffusers_vae, c.convert_diffusers_to_bfl_vae, "AutoencoderKLFlux2")
    register_bfl_diffusers(register, "flux2", "FLUX.2", dit=dit, vae=vae)


@hookimpl
def register_lora_formats(register: Callable[[LoraFormat], None]) -> None:
    """FLUX.2 LoRA layouts (diffusers/PEFT, BFL/ComfyUI, kohya)."""
    from diffstudio_flux2.lora import lora_formats

    for spec in lora_formats():
        register(spec)
