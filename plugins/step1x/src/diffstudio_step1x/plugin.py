"""Entry module of diffstudio-step1x: hook implementations only (no torch at import time)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from diffstudio import hookimpl
from diffstudio.types import LoraFormat, PipelineSpec

if TYPE_CHECKING:
    from diffstudio.config import ModelConfig
    from diffstudio.loading import Checkpoint
    from diffstudio.pipeline.base import BasePipeline
    from diffstudio.pipeline.units import PipelineUnit
    from diffstudio.types import ModelClaim


def _pipeline_class() -> type[Any]:
    from diffstudio_step1x.pipeline import Step1XEditPipeline

    return Step1XEditPipeline


@hookimpl
def register_pipelines(register: Callable[[PipelineSpec], None]) -> None:
    """Offer ``Step1XEditPipeline``."""
    register(
        PipelineSpec("step1x", "step1x", _pipeline_class, "Step1X-Edit instruction image editing (FLUX.1 + Qwen2.5-VL)")
    )


@hookimpl
def register_lora_formats(register: Callable[[LoraFormat], None]) -> None:
    """``step1x/bfl``: BFL / ComfyUI LoRA keys over the Step1X DiT, connector included (what the trainer writes)."""
    from diffstudio_step1x.lora import layouts

    for spec in layouts():
        register(spec)


@hookimpl
def load_model(checkpoint: Checkpoint, config: ModelConfig) -> ModelClaim | None:
    """Claim ``step1x-edit-*.safetensors`` (the DiT and the connector in one file)."""
    from diffstudio_step1x.model import claim

    return claim(checkpoint)


@hookimpl
def pipeline_unit(pipeline: BasePipeline) -> list[PipelineUnit[Any]] | None:
    """The Step1X pipeline's units; on FLUX.1 pipelines, the unit that redirects ``step1x_reference_image``."""
    from diffstudio_step1x import units

    if pipeline.family == "step1x":
        return list(units.step1x_units())
    if pipeline.family == "flux1":
        return [units.WrongPipeline()]
    return None
