"""diffstudio-lora-fusion: DiffSynth-Studio's LoRAFusion, a learned per-Linear gate over several side-path LoRAs.

Public names (imported lazily): ``FluxLoraFusion``, ``LoraMerger``, ``LoraFusionMismatchError``,
``enable_lora_merger``, ``disable_lora_merger``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "FluxLoraFusion": "diffstudio_lora_fusion.model",
    "LoraMerger": "diffstudio_lora_fusion.model",
    "LoraFusionMismatchError": "diffstudio_lora_fusion.model",
    "enable_lora_merger": "diffstudio_lora_fusion.model",
    "disable_lora_merger": "diffstudio_lora_fusion.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffstudio_lora_fusion' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
