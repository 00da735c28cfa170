"""diffstudio-eligen: EliGen regional prompts for FLUX.1 (entity prompts + masks, masked joint attention).

Public names (imported lazily): ``regional_mask``, ``RegionalAttentionProcessor``, ``MASK_KEY``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "regional_mask": "diffstudio_eligen.mask",
    "RegionalAttentionProcessor": "diffstudio_eligen.mask",
    "MASK_KEY": "diffstudio_eligen.mask",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffstudio_eligen' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
