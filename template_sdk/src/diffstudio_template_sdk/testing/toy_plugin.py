"""Entry module of the toy family (tests only): hook implementations, no torch at import time."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from diffstudio._markers import hookimpl
from diffstudio.types import LoadRequest, ModelClaim, PipelineSpec

if TYPE_CHECKING:
    from diffstudio.config import ModelConfig
    from diffstudio.loading.checkpoint import Checkpoint
    from diffstudio.pipeline.base import BasePipeline
    from diffstudio.pipeline.units import PipelineUnit

TELLING_KEYS = ("img_in.weight", "txt_embed.weight", "time_in.weight", "img_out.weight")


def _pipeline_class() -> type[Any]:
    from diffstudio_template_sdk.testing.toy import ToyPipeline

    return ToyPipeline


def _load(checkpoint: Checkpoint, request: LoadRequest) -> Any:
    from diffstudio_template_sdk.testing.toy import load_toy

    return load_toy(checkpoint, request)


@hookimpl
def register_pipelines(register: Callable[[PipelineSpec], None]) -> None:
    """Offer the toy pipeline."""
    register(PipelineSpec("toy", "toy", _pipeline_class, "toy family for tests"))


@hookimpl
def load_model(checkpoint: Checkpoint, config: ModelConfig) -> ModelClaim | None:
    """Claim checkpoints that have every toy key with a 256-row byte embedding."""
    if not all(key in checkpoint for key in TELLING_KEYS):
        return None
    if checkpoint.shape("txt_embed.weight")[0] != 256:
        return None
    return ModelClaim("toy", "toy-dit", "dit", "toy", _load)


@hookimpl
def pipeline_unit(pipeline: BasePipeline) -> list[PipelineUnit] | None:
    """The toy pipeline's units."""
    if pipeline.family != "toy":
        return None
    from diffstudio_template_sdk.testing import toy

    return [toy.ToyCheckSize(), toy.ToyEncodePrompt(), toy.ToySetTimesteps(), toy.ToyNoise(), toy.ToyDecode()]
