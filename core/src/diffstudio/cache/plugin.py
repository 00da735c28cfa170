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
    """``diffstudio cache calibrate`` arguments (kept here: building the parser imports no torch)."""
    parser.add_argument("action", choices=("calibrate",), help="calibrate: fit TeaCache coefficients for --model")
    parser.add_argument("--model", action="append", help="model files / folder / id (default: the embedded model)")
    parser.add_argument("--tokenizer", action="append", metavar="DIR", help="tokenizer folder, when the model has none")
    parser.add_argument("--prompt", action="append", help="a calibration prompt (repeatable; default: 6 built-in)")
    parser.add_argument("--prompts", metavar="FILE", help="a text file with one calibration prompt per line")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="CFG scale (default: the model's)")
    parser.add_argument("--degree", type=int, default=4, help="polynomial degree (default 4)")
    parser.add_argument("--batch", type=int, default=1, help="prompts per generation (as you will generate them)")
    parser.add_argument("--device", default=None, help="computation device (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="computation dtype (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument(
        "--out", default=None, metavar="FILE.json",
        help="where to write the coefficients (default: <DiT file stem>.teacache.json beside the DiT's weights, "
        "where TeaCache finds them)",
    )  # fmt: skip


def _run(args: argparse.Namespace, runtime: Runtime) -> int:
    from diffstudio.cache.calibrate import run_command

    return run_command(args, runtime)


@hookimpl
def register_commands(register: Callable[[CommandSpec], None]) -> None:
    """Register ``cache`` (``diffstudio cache calibrate``)."""
    register(CommandSpec("cache", "step caching: fit TeaCache coefficients for a model (calibrate)", _arguments, _run))
