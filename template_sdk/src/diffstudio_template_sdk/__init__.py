"""The stable API for diffstudio template packages and third-party plugins.

Template packages import from here, not from ``diffstudio`` internals, and pin this distribution's major
version. Importing this module is cheap (no torch); torch-heavy names load on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from diffstudio._markers import hookimpl
from diffstudio.errors import (
    CacheFormatError,
    CacheMergeError,
    CodeHashMismatchError,
    DiffstudioError,
    RemoteCodeDisabledError,
    TemplateCacheKeyError,
    TemplateError,
    TemplateFormatError,
    TemplateInputError,
    UntrustedCodeError,
)
from diffstudio.types import ModelClaim, PipelineSpec, TemplateSpec

from diffstudio_template_sdk.protocols import DataProcessor, TemplateModel
from diffstudio_template_sdk.registration import template, templates_hook

if TYPE_CHECKING:
    from diffstudio.config import ModelConfig
    from diffstudio.pipeline.base import BasePipeline
    from diffstudio.pipeline.units import InputParam, OutputParam, PipelineUnit
    from diffstudio.templates import (
        RESERVED_INPUTS,
        LoadedTemplate,
        TemplatePipeline,
        check_template_class,
        export_template,
        forward_template,
        load_state_dict,
        load_template,
        load_template_model,
        process_template_inputs,
        run_template,
    )

#: Version of this SDK's API (semantic versioning; the major changes rarely).
SDK_VERSION = "1.0.0"

_LAZY: dict[str, str] = {
    "ModelConfig": "diffstudio.config",
    "BasePipeline": "diffstudio.pipeline.base",
    "PipelineUnit": "diffstudio.pipeline.units",
    "InputParam": "diffstudio.pipeline.units",
    "OutputParam": "diffstudio.pipeline.units",
    "RESERVED_INPUTS": "diffstudio.templates",
    "LoadedTemplate": "diffstudio.templates",
    "TemplatePipeline": "diffstudio.templates",
    "check_template_class": "diffstudio.templates",
    "export_template": "diffstudio.templates",
    "forward_template": "diffstudio.templates",
    "load_state_dict": "diffstudio.templates",
    "load_template": "diffstudio.templates",
    "load_template_model": "diffstudio.templates",
    "process_template_inputs": "diffstudio.templates",
    "run_template": "diffstudio.templates",
}

__all__ = [
    "RESERVED_INPUTS",
    "SDK_VERSION",
    "BasePipeline",
    "CacheFormatError",
    "CacheMergeError",
    "CodeHashMismatchError",
    "DataProcessor",
    "DiffstudioError",
    "InputParam",
    "LoadedTemplate",
    "ModelClaim",
    "ModelConfig",
    "OutputParam",
    "PipelineSpec",
    "PipelineUnit",
    "RemoteCodeDisabledError",
    "TemplateCacheKeyError",
    "TemplateError",
    "TemplateFormatError",
    "TemplateInputError",
    "TemplateModel",
    "TemplatePipeline",
    "TemplateSpec",
    "UntrustedCodeError",
    "check_template_class",
    "export_template",
    "forward_template",
    "hookimpl",
    "load_state_dict",
    "load_template",
    "load_template_model",
    "process_template_inputs",
    "run_template",
    "template",
    "templates_hook",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffstudio_template_sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
