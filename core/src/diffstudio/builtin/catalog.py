"""``diffstudio models``: embedded models, pipelines that run a checkpoint, and repositories already cached.

Reads the registries (``register_embedded_models``, ``register_pipelines``) and lists the Hugging Face and
ModelScope cache folders (``diffstudio.resolve``'s locations): no model file is opened and torch is not imported.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffstudio._markers import hookimpl
from diffstudio._table import format_table
from diffstudio.types import CommandSpec

if TYPE_CHECKING:
    from diffstudio.runtime import Runtime

__all__ = ["cached_repositories", "model_rows", "register_commands"]

#: The model ``diffstudio run`` uses without ``--model`` (kept equal to ``diffstudio.run_api.DEFAULT_MODEL_ID``,
#: which is not imported here to keep the listing light).
DEFAULT_MODEL_ID = "diffstudio/shapes"


def _folders(parent: Path) -> list[Path]:
    try:
        return sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def cached_repositories(env: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """Repositories in the local caches, which ``--model ORG/NAME`` resolves offline.

    Returns:
        ``{"id", "cache", "path"}`` rows sorted by id: ``cache`` is ``"huggingface"`` (a ``models--org--name``
        folder with at least one snapshot) or ``"modelscope"`` (``models/org/name``; ``___`` read as ``.``).
    """
    from diffstudio.resolve import hf_hub_cache, modelscope_cache

    env = os.environ if env is None else env
    rows: list[dict[str, str]] = []
    for folder in _folders(hf_hub_cache(env)):
        if folder.name.startswith("models--") and _folders(folder / "snapshots"):
            rows.append({"id": folder.name[len("models--") :].replace("--", "/"), "cache": "huggingface",
                         "path": str(folder)})  # fmt: skip
    for org in _folders(modelscope_cache(env) / "models"):
        for repo in _folders(org):
            rows.append({"id": f"{org.name}/{repo.name}".replace("___", "."), "cache": "modelscope", "path": str(repo)})
    return sorted(rows, key=lambda row: (row["id"], row["cache"]))


def model_rows(runtime: Runtime, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The listing as JSON-ready data.

    Returns:
        ``{"default_model": id or None, "embedded_models": [...], "pipelines": [...], "cached": [...]}`` (see
        :func:`cached_repositories` for ``cached``). An embedded model row
        has ``id``, ``pipeline``, ``plugin``, ``description``, ``root``, ``files`` (its file patterns),
        ``tokenizer`` (pattern or None), ``defaults`` and ``default`` (True for the one ``run`` uses); a
        pipeline row has ``name``, ``family``, ``plugin`` and ``description``.
    """
    embedded = runtime.hooks.embedded_models()
    pipelines = runtime.hooks.pipelines()
    models = [
        {
            "id": spec.model_id,
            "pipeline": spec.pipeline,
            "plugin": embedded.owner(spec.model_id),
            "description": spec.description,
            "root": str(spec.root),
            "files": list(spec.model_configs),
            "tokenizer": spec.tokenizer_pattern,
            "defaults": {key: _jsonable(value) for key, value in dict(spec.defaults).items()},
            "default": spec.model_id == DEFAULT_MODEL_ID,
        }
        for spec in embedded
    ]
    rows = [
        {"name": s.name, "family": s.family, "plugin": pipelines.owner(s.name), "description": s.description}
        for s in pipelines
    ]
    return {
        "default_model": DEFAULT_MODEL_ID if DEFAULT_MODEL_ID in embedded else None,
        "embedded_models": models,
        "pipelines": rows,
        "cached": cached_repositories(env),
    }


def _jsonable(value: object) -> object:
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true",
        help='print one JSON object: {"default_model", "embedded_models": [...], "pipelines": [...], "cached": [...]}',
    )  # fmt: skip


def _run(args: argparse.Namespace, runtime: Runtime) -> int:
    data = model_rows(runtime)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    models = data["embedded_models"]
    print("Embedded models (use with --model ID; they resolve offline):")
    if models:
        rows = [
            [m["id"] + (" (default)" if m["default"] else ""), m["pipeline"], m["plugin"], m["description"]]
            for m in models
        ]
        print(_indent(format_table(["ID", "PIPELINE", "PLUGIN", "DESCRIPTION"], rows)))
    else:
        print("  none installed (pip install diffstudio-shapes gives the embedded default, diffstudio/shapes)")
    print()
    print("Pipelines (what --model FILE, FOLDER or a cached MODEL_ID can run; the family is detected from the file):")
    pipelines = data["pipelines"]
    if pipelines:
        rows = [[p["name"], p["family"], p["plugin"], p["description"]] for p in pipelines]
        print(_indent(format_table(["NAME", "FAMILY", "PLUGIN", "DESCRIPTION"], rows)))
    else:
        print("  none installed (pip install diffstudio-flux2 or diffstudio-flux1)")
    print()
    print("Cached repositories (--model ORG/NAME resolves them offline; each file is identified when loaded):")
    cached = data["cached"]
    if cached:
        print(_indent(format_table(["ID", "CACHE", "PATH"], [[c["id"], c["cache"], c["path"]] for c in cached])))
    else:
        print("  none (download with `hf download ORG/NAME` or `modelscope download ORG/NAME`)")
    return 0


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


@hookimpl
def register_commands(register: Callable[[CommandSpec], None]) -> None:
    """Register ``models``."""
    register(CommandSpec("models", "list embedded models and the pipelines that run checkpoints", _arguments, _run))
