"""diffstudio-lora-encoder: DiffSynth-Studio's LoRA encoder, a LoRA's weights -> one token in T5 space (FLUX.1).

Public names (imported lazily): ``FluxLoraEncoder``, ``LoraEncoderParams``, ``LoraEncoderInputError``,
``LoraEncoderMissingLayersError``, ``encode_loras``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "FluxLoraEncoder": "diffstudio_lora_encoder.model",
    "LoraEncoderParams": "diffstudio_lora_encoder.model",
    "LoraEncoderInputError": "diffstudio_lora_encoder.inputs",
    "LoraEncoderMissingLayersError": "diffstudio_lora_encoder.inputs",
    "encode_loras": "diffstudio_lora_encoder.units",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffstudio_lora_encoder' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
