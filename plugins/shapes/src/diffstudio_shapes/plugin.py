"""Entry module of diffstudio-shapes: ``@hookimpl`` functions only; heavy modules load inside the commands."""

from __future__ import annotations

from collections.abc import Callable

from diffstudio import hookimpl
from diffstudio.types import CommandSpec

from diffstudio_shapes import commands


@hookimpl
def register_commands(register: Callable[[CommandSpec], None]) -> None:
    """Register ``shapes-data`` (write the data set) and ``shapes-score`` (score images against captions)."""
    register(
        CommandSpec(
            "shapes-data",
            "write the procedural shapes data set (images/*.png + metadata.csv)",
            commands.data_arguments,
            commands.data_run,
        )
    )
    register(
        CommandSpec(
            "shapes-score",
            "score shapes images against their captions (colour, background, shape, position, size)",
            commands.score_arguments,
            commands.score_run,
        )
    )
