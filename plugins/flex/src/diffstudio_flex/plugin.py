"""Entry module of diffstudio-flex: hook implementations only (no torch at import time)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffstudio import hookimpl

if TYPE_CHECKING:
    from diffstudio.pipeline.base import BasePipeline
    from diffstudio.pipeline.units import PipelineUnit


@hookimpl
def pipeline_unit(pipeline: BasePipeline) -> list[PipelineUnit] | None:
    """``flex_conditioning`` for FLUX.1 pipelines whose DiT takes channel conditioning (``img_cond``)."""
    if pipeline.family != "flux1" or "img_cond" not in type(pipeline).extension_inputs:
        return None
    from diffstudio_flex.units import FlexConditioning

    return [FlexConditioning()]
