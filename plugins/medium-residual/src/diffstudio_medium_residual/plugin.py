"""Entry module of diffstudio-medium-residual (no torch at import time)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from diffstudio import hookimpl
from diffstudio_template_sdk.media import RESIDUALS

if TYPE_CHECKING:
    from diffstudio.pipeline.base import BasePipeline
    from diffstudio.pipeline.units import PipelineUnit


@hookimpl
def template_cache_merge(key: str, values: Sequence[Any], pipeline: BasePipeline) -> Any | None:
    """Sum block residuals; None for other keys."""
    if key != RESIDUALS:
        return None
    from diffstudio_template_sdk.media import merge_residuals

    return merge_residuals(values)


@hookimpl
def pipeline_unit(pipeline: BasePipeline) -> list[PipelineUnit] | None:
    """The residual unit, for pipelines whose denoiser takes a ``block_residual`` hook."""
    if "block_residual" not in type(pipeline).extension_inputs:
        return None
    from diffstudio_medium_residual.units import BlockResiduals

    return [BlockResiduals()]
