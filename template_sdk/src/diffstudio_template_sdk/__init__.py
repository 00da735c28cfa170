"""The stable API for diffstudio template packages and third-party plugins.

Template packages import from here, not from ``diffstudio`` internals, and pin this distribution's major
version. Importing this module is cheap (no torch); torch-heavy names load on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from diffstudio._markers import hookimpl
from diffstudio.errors import CacheMergeError, DiffstudioError, TemplateError, UntrustedCodeError
from diffstudio.types import ModelClaim, PipelineSpec, TemplateSpec

if TYPE_CHECKING:
    from diffstudio.config import ModelConfig
    from diffstudio.pipeline.base import BasePipeline
    from diffstudio.pipeline.units import InputParam, OutputParam, PipelineUnit

#: Version of this SDK's API (semantic versioning; the major changes rarely).
SDK_VERSION = "1.0.0"

_LAZY: dict[str, str] = {
    "ModelConfig": "diffstudio.config",
    "BasePipeline": "diffstudio.pipeline.base",
    "PipelineUnit": "diffstudio.pipeline.units",
    "InputParam": "diffstudio.pipeline.units",
    "OutputParam": "diffstudio.pipeline.units",
}

__all__ = [
    "SDK_VERSION",
    "BasePipeline",
    "CacheMergeError",
    "DiffstudioError",
    "InputParam",
    "ModelClaim",
    "ModelConfig",
    "OutputParam",
    "PipelineSpec",
    "PipelineUnit",
    "TemplateError",
    "TemplateSpec",
    "UntrustedCodeError",
    "hookimpl",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffstudio_template_sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
