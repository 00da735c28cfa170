"""Entry module of diffstudio-eligen: hook implementations only (no torch at import time)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffstudio import hookimpl

if TYPE_CHECKING:
    from diffstudio.pipeline.base import BasePipeline
    from diffstudio.pipeline.units import PipelineUnit


@hookimpl
def pipeline_unit(pipeline: BasePipeline) -> list[PipelineUnit] | None:
    """EliGen's units for FLUX.1 pipelines that pass ``extra_txt`` and ``attention_kwargs`` to the DiT."""
    needed = {"extra_txt", "attention_kwargs"}
    if pipeline.family != "flux1" or not needed <= type(pipeline).extension_inputs:
        return None
    from diffstudio_eligen.units import EliGenBranches, EliGenInpaint, EliGenPrepare

    return [EliGenBranches(), EliGenPrepare(), EliGenInpaint()]
