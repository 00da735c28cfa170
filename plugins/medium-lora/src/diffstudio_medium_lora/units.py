"""The LoRA side-path unit and the side path itself."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffstudio.errors import CacheFormatError
from diffstudio.lora import LoraWeights
from diffstudio.nn.delta import delta_linears
from diffstudio.pipeline.base import BasePipeline
from diffstudio.pipeline.units import InputParam, OutputParam, PipelineUnit
from diffstudio_template_sdk.media import check_lora_cache
from torch import Tensor


class LoraSidePath:
    """``x -> factor * (x @ down.T) @ up.T`` over the template's tensors themselves (no copy, so differentiable).

    Args:
        weights: ``down (r, in)``, ``up (out, r)``, alpha.
    """

    def __init__(self, weights: LoraWeights) -> None:
        self.down = weights.down
        self.up = weights.up
        self.factor = weights.factor

    def __call__(self, x: Tensor) -> Tensor:
        """``(..., in) -> (..., out)`` in ``x``'s dtype and device."""
        down, up = self.down, self.up
        if down.device != x.device or down.dtype != x.dtype:
            down, up = down.to(x), up.to(x)
        out: Tensor = (x @ down.T) @ up.T
        return out * self.factor if self.factor != 1.0 else out


class LoraSidePaths(PipelineUnit):
    """Turn the branch's ``lora`` cache into side paths the family attaches for each denoiser call."""

    name = "medium_lora_side_paths"
    description = "Checks lora against the DiT's DeltaLinear layers and writes dit_deltas (side paths, per branch)."
    per_branch = True
    inputs = (
        InputParam("lora", "{DeltaLinear path: LoraWeights(down (r, in), up (out, r))} or flat lora_A/lora_B tensors",
                   per_branch=True),
    )  # fmt: skip
    outputs = (OutputParam("dit_deltas", "{DeltaLinear path: side path} attached around each DiT call", optional=True),)

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        if inputs["lora"] is None:
            return {}
        lora = check_lora_cache(inputs["lora"])
        layers = dict(delta_linears(pipe.dit)) if pipe.has("dit") else {}
        unknown = sorted(set(lora) - set(layers))
        if unknown:
            raise CacheFormatError(
                f"lora targets {len(unknown)} module(s) the DiT does not have, e.g. {unknown[:3]}; its LoRA-capable "
                f"layers are named like {sorted(layers)[:3]}"
            )
        for path, weights in lora.items():
            layer = layers[path]
            if (weights.down.shape[1], weights.up.shape[0]) != (layer.in_features, layer.out_features):
                raise CacheFormatError(
                    f"lora[{path!r}] maps {weights.down.shape[1]} -> {weights.up.shape[0]} features; the layer is "
                    f"{layer.in_features} -> {layer.out_features}"
                )
        return {"dit_deltas": {path: LoraSidePath(weights) for path, weights in lora.items()}}
