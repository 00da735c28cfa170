"""Entry module of diffstudio-template-sdk: the ``diffstudio template`` command (no torch at import time).

Sub-commands:
    new NAME [--dir DIR]: write a template package (pyproject with the entry point, model.py, tests).
    inspect SOURCE: show what a template folder holds (kind, files, ``model.py`` with its SHA-256) without
        running anything.
    export SOURCE OUT [--name NAME] [--checkpoint FILE --remove-prefix P] [--trust-code] [--code-sha256 H]:
        write a data-only template (``template.json`` + ``model.safetensors``) from an installed template, a
        data-only folder or (trusted) a seed-format folder, optionally with trained weights applied.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from diffstudio._markers import hookimpl
from diffstudio.types import CommandSpec

if TYPE_CHECKING:
    from diffstudio.runtime import Runtime


def _arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="template_command", metavar="ACTION", required=True)
    new = sub.add_parser("new", help="write a new template package")
    new.add_argument("name", help="template name: lowercase letters, digits, dashes")
    new.add_argument("--dir", default=".", help="parent folder of the package (default: .)")
    show = sub.add_parser("inspect", help="show a template folder's files and code hash without running it")
    show.add_argument("source", help="folder, or a model id in the local caches")
    show.add_argument("--no-code", action="store_true", help="do not print model.py itself")
    export = sub.add_parser("export", help="write a data-only template (template.json + model.safetensors)")
    export.add_argument("source", help="installed template name, data-only folder, or seed-format folder")
    export.add_argument("out", help="output folder")
    export.add_argument("--name", default=None, help="registered name of the class (default: looked up)")
    export.add_argument("--checkpoint", default=None, help="trained weights to apply first (safetensors)")
    export.add_argument("--remove-prefix", default="", help="prefix to strip from checkpoint keys")
    export.add_argument("--trust-code", action="store_true", help="allow running a seed-format model.py")
    export.add_argument("--code-sha256", default=None, help="refuse model.py unless it has this SHA-256")


def _source_folder(source: str, runtime: Runtime) -> Path:
    from diffstudio.config import ModelConfig
    from diffstudio.resolve import resolve_files

    if Path(source).is_dir():
        return Path(source)
    embedded = {m.model_id: m.root for m in runtime.hooks.embedded_models()}
    return resolve_files(ModelConfig(model_id=source), embedded=embedded).root


def _inspect(args: argparse.Namespace, runtime: Runtime) -> int:
    from diffstudio.templates.loading import CODE_FILE, TEMPLATE_JSON, template_kind
    from diffstudio.templates.trust import code_sha256_of

    folder = _source_folder(args.source, runtime)
    kind = template_kind(folder)
    print(f"folder: {folder}")
    shown = "data-only (runs no code)" if kind == "data" else "seed format (model.py runs only when trusted)"
    print(f"kind:   {shown}")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        print(f"  {path.relative_to(folder)}  {path.stat().st_size} bytes")
    if kind == "data":
        print(f"{TEMPLATE_JSON}:\n{(folder / TEMPLATE_JSON).read_text(encoding='utf-8')}")
        return 0
    code = folder / CODE_FILE
    print(f"{CODE_FILE} sha256: {code_sha256_of(code)}")
    if not args.no_code:
        print(f"----- {code} -----\n{code.read_text(encoding='utf-8', errors='replace')}")
    return 0


def _export(args: argparse.Namespace, runtime: Runtime) -> int:
    from diffstudio.templates import export_template, load_template
    from diffstudio.templates.export import apply_checkpoint

    loaded = load_template(args.source, runtime=runtime, trust_code=args.trust_code, code_sha256=args.code_sha256)
    if args.checkpoint:
        apply_checkpoint(loaded.model, args.checkpoint, remove_prefix=args.remove_prefix)
    name = args.name or loaded.registered_name
    folder = export_template(loaded.model, args.out, name=name, config=loaded.config or None, runtime=runtime)
    print(json.dumps({"exported": str(folder), "template": name or loaded.registered_name}))
    return 0


def _run(args: argparse.Namespace, runtime: Runtime) -> int:
    if args.template_command == "new":
        from diffstudio_template_sdk.scaffold import new_template_package

        print(new_template_package(args.name, args.dir))
        return 0
    if args.template_command == "inspect":
        return _inspect(args, runtime)
    return _export(args, runtime)


@hookimpl
def register_commands(register: Callable[[CommandSpec], None]) -> None:
    """Register ``diffstudio template``."""
    register(CommandSpec("template", "create, inspect and export Diffusion Template packages", _arguments, _run))
