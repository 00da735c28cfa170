"""The ``diffstudio`` command line.

Sub-commands come from the ``register_commands`` hook; core's own (``plugins``, ``run``, ``models``, ...) are
registered by its builtin plugins like any other. ``diffstudio --help`` lists core's commands, then each
plugin's under a ``plugin commands (<distribution>)`` heading; every command is invoked the same way
(``diffstudio <command> ...``).

``main`` returns the exit code and never shows a traceback unless asked (``--debug`` anywhere before the
command's own ``--``, or ``DIFFSTUDIO_DEBUG=1``):

* an error diffstudio raises on purpose (:class:`~diffstudio.errors.DiffstudioError`) or an operating-system
  error (a missing or unreadable file, a full disk): ``diffstudio: error: <message>``, exit 1;
* a wrong argument: argparse's usage and message, exit 2;
* anything else is a bug: one ``diffstudio: internal error: ...`` line naming the command (and its plugin),
  exit 1;
* Ctrl-C: exit 130; a closed pipe (``diffstudio plugins --json | head``): quiet, exit 141 (as if killed by
  SIGPIPE).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING

from diffstudio._version import __version__
from diffstudio.errors import DiffstudioError

if TYPE_CHECKING:
    from diffstudio.runtime import Runtime
    from diffstudio.types import CommandSpec

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

_TRUE = {"1", "true", "yes", "on"}


def is_core_plugin(plugin_name: str) -> bool:
    """True for core's builtin plugins (``builtin.*``), whose commands are listed as core commands."""
    return plugin_name.startswith("builtin.")


def _plugin_distribution(runtime: Runtime, plugin_name: str) -> str:
    for status in runtime.statuses:
        if status.name == plugin_name and not status.distribution.startswith("("):
            return status.distribution
    return plugin_name


def command_groups(runtime: Runtime) -> dict[str, list[str]]:
    """The commands as ``--help`` lists them: ``{"": core's commands, distribution: that plugin's commands}``.

    Core's group comes first, then the plugins' distributions in alphabetical order; names are sorted.
    """
    registry = runtime.hooks.commands()
    groups: dict[str, list[str]] = {"": []}
    plugin_groups: dict[str, list[str]] = {}
    for name in registry.names():
        owner = registry.owner(name)
        if is_core_plugin(owner):
            groups[""].append(name)
        else:
            plugin_groups.setdefault(_plugin_distribution(runtime, owner), []).append(name)
    return {**groups, **dict(sorted(plugin_groups.items()))}


def _plugin_epilog(groups: dict[str, list[tuple[str, str]]]) -> str:
    """The ``plugin commands (<distribution>):`` sections of the top-level help, wrapped like argparse's."""
    if not groups:
        return ""
    width = max(20, min(shutil.get_terminal_size().columns, 160) - 2)
    name_width = min(max(len(name) for rows in groups.values() for name, _ in rows), 22)
    lines: list[str] = []
    for distribution in sorted(groups):
        lines.append(f"plugin commands ({distribution}):")
        for name, help_text in sorted(groups[distribution]):
            indent = 2 + name_width + 2
            wrapped = textwrap.wrap(help_text, max(width - indent, 20)) or [""]
            if len(name) > name_width:
                lines.append(f"  {name}")
                lines.extend(" " * indent + part for part in wrapped)
            else:
                lines.append(f"  {name:<{name_width}}  {wrapped[0]}")
                lines.extend(" " * indent + part for part in wrapped[1:])
        lines.append("")
    lines.append("Run `diffstudio COMMAND --help` for a command's options.")
    return "\n".join(lines)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's layout, with the epilog kept as written and room for command names up to 24 characters."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


def _try_build_parser(runtime: Runtime) -> argparse.ArgumentParser | None:
    """Build the parser; None when a plugin's ``add_arguments`` failed (it was reported and disabled)."""
    registry = runtime.hooks.commands()
    parser = argparse.ArgumentParser(
        prog="diffstudio",
        description="diffusion image models, as plugins",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"diffstudio {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error (also: DIFFSTUDIO_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    groups: dict[str, list[tuple[str, str]]] = {}
    for distribution, names in command_groups(runtime).items():
        for name in names:
            spec = registry.get(name)
            if not distribution:
                command_parser = sub.add_parser(spec.name, help=spec.help, description=spec.help)
            else:  # listed in the epilog under its distribution instead of among core's commands
                groups.setdefault(distribution, []).append((spec.name, spec.help))
                command_parser = sub.add_parser(spec.name, description=spec.help)
            if not _add_arguments(runtime, registry.owner(name), spec, command_parser):
                return None
    parser.epilog = _plugin_epilog(groups) or None
    return parser


def _add_arguments(runtime: Runtime, owner: str, spec: CommandSpec, command_parser: argparse.ArgumentParser) -> bool:
    """Let the command add its arguments; False when it failed (the plugin was reported and disabled)."""
    try:
        spec.add_arguments(command_parser)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - one plugin's broken command must not break the CLI
        from diffstudio._hooks import describe_exception

        runtime.plugin_failed(
            owner, "register_commands", f"its command {spec.name!r}: add_arguments raised "
            f"{describe_exception(exc)}", exc,
        )  # fmt: skip
        return False
    try:
        command_parser.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    except argparse.ArgumentError:
        pass  # the command has its own --debug; the global one still works before the command name
    command_parser.set_defaults(_command=spec.name)
    return True


def build_parser(runtime: Runtime) -> argparse.ArgumentParser:
    """Build the parser with one sub-parser per registered command (a plugin whose command breaks is skipped)."""
    for _ in range(len(runtime.statuses) + 2):
        parser = _try_build_parser(runtime)
        if parser is not None:
            return parser
    raise DiffstudioError("the command line could not be built: plugins keep failing (see the warnings above)")


def _debug_requested(argv: Sequence[str]) -> bool:
    if os.environ.get("DIFFSTUDIO_DEBUG", "").strip().lower() in _TRUE:
        return True
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--debug":
            return True
    return False


def _quiet_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the interpreter's final flush does not fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _describe_os_error(exc: OSError) -> str:
    if exc.filename is not None and exc.strerror:
        target = f"{exc.filename!s}" + (f" -> {exc.filename2!s}" if exc.filename2 is not None else "")
        return f"{target}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def _run(argv: list[str], where: list[str]) -> int:
    from diffstudio.runtime import Runtime

    runtime = Runtime()
    parser = build_parser(runtime)
    args = parser.parse_args(argv)
    name = getattr(args, "_command", None)
    if name is None:
        parser.print_help()
        return 2
    registry = runtime.hooks.commands()
    owner = registry.owner(name)
    where.append(f"the command {name!r}" + ("" if is_core_plugin(owner) else f" of plugin {owner!r}"))
    code = registry.get(name).run(args, runtime)
    sys.stdout.flush()  # a closed pipe shows up here, inside the handlers below
    return int(code or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(arguments)
    where: list[str] = []
    try:
        return _run(arguments, where)
    except KeyboardInterrupt:
        print("diffstudio: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except DiffstudioError as exc:
        if debug:
            traceback.print_exc()
        print(f"diffstudio: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        if debug:
            traceback.print_exc()
        print(f"diffstudio: error: {_describe_os_error(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except MemoryError:
        if debug:
            traceback.print_exc()
        print("diffstudio: error: out of memory. Try a smaller size or batch.", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line instead of a traceback
        from diffstudio._hooks import describe_exception

        if debug:
            traceback.print_exc()
        context = f" in {where[0]}" if where else ""
        if type(exc).__name__ == "OutOfMemoryError":  # torch's, without importing torch here
            print(f"diffstudio: error: out of memory{context}: {describe_exception(exc)}. Try a smaller size or "
                  f"batch, or a memory budget (see `diffstudio run --help`).", file=sys.stderr)  # fmt: skip
            return EXIT_ERROR
        hint = "" if debug else "run with --debug for the traceback; "
        message = f"diffstudio: internal error{context}: {describe_exception(exc)} ({hint}please report it)"
        print(message, file=sys.stderr)
        return EXIT_ERROR
