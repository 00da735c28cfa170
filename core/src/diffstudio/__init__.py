"""diffstudio: a plugin framework for diffusion image models.

The public API is what this module exports. Importing it is cheap (no torch): torch-heavy names are loaded on
first access, so plugin entry modules can write ``from diffstudio import hookimpl`` for free.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from diffstudio._markers import hookimpl
from diffstudio._version import __version__
from diffstudio.startup import freeze_gc_at_exit

freeze_gc_at_exit()  # the interpreter's finalising collection would walk torch's whole heap: diffstudio.startup

if TYPE_CHECKING:  # pragma: no cover - import-time only for type checkers
    from diffstudio.config import ModelConfig
    from diffstudio.loading.checkpoint import Checkpoint
    from diffstudio.pipeline.base import BasePipeline
    from diffstudio.pipeline.units import InputParam, OutputParam, PipelineUnit
    from diffstudio.run_api import run
    from diffstudio.runtime import Runtime
    from diffstudio.scheduler import FlowMatchScheduler
    from diffstudio.templates import TemplatePipeline, load_state_dict, load_template_model

_LAZY: dict[str, str] = {
    "ModelConfig": "diffstudio.config",
    "Checkpoint": "diffstudio.loading.checkpoint",
    "BasePipeline": "diffstudio.pipeline.base",
    "PipelineUnit": "diffstudio.pipeline.units",
    "InputParam": "diffstudio.pipeline.units",
    "OutputParam": "diffstudio.pipeline.units",
    "Runtime": "diffstudio.runtime",
    "FlowMatchScheduler": "diffstudio.scheduler",
    "run": "diffstudio.run_api",
    "TemplatePipeline": "diffstudio.templates",
    "load_template_model": "diffstudio.templates",
    "load_state_dict": "diffstudio.templates",
}

__all__ = [
    "BasePipeline",
    "Checkpoint",
    "FlowMatchScheduler",
    "InputParam",
    "ModelConfig",
    "OutputParam",
    "PipelineUnit",
    "Runtime",
    "TemplatePipeline",
    "__version__",
    "hookimpl",
    "load_state_dict",
    "load_template_model",
    "run",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffstudio' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
