"""Entry module of diffstudio-nexus-gen: hook implementations only (no torch at import time)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from diffstudio import hookimpl
from diffstudio.types import CommandSpec

if TYPE_CHECKING:
    from diffstudio.config import ModelConfig
    from diffstudio.loading import Checkpoint
    from diffstudio.pipeline.base import BasePipeline
    from diffstudio.pipeline.units import PipelineUnit
    from diffstudio.types import ModelClaim


@hookimpl
def load_model(checkpoint: Checkpoint, config: ModelConfig) -> ModelClaim | None:
    """Claim Nexus-Gen's AR model, whole decoder files (refused with advice) and converted decoder heads."""
    from diffstudio_nexus_gen.loaders import claim

    return claim(checkpoint)


@hookimpl
def pipeline_unit(pipeline: BasePipeline) -> list[PipelineUnit] | None:
    """``nexus_gen_prompt`` for FLUX.1 pipelines that honour ``text_stream`` and have the Nexus-Gen slots."""
    if pipeline.family != "flux1" or "text_stream" not in type(pipeline).extension_inputs:
        return None
    if "nexus_gen" not in type(pipeline).slots:
        return None
    from diffstudio_nexus_gen.units import NexusGenPrompt

    return [NexusGenPrompt()]


@hookimpl
def register_commands(register: Callable[[CommandSpec], None]) -> None:
    """``diffstudio nexus-gen-convert``: split a decoder file into a BFL DiT and a head (safetensors)."""
    from diffstudio_nexus_gen import command

    register(CommandSpec("nexus-gen-convert", command.HELP, command.add_arguments, command.run))
