"""diffstudio-flux2: the FLUX.2 family (dev and klein) for diffstudio.

Public names (imported lazily, so that importing the package stays cheap): ``Flux2ImagePipeline``, the DiT
``Flux2`` with ``Flux2Params``, the autoencoder ``Flux2AutoEncoder`` with ``AutoEncoderParams``, and the LoRA
helpers ``apply_lora`` / ``remove_lora``. The model code lives in ``params``, ``math``, ``layers``, ``model``,
``vae``, ``convert`` (diffusers <-> BFL converters), ``text_encoders``, ``loaders``, ``units`` and ``pipeline``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Flux2ImagePipeline": "diffstudio_flux2.pipeline",
    "Flux2": "diffstudio_flux2.model",
    "Flux2Params": "diffstudio_flux2.params",
    "Flux2AutoEncoder": "diffstudio_flux2.vae",
    "AutoEncoderParams": "diffstudio_flux2.params",
    "apply_lora": "diffstudio_flux2.lora",
    "remove_lora": "diffstudio_flux2.lora",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffstudio_flux2' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
