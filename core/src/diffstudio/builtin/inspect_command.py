"""``diffstudio inspect FILE``: what a checkpoint is, its sizes and format, without loading a tensor.

Only the safetensors headers are read (through the same validating reader as every load, so a damaged file is a
one-line typed error), then every installed family is asked to claim the checkpoint (``load_model``, which looks
at names and shapes only) and, when none does, every registered LoRA layout is asked whether the names are its
own. Pickle files are refused as everywhere else: inspecting a file never runs code from it. Torch is imported
only by the command itself, never by ``diffstudio --help``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from diffstudio._markers import hookimpl
from diffstudio.types import CommandSpec

if TYPE_CHECKING:
    from diffstudio.runtime import Runtime

__all__ = ["inspect_checkpoint", "register_commands"]


def _megabytes(count: int) -> str:
    return f"{count / 1e6:,.2f} MB" if count >= 10_000 else f"{count} byte{'' if count == 1 else 's'}"


def inspect_checkpoint(runtime: Runtime, path: str) -> dict[str, Any]:
    """Describe the checkpoint at ``path`` (a file, folder, ``*.index.json`` or glob) from its headers only.

    Returns:
        JSON-ready data: ``source``, ``files`` (``path``, ``bytes``, ``header_bytes``), ``tensors``,
        ``data_bytes``, ``parameters``, ``dtypes`` (name -> count), ``metadata``, ``claims`` (``model_type``,
        ``family``, ``component``, ``source_format``, ``plugin``), ``lora_formats`` (layouts whose names the
        tensors use, when no family claims it), ``families_asked`` and ``telling_keys``.

    Raises:
        CheckpointError: the file is missing, not a weight file, damaged (a ``SafetensorsFormatError``), a refused
            pickle, or a folder with a broken shard index.
        ModelNotFoundError: nothing at ``path``.
    """
    from diffstudio.config import ModelConfig
    from diffstudio.identify import open_checkpoint
    from diffstudio.loading import read_header

    config = ModelConfig(path=path)
    checkpoint = open_checkpoint(runtime, config)
    files = []
    for file in checkpoint.files:
        header = read_header(file) if file.suffix.lower() == ".safetensors" else None
        files.append(
            {"path": str(file), "bytes": file.stat().st_size, "header_bytes": header.header_size if header else None}
        )
    dtypes = Counter(checkpoint.dtype_name(name) for name in checkpoint.keys())
    parameters = 0
    for name in checkpoint.keys():
        count = 1
        for dim in checkpoint.shape(name):
            count *= dim
        parameters += count
    claims = runtime.hooks.load_model(checkpoint, config)
    keys = checkpoint.keys()
    loras = [] if claims else [fmt.name for fmt in runtime.hooks.lora_formats() if _detects(fmt.detect, keys)]
    return {
        "source": checkpoint.source,
        "files": files,
        "tensors": len(checkpoint),
        "data_bytes": checkpoint.nbytes,
        "parameters": parameters,
        "dtypes": dict(sorted(dtypes.items())),
        "metadata": checkpoint.metadata,
        "claims": [
            {
                "model_type": c.model_type,
                "family": c.family,
                "component": c.component,
                "source_format": c.source_format,
                "plugin": c.plugin,
            }
            for c in claims
        ],  # fmt: skip
        "lora_formats": loras,
        "families_asked": runtime.hooks.families_asked(),
        "telling_keys": checkpoint.telling_keys(),
    }


def _detects(detect: Callable[[list[str]], bool], keys: list[str]) -> bool:
    try:
        return bool(detect(keys))
    except Exception:  # noqa: BLE001 - a plugin's detector that fails says "not mine"
        return False


def _print(data: dict[str, Any]) -> None:
    files = data["files"]
    total = sum(f["bytes"] for f in files)
    print(f"checkpoint:  {data['source']}")
    print(f"files:       {len(files)} ({_megabytes(total)})")
    for file in files[:8]:
        header = f", header {file['header_bytes']} bytes" if file["header_bytes"] is not None else ""
        print(f"             {file['path']} ({_megabytes(file['bytes'])}{header})")
    if len(files) > 8:
        print(f"             ... {len(files) - 8} more")
    fmt = "safetensors" if all(f["header_bytes"] is not None for f in files) else "pickle (allowed explicitly)"
    print(f"format:      {fmt}")
    dtypes = ", ".join(f"{name} x{count}" for name, count in data["dtypes"].items()) or "none"
    print(f"tensors:     {data['tensors']} ({_megabytes(data['data_bytes'])} of data, {data['parameters']:,} values)")
    print(f"dtypes:      {dtypes}")
    claims = data["claims"]
    if len(claims) == 1:
        claim = claims[0]
        print(
            f"identified:  {claim['model_type']} [{claim['source_format']}] for slot {claim['component']!r} "
            f"(plugin {claim['plugin']})"
        )
    elif claims:
        shown = "; ".join(f"{c['model_type']} (plugin {c['plugin']})" for c in claims)
        print(f"identified:  AMBIGUOUS, claimed by {len(claims)} plugins: {shown}")
    elif data["lora_formats"]:
        print(f"identified:  a LoRA in the {' / '.join(data['lora_formats'])} layout (apply it with --lora)")
    else:
        asked = ", ".join(data["families_asked"]) or "none installed"
        print(f"identified:  not recognised (families asked: {asked})")
    metadata = data["metadata"]
    if metadata:
        print(f"metadata:    {len(metadata)} key(s)")
        for key, value in list(metadata.items())[:12]:
            text = value if len(value) <= 80 else value[:77] + "..."
            print(f"             {key} = {text!r}")
    print("telling keys:")
    for line in data["telling_keys"]:
        print(f"             {line}")


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a .safetensors file, a folder of them, a *.index.json or a glob")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _run(args: argparse.Namespace, runtime: Runtime) -> int:
    data = inspect_checkpoint(runtime, args.file)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        _print(data)
    return 0


@hookimpl
def register_commands(register: Callable[[CommandSpec], None]) -> None:
    """Register ``inspect``."""
    register(
        CommandSpec("inspect", "show what a checkpoint is, its sizes and format, without loading it", _arguments, _run)
    )
