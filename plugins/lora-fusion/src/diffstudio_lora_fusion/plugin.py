"""Entry module of diffstudio-lora-fusion: hook implementations only (no torch at import time)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffstudio import hookimpl

if TYPE_CHECKING:
    from diffstudio.config import ModelConfig
    from diffstudio.loading import Checkpoint
    from diffstudio.pipeline.base import BasePipeline
    from diffstudio.pipeline.units import PipelineUnit
    from diffstudio.types import ModelClaim


@hookimpl
def load_model(checkpoint: Checkpoint, config: ModelConfig) -> ModelClaim | None:
    """Claim DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev (``model_dict.<layer>.weight_base`` ...)."""
    from diffstudio_lora_fusion.loaders import claim_lora_fusion

    return claim_lora_fusion(checkpoint)


@hookimpl
def pipeline_unit(pipeline: BasePipeline) -> list[PipelineUnit] | None:
    """``lora_fusion_enable`` for FLUX.1 pipelines with a ``lora_merger`` slot."""
    if pipeline.family != "flux1" or "lora_merger" not in type(pipeline).slots:
        return None
    from diffstudio_lora_fusion.units import LoraFusionEnable

    return [LoraFusionEnable()]
