"""Entry module: ``@hookimpl`` functions only. Import torch-heavy modules inside the hook bodies."""

from __future__ import annotations

from typing import Any

from diffstudio import hookimpl


@hookimpl
def pipeline_unit(pipeline: Any) -> list[Any] | None:
    """Contribute units to pipelines of the families this plugin serves (None: not mine)."""
    if pipeline.family != "example":
        return None
    from diffstudio_example.units import ExampleUnit

    return [ExampleUnit()]
