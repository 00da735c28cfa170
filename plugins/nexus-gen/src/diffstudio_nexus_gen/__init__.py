"""diffstudio-nexus-gen: DiffSynth-Studio/Nexus-GenV2 (Qwen2.5-VL prefilled embeddings decoded by FLUX.1).

Public names (imported lazily): ``load_decoder``, ``read_decoder``, ``NexusGenAR``, ``GenerationHead``,
``EditingHead``, ``MergerParams``, ``editing_text_ids``, ``convert_legacy_to_bfl_dit``, ``convert_bfl_to_legacy_dit``,
``split_decoder``, ``convert_decoder_file``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "load_decoder": "diffstudio_nexus_gen.loaders",
    "read_decoder": "diffstudio_nexus_gen.loaders",
    "NexusGenAR": "diffstudio_nexus_gen.ar",
    "GenerationHead": "diffstudio_nexus_gen.heads",
    "EditingHead": "diffstudio_nexus_gen.heads",
    "MergerParams": "diffstudio_nexus_gen.heads",
    "editing_text_ids": "diffstudio_nexus_gen.heads",
    "convert_legacy_to_bfl_dit": "diffstudio_nexus_gen.convert",
    "convert_bfl_to_legacy_dit": "diffstudio_nexus_gen.convert",
    "split_decoder": "diffstudio_nexus_gen.convert",
    "convert_decoder_file": "diffstudio_nexus_gen.command",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffstudio_nexus_gen' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
