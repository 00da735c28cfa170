"""diffstudio-qwen-vl: the shared Qwen2.5-VL encoder slot (Step1X-Edit, Nexus-Gen).

Public names (imported lazily):

* weights: ``load_qwen_vl(source, torch_dtype, device, *, config, ignore_prefixes) -> Qwen2_5_VLModel`` (both key
  layouts), ``qwen_vl_layout``, ``is_qwen_vl``, ``QwenVLCheckpointError``;
* processor: ``load_processor(folder, *, min_pixels, max_pixels)``, ``ImageTextProcessor``,
  ``ProcessorConfigError``;
* hidden states: ``last_hidden_state(model, batch) -> (B, L, hidden)``, ``model_inputs``;
* the slot: ``SLOT`` (``"qwen_vl"``), ``FAMILY`` (``"qwen-vl"``, for a pipeline's ``shared_families``).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "load_qwen_vl": "diffstudio_qwen_vl.weights",
    "qwen_vl_layout": "diffstudio_qwen_vl.weights",
    "is_qwen_vl": "diffstudio_qwen_vl.weights",
    "QwenVLCheckpointError": "diffstudio_qwen_vl.weights",
    "load_processor": "diffstudio_qwen_vl.processor",
    "ImageTextProcessor": "diffstudio_qwen_vl.processor",
    "ProcessorConfigError": "diffstudio_qwen_vl.processor",
    "last_hidden_state": "diffstudio_qwen_vl.encoder",
    "model_inputs": "diffstudio_qwen_vl.encoder",
    "SLOT": "diffstudio_qwen_vl.slot",
    "FAMILY": "diffstudio_qwen_vl.slot",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffstudio_qwen_vl' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
