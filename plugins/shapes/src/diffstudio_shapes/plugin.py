"""Entry module of diffstudio-shapes: ``@hookimpl`` functions only; heavy modules load inside the commands."""

from __future__ import annotations

from collections.abc import Callable

from diffstudio import hookimpl
from diffstudio.types import CommandSpec, EmbeddedModel

from diffstudio_shapes import commands, model


@hookimpl
def register_embedded_models(register: Callable[[EmbeddedModel], None]) -> None:
    """Offer ``diffstudio/shapes`` when its weights are present (``make shapes-model`` builds them)."""
    if not model.installed():
        return
    register(
        EmbeddedModel(
            model_id=model.MODEL_ID,
            root=model.WEIGHTS,
            pipeline="flux2",
            description="coloured shapes at 128x128, FLUX.2-klein architecture, trained by diffstudio train",
            model_configs=(model.DIT_FILE, model.VAE_FILE, model.TEXT_ENCODER_FILE),
            tokenizer_pattern=model.TOKENIZER_FOLDER,
            defaults=dict(model.DEFAULTS),
        )
    )


@hookimpl
def register_commands(register: Callable[[CommandSpec], None]) -> None:
    """Register ``shapes-data``, ``shapes-score``, ``shapes-build`` (the recipe) and ``eval-shapes``."""
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
    register(
        CommandSpec(
            "shapes-build",
            "run one stage of the recipe that rebuilds the embedded model (text, vae, dit-init, install)",
            commands.build_arguments,
            commands.build_run,
        )
    )
    register(
        CommandSpec(
            "eval-shapes",
            "generate images for held-out captions and print the analyser's accuracies as JSON",
            commands.eval_arguments,
            commands.eval_run,
        )
    )
