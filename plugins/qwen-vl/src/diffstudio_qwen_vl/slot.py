"""The shared ``qwen_vl`` slot: the claim a pipeline accepts to hold a Qwen2.5-VL model.

A pipeline that uses the slot (Step1X-Edit, Nexus-Gen) names :data:`SLOT` in its ``slots`` and :data:`FAMILY` in
its ``shared_families``; the claim's loader is :func:`~diffstudio_qwen_vl.weights.load_qwen_vl` with the
``ModelConfig``'s ``config=`` laid over the ``config.json`` beside the weights. The pipeline's memory policy
(``vram_policy``) then manages the model like any component (offload, disk streaming, fp8 storage).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diffstudio.types import LoadRequest, ModelClaim

if TYPE_CHECKING:
    from diffstudio.loading import Checkpoint

__all__ = ["FAMILY", "IGNORED_PREFIXES", "SLOT", "claim", "load"]

FAMILY = "qwen-vl"
"""The claim family of Qwen2.5-VL checkpoints (pipelines list it in ``shared_families``)."""

SLOT = "qwen_vl"
"""The pipeline slot the claim fills."""

IGNORED_PREFIXES: tuple[str, ...] = ("vision_head.", "image_prefill_embeds.")
"""Top-level tensors of models built around the VLM (Nexus-Gen's AR model) that the slot does not load."""


def claim(checkpoint: Checkpoint) -> ModelClaim | None:
    """Claim a plain Qwen2.5-VL checkpoint (model type ``qwen2.5-vl``, source format = its key layout).

    Files with other top-level tensors (``vision_head.*``, ...) are left to the plugin of the model that holds them.
    """
    from diffstudio_qwen_vl.weights import LAYOUTS, qwen_vl_layout

    keys = checkpoint.keys()
    layout = qwen_vl_layout(keys)
    if layout is None:
        return None
    own = (*LAYOUTS[layout], "lm_head.")
    if any(not k.startswith(own) for k in keys):  # a model built around the VLM (Nexus-Gen's AR model): its plugin's
        return None
    if any(key.startswith(IGNORED_PREFIXES) for key in checkpoint.keys()):
        return None  # a model built around the VLM (Nexus-Gen's AR model): its own plugin claims the whole file
    return ModelClaim(FAMILY, "qwen2.5-vl", SLOT, layout, load)


def load(checkpoint: Checkpoint, request: LoadRequest) -> Any:
    """Build the ``Qwen2_5_VLModel`` of a claimed checkpoint (config first, ``ModelConfig(config=)`` laid over)."""
    from diffstudio.loading.recipe import text_config

    from diffstudio_qwen_vl.weights import load_qwen_vl

    return load_qwen_vl(
        checkpoint,
        request.torch_dtype,
        request.device,
        config=text_config(checkpoint, request),
        ignore_prefixes=IGNORED_PREFIXES,
    )
