"""Entry module of diffstudio-controlnet: hook implementations only (no torch at import time)."""

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
    """Claim FLUX.1 ControlNets (diffusers ``FluxControlNetModel`` layout, or this plugin's BFL layout)."""
    from diffstudio_controlnet.loaders import claim_controlnet

    return claim_controlnet(checkpoint)


@hookimpl
def pipeline_unit(pipeline: BasePipeline) -> list[PipelineUnit] | None:
    """``controlnet_prepare`` for FLUX.1 pipelines that honour per-call hooks (``call_hooks``)."""
    if pipeline.family != "flux1" or "call_hooks" not in type(pipeline).extension_inputs:
        return None
    from diffstudio_controlnet.units import ControlNetPrepare

    return [ControlNetPrepare()]
