"""The ``diffstudio`` command line.

Sub-commands come from the ``register_commands`` hook; core's own (``plugins``, ``run``) are registered by its
builtin plugin like any other. ``main`` returns the exit code; errors diffstudio raises on purpose are printed
as one message (no traceback) with exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from diffstudio._version import __version__
from diffstudio.errors import DiffstudioError


def build_parser(runtime: object) -> argparse.ArgumentParser:
    """Build the parser with one sub-parser per registered command."""
    from diffstudio.runtime import Runtime

    assert isinstance(runtime, Runtime)
    parser = argparse.ArgumentParser(prog="diffstudio", description="diffusion image models, as plugins")
    parser.add_argument("--version", action="version", version=f"diffstudio {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for spec in runtime.hooks.commands():
        command_parser = sub.add_parser(spec.name, help=spec.help, description=spec.help)
        spec.add_arguments(command_parser)
        command_parser.set_defaults(_command=spec.name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    from diffstudio.runtime import Runtime

    try:
        runtime = Runtime()
    except DiffstudioError as exc:
        print(f"diffstudio: error: {exc}", file=sys.stderr)
        return 1
    parser = build_parser(runtime)
    args = parser.parse_args(argv)
    name = getattr(args, "_command", None)
    if name is None:
        parser.print_help()
        return 2
    try:
        return runtime.hooks.commands().get(name).run(args, runtime)
    except DiffstudioError as exc:
        print(f"diffstudio: error: {exc}", file=sys.stderr)
        return 1
