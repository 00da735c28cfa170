"""The plugin's units: stateless, declared, ordered by named anchors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffstudio import InputParam, OutputParam, PipelineUnit


class ExampleUnit(PipelineUnit):
    """Copies ``example_input`` to ``example_output``."""

    name = "example"
    description = "Copies example_input to example_output (a template for real units)."
    after = ("noise",)
    inputs = (InputParam("example_input", "any value"),)
    outputs = (OutputParam("example_output", "the same value", optional=True),)

    def process(self, pipe: Any, **inputs: Any) -> Mapping[str, Any]:
        if inputs["example_input"] is None:
            return {}
        return {"example_output": inputs["example_input"]}
