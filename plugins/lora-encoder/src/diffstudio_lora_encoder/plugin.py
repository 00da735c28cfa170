"""Entry module of diffstudio-lora-encoder: hook implementations only (no torch at import time)."""

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
    """Claim DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev (``embedder.model_dict.*.x``, ``special_embeds`` ...)."""
    from diffstudio_lora_encoder.loaders import claim_lora_encoder

    return claim_lora_encoder(checkpoint)


@hookimpl
def pipeline_unit(pipeline: BasePipeline) -> list[PipelineUnit] | None:
    """``lora_encoder_encode`` for FLUX.1 pipelines with a ``lora_encoder`` slot that honour ``extra_txt``."""
    if pipeline.family != "flux1" or "lora_encoder" not in type(pipeline).slots:
        return None
    if "extra_txt" not in type(pipeline).extension_inputs:
        return None
    from diffstudio_lora_encoder.units import LoraEncode

    return [LoraEncode()]
