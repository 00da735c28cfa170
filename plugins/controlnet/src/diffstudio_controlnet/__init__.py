"""diffstudio-controlnet: FLUX.1 ControlNets (plain, InstantX Union, alimama Inpainting, jasperai Upscaler).

Public names (imported lazily): ``ControlNetInput``, ``UNION_MODES``, ``FluxControlNet``, ``ControlNetParams``,
``ControlNetGroup``, ``ControlImageResizedWarning``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ControlNetInput": "diffstudio_controlnet.inputs",
    "UNION_MODES": "diffstudio_controlnet.inputs",
    "FluxControlNet": "diffstudio_controlnet.model",
    "ControlNetParams": "diffstudio_controlnet.model",
    "ControlNetGroup": "diffstudio_controlnet.units",
    "ControlImageResizedWarning": "diffstudio_controlnet.units",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffstudio_controlnet' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
