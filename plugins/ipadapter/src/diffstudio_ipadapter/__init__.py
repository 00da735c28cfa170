"""diffstudio-ipadapter: FLUX.1 IP-Adapters (InstantX with SigLIP, XLabs with CLIP vision).

Public names (imported lazily): ``FluxIPAdapter``, ``IPAdapterProcessor``, ``convert_instantx_bin``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "FluxIPAdapter": "diffstudio_ipadapter.model",
    "IPAdapterProcessor": "diffstudio_ipadapter.units",
    "convert_instantx_bin": "diffstudio_ipadapter.loaders",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffstudio_ipadapter' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
