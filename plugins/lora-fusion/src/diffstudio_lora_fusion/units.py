"""The LoRA-Fusion unit of ``FluxImagePipeline``: install the loaded merger's gates before denoising.

``lora_fusion_enable`` (prepare stage) installs the merger in the ``lora_merger`` slot as the combiner of every
DiT Linear it gates, unless it was disabled with :func:`~diffstudio_lora_fusion.model.disable_lora_merger`. So
loading the merger enables it for the next call; ``pipe.enable_lora_merger()`` (seed API) enables it at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffstudio.pipeline.base import BasePipeline
from diffstudio.pipeline.units import PipelineUnit

from diffstudio_lora_fusion.model import FluxLoraFusion


class LoraFusionEnable(PipelineUnit):
    """Install the LoRA merger's gates on the DiT (idempotent)."""

    name = "lora_fusion_enable"
    description = (
        "Installs the loaded LoRA merger (LoRAFusion) as the combiner of each DiT Linear: side-path LoRA outputs "
        "are gated against the base output instead of summed. Nothing happens without a merger or when disabled."
    )
    components = ()  # it only sets attributes: nothing to onload (no memory shuffling under offloading)
    after = ("flux1_encode_prompt", "flux1_extensions", "flux1_kontext", "flux1_input_image", "flux1_inpaint_mask")
    inputs = ()
    outputs = ()

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        if not pipe.has("lora_merger") or not pipe.has("dit"):
            return {}
        merger: FluxLoraFusion = getattr(pipe, "lora_merger")  # noqa: B009 (a slot, served by __getattr__)
        if merger.active and not merger.enabled_on(pipe.dit):
            merger.enable(pipe.dit)
        return {}
