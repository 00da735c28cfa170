"""diffstudio-step1x: stepfun-ai/Step1X-Edit on FLUX.1 (Qwen2.5-VL prompt embedding, per-call connector).

Public names (imported lazily): ``Step1XEditPipeline``, ``Step1XDiT``, ``Qwen2Connector``, ``ConnectorParams``,
``Step1XPromptEncoder``, ``ReferenceResizedWarning``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Step1XEditPipeline": "diffstudio_step1x.pipeline",
    "Step1XDiT": "diffstudio_step1x.model",
    "Qwen2Connector": "diffstudio_step1x.connector",
    "ConnectorParams": "diffstudio_step1x.connector",
    "Step1XPromptEncoder": "diffstudio_step1x.prompt",
    "ReferenceResizedWarning": "diffstudio_step1x.units",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffstudio_step1x' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
