"""Entry module of diffstudio-template-sdk: the ``diffstudio template`` command (no torch at import time).

Sub-commands:
    list [--json]: the registered templates (ids, target models, DiT geometry); same as ``diffstudio templates``.
    new NAME [--dir DIR]: write a template package (pyproject with the entry point, model.py, tests).
    inspect SOURCE: show what a template folder holds (kind, files, ``model.py`` with its SHA-256, cached bytecode
        that is never run) without running anything.
    export SOURCE OUT [--name NAME] [--checkpoint FILE --remove-prefix P] [--trust-code] [--code-sha256 H]:
        write a data-only template (``template.json`` + ``model.safetensors``) from an installed template or a
        data-only folder, optionally with trained weights applied. A (trusted) seed-format folder whose class no
        installed package registers becomes an installable template package in OUT instead
        (:mod:`diffstudio_template_sdk.convert`): ``pip install OUT`` and it loads by name, with no trust needed.
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
    from diffstudio.builtin.template_commands import add_list_arguments

    sub = parser.add_subparsers(dest="template_command", metavar="ACTION", required=True)
    add_list_arguments(sub.add_parser("list", help="list registered templates (same as `diffstudio templates`)"))
    new = sub.add_parser("new", help="write a new template package")
    new.add_argument("name", help="template name: lowercase letters, digits, dashes")
    new.add_argument("--dir", default=".", help="parent folder of the package (default: .)")
    show = sub.add_parser("inspect", help="show a template folder's files and code hash without running it")
    show.add_argument("source", help="folder, or a model id in the local caches")
    show.add_argument("--no-code", action="store_true", help="do not print model.py itself")
    export = sub.add_parser(
        "export",
        help="write a data-only template (template.json + model.safetensors); a seed-format folder whose class is "
        "not installed becomes an installable template package",
    )
    export.add_argument("source", help="installed template name, data-only folder, or seed-format folder")
    export.add_argument("out", help="output folder")
    export.add_argument(
        "--name", default=None,
        help="registered name of the class (default: looked up; for a converted seed folder: the folder's name)",
    )  # fmt: skip
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


def _files(folder: Path) -> list[Path]:
    import os

    found: list[Path] = []
    for current, _, files in os.walk(folder):  # symbolic links to folders are not followed
        found.extend(Path(current) / name for name in files)
    return sorted(found)


def _inspect(args: argparse.Namespace, runtime: Runtime) -> int:
    from diffstudio.templates.loading import CODE_FILE, TEMPLATE_JSON, template_kind
    from diffstudio.templates.trust import bytecode_files, code_sha256_of

    folder = _source_folder(args.source, runtime)
    kind = template_kind(folder)
    print(f"folder: {folder}")
    shown = "data-only (runs no code)" if kind == "data" else "seed format (model.py runs only when trusted)"
    print(f"kind:   {shown}")
    for path in _files(folder):
        flag = ""
        if path.suffix in (".pyc", ".pyo"):
            flag = "  [BYTECODE: never run by diffstudio; another tool importing this folder could run it]"
        elif path.suffix in (".py", ".so", ".pyd") and not (kind == "code" and path == folder / CODE_FILE):
            flag = "  [CODE: not executed by diffstudio, not covered by the model.py pin]"
        print(f"  {path.relative_to(folder)}  {path.stat().st_size} bytes{flag}")
    bytecode = bytecode_files(folder)
    if bytecode:
        shown_files = ", ".join(str(p.relative_to(folder)) for p in bytecode)
        print(f"bytecode: {shown_files} (ignored: diffstudio compiles the reviewed source of {CODE_FILE} itself)")
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
    from diffstudio.templates.export import apply_checkpoint, registered_name_of

    loaded = load_template(args.source, runtime=runtime, trust_code=args.trust_code, code_sha256=args.code_sha256)
    if args.checkpoint:
        apply_checkpoint(loaded.model, args.checkpoint, remove_prefix=args.remove_prefix)
    if loaded.kind == "code" and registered_name_of(loaded.model, runtime) is None:
        from diffstudio_template_sdk.convert import package_seed_template

        result = package_seed_template(loaded, args.out, name=args.name, checkpoint=args.checkpoint)
        result["next"] = (
            f"{result['install']}; then --template {result['template']} (no --trust-code), and "
            f"`diffstudio template export {result['template']} DIR` for a data-only folder"
        )
        print(json.dumps(result))
        return 0
    name = args.name or loaded.registered_name
    folder = export_template(loaded.model, args.out, name=name, config=loaded.config or None, runtime=runtime,
                             dit_geometry=loaded.dit_geometry)  # fmt: skip
    print(json.dumps({"exported": str(folder), "template": name or loaded.registered_name}))
    return 0


def _run(args: argparse.Namespace, runtime: Runtime) -> int:
    if args.template_command == "list":
        from diffstudio.builtin.template_commands import print_templates

        return print_templates(args, runtime)
    if args.template_command == "new":
        from diffstudio_template_sdk.scaffold import new_template_package

        folder = new_template_package(args.name, args.dir)
        name = folder.name.removeprefix("diffstudio-")
        print(folder)
        print(
            f"next steps:\n  pip install -e {folder}\n  pytest {folder / 'tests'}\n"
            f"  diffstudio templates                      # lists it once installed\n"
            f"  diffstudio run \"a red circle on a blue background\" --template {name}"
            f" --template-input '{{\"scale\": 0.5}}'\n"
            f"  edit {folder / 'src'} (model.py: the class; plugin.py: its registration and target model)"
        )
        return 0
    if args.template_command == "inspect":
        return _inspect(args, runtime)
    return _export(args, runtime)


@hookimpl
def register_commands(register: Callable[[CommandSpec], None]) -> None:
    """Register ``diffstudio template``."""
    register(CommandSpec("template", "list, create, inspect and export Diffusion Templates", _arguments, _run))
