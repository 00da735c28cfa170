"""Entry module of diffstudio-ipadapter: hook implementations only (no torch at import time)."""

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
    """Claim InstantX / XLabs IP-Adapter files and SigLIP / CLIP vision encoders."""
    from diffstudio_ipadapter.loaders import claim

    return claim(checkpoint)


@hookimpl
def pipeline_unit(pipeline: BasePipeline) -> list[PipelineUnit] | None:
    """The IP-Adapter units for FLUX.1 pipelines that pass ``attention_kwargs`` and ``block_residual``."""
    if pipeline.family != "flux1" or not {"attention_kwargs", "block_residual"} <= type(pipeline).extension_inputs:
        return None
    from diffstudio_ipadapter.units import IPAdapterBranch, IPAdapterPrepare

    return [IPAdapterBranch(), IPAdapterPrepare()]
