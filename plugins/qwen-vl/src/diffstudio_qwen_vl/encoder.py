"""Hidden states of a Qwen2.5-VL model on processor output: what Step1X reads, and the pieces Nexus-Gen composes.

:func:`last_hidden_state` is one forward of ``Qwen2_5_VLModel`` (text decoder over text tokens with the vision
tower's merged patch embeddings scattered into the ``<|image_pad|>`` positions, multimodal RoPE position ids
from ``get_rope_index``) returning the final-norm output ``(B, L, hidden)``. Systems that need more (Nexus-Gen's
prefilled forward: its own embeddings scattered into placeholder positions, position ids, a head on the hidden
states) use the transformers model directly: ``model.get_input_embeddings()``, ``model.get_image_features``,
``model.get_rope_index``, ``model.language_model(inputs_embeds=..., position_ids=...)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["last_hidden_state", "model_inputs"]

_MODEL_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def model_inputs(batch: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """The processor output's model inputs, moved to the model's computation device (pixels in its dtype).

    Args:
        batch: The processor's ``BatchFeature`` (``input_ids``, ``attention_mask``, ``pixel_values``,
            ``image_grid_thw``, ``mm_token_type_ids``; the last is derived from ``input_ids`` and the model's
            ``image_token_id`` when absent, since transformers 5 uses the 3-D RoPE positions only with it).
        model: The ``Qwen2_5_VLModel`` (its embedding table tells the device and dtype; under a VRAM policy the
            placeholder has the computation device and dtype).
    """
    weight: Any = model.get_input_embeddings().weight  # type: ignore[operator]
    out: dict[str, Any] = {}
    for key in _MODEL_KEYS:
        value = batch.get(key)
        if value is None:
            continue
        if key == "pixel_values":
            value = value.to(weight.device, weight.dtype)
        elif isinstance(value, Tensor):
            value = value.to(weight.device)
        out[key] = value
    if "mm_token_type_ids" not in out and "input_ids" in out:
        config: Any = model.config
        ids = out["input_ids"]
        out["mm_token_type_ids"] = (ids == config.image_token_id).int() + 2 * (ids == config.video_token_id).int()
    return out


@torch.no_grad()
def last_hidden_state(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """Run ``Qwen2_5_VLModel`` on processor output; return the last hidden state ``(B, L, hidden)``.

    Args:
        model: A model from :func:`~diffstudio_qwen_vl.weights.load_qwen_vl` (or any ``Qwen2_5_VLModel``).
        batch: The processor's output for ``B`` texts and their images.
    """
    output = model(**model_inputs(batch, model), use_cache=False, return_dict=True)
    hidden: Tensor = output.last_hidden_state
    return hidden
