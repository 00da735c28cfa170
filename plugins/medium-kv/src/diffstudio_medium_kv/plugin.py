"""Entry module of diffstudio-medium-kv (no torch at import time)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from diffstudio import hookimpl
from diffstudio_template_sdk.media import EXTRA_TEXT, KV_CACHE

if TYPE_CHECKING:
    from diffstudio.pipeline.base import BasePipeline
    from diffstudio.pipeline.units import PipelineUnit


@hookimpl
def template_cache_merge(key: str, values: Sequence[Any], pipeline: BasePipeline) -> Any | None:
    """Concatenate KV caches (per block) and extra text tokens along tokens; None for other keys."""
    if key == KV_CACHE:
        from diffstudio_template_sdk.media import merge_kv_caches

        return merge_kv_caches(values)
    if key == EXTRA_TEXT:
        from diffstudio_template_sdk.media import merge_extra_text

        return merge_extra_text(values)
    return None


@hookimpl
def pipeline_unit(pipeline: BasePipeline) -> list[PipelineUnit] | None:
    """The KV-cache check, for pipelines whose denoiser takes a per-block K/V extension."""
    if "kv_extension" not in type(pipeline).extension_inputs:
        return None
    from diffstudio_medium_kv.units import CheckKVCache

    return [CheckKVCache()]
