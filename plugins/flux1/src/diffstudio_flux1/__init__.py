"""diffstudio-flux1: the FLUX.1 family (dev, schnell, Kontext) for diffstudio.

Public names (imported lazily, so that importing the package stays cheap): ``FluxImagePipeline``, the DiT
``Flux`` with ``FluxParams``, the autoencoder ``AutoEncoder`` with ``AutoEncoderParams``, and the LoRA helpers
``apply_lora`` / ``remove_lora``. The model code lives in ``params``, ``math``, ``layers``, ``model``, ``vae``,
``tiling``, ``convert`` (diffusers <-> BFL converters), ``text_encoders``, ``loaders``, ``units``, ``pipeline``,
``lora_formats`` and ``lora``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "FluxImagePipeline": "diffstudio_flux1.pipeline",
    "Flux": "diffstudio_flux1.model",
    "FluxParams": "diffstudio_flux1.params",
    "AutoEncoder": "diffstudio_flux1.vae",
    "AutoEncoderParams": "diffstudio_flux1.params",
    "apply_lora": "diffstudio_flux1.lora",
    "remove_lora": "diffstudio_flux1.lora",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffstudio_flux1' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
