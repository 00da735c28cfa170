"""Core's builtin step-cache plugin: the ``step_cache`` unit and ``diffstudio cache calibrate``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from diffstudio._markers import hookimpl
from diffstudio.types import CommandSpec

if TYPE_CHECKING:
    from diffstudio.runtime import Runtime


@hookimpl
def pipeline_unit(pipeline: Any) -> list[Any] | None:
    """The ``step_cache`` unit for pipelines whose ``predict_velocity`` honours ``stack_hook``."""
    if "stack_hook" not in getattr(type(pipeline), "extension_inputs", ()) or not getattr(pipeline, "family", ""):
        return None
    from diffstudio.cache.units import step_cache_unit

    return [step_cache_unit(pipeline.family)]


def _arguments(parser: argparse.ArgumentParser) -> None:
    from diffstudio.cache.calibrate import add_arguments

    add_arguments(parser)


def _run(args: argparse.Namespace, runtime: Runtime) -> int:
    from diffstudio.cache.calibrate import run_command

    return run_command(args, runtime)


@hookimpl
def register_commands(register: Callable[[CommandSpec], None]) -> None:
    """Register ``cache`` (``diffstudio cache calibrate``)."""
    register(CommandSpec("cache", "step caching: fit TeaCache coefficients for a model (calibrate)", _arguments, _run))
