"""Entry module of diffstudio-medium-lora (no torch at import time)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from diffstudio import hookimpl
from diffstudio_template_sdk.media import LORA

if TYPE_CHECKING:
    from diffstudio.pipeline.base import BasePipeline
    from diffstudio.pipeline.units import PipelineUnit


@hookimpl
def template_cache_merge(key: str, values: Sequence[Any], pipeline: BasePipeline) -> Any | None:
    """Concatenate LoRA caches along rank; None for other keys."""
    if key != LORA:
        return None
    from diffstudio_template_sdk.media import merge_lora_caches

    return merge_lora_caches(values)


@hookimpl
def pipeline_unit(pipeline: BasePipeline) -> list[PipelineUnit] | None:
    """The side-path unit, for pipelines that attach ``dit_deltas`` around each denoiser call."""
    if "dit_deltas" not in type(pipeline).extension_inputs:
        return None
    from diffstudio_medium_lora.units import LoraSidePaths

    return [LoraSidePaths()]
