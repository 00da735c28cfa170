"""Entry module of diffstudio-infiniteyou: hook implementations only (no torch at import time)."""

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
    """Claim the InfuseNet (by its folder name), the image projector and the IR-SE ArcFace (by their keys)."""
    from diffstudio_infiniteyou.loaders import claim

    return claim(checkpoint)


@hookimpl
def pipeline_unit(pipeline: BasePipeline) -> list[PipelineUnit] | None:
    """``infiniteyou_face`` and ``infiniteyou_prepare`` for FLUX.1 pipelines that honour ``call_hooks``."""
    if pipeline.family != "flux1" or "call_hooks" not in type(pipeline).extension_inputs:
        return None
    from diffstudio_infiniteyou.units import units

    return list(units())
