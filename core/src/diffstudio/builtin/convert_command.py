"""``diffstudio convert SRC DST``: a one-time conversion of a pickle checkpoint to safetensors.

The pickle policy refuses ``.bin/.pt/.pth/.ckpt`` files everywhere else. Running this command on a file is the
explicit opt-in for that one file: it is read with ``torch.load(weights_only=True)`` (the allowlist unpickler,
torch 2.6 or newer; see :mod:`diffstudio.loading.pickle_policy`), nested mappings are flattened with dotted names
(``{"image_proj": {...}}`` -> ``image_proj.*``), and the tensors are written atomically to ``DST`` (a temporary
name, renamed). ``--key NAME`` keeps one nested mapping and drops its prefix (``--key image_proj`` writes the
projector's own names). The result loads like any safetensors checkpoint, with no opt-in.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffstudio._markers import hookimpl
from diffstudio.errors import CheckpointError
from diffstudio.types import CommandSpec

if TYPE_CHECKING:
    from diffstudio.runtime import Runtime

__all__ = ["convert_pickle", "register_commands"]


def convert_pickle(source: str | Path, target: str | Path, key: str | None = None) -> dict[str, Any]:
    """Convert the pickle checkpoint ``source`` to the safetensors file ``target``.

    Args:
        source: A ``.bin/.pt/.pth/.ckpt`` file (torch's zip format).
        target: Where to write (``.safetensors``); an existing file is replaced atomically.
        key: Keep only the tensors under this top-level name, without the ``key.`` prefix.

    Returns:
        ``{"source", "target", "tensors", "bytes"}``.

    Raises:
        CheckpointError: ``source`` is missing or not a pickle suffix, ``target`` is not ``.safetensors``, or ``key``
            names no tensors.
        PickleRefusedError / PickleContentError: torch is older than 2.6, or the file holds more than tensors.
    """
    from safetensors.torch import save

    from diffstudio._io import atomic_write_bytes
    from diffstudio.loading.pickle_policy import PICKLE_SUFFIXES, check_pickle_allowed, load_pickle_state_dict

    src, dst = Path(source), Path(target)
    if not src.is_file():
        raise CheckpointError(f"diffstudio convert: {src} does not exist")
    if src.suffix.lower() not in PICKLE_SUFFIXES:
        raise CheckpointError(f"diffstudio convert reads pickle files ({', '.join(PICKLE_SUFFIXES)}), got {src}")
    if dst.suffix.lower() != ".safetensors":
        raise CheckpointError(f"diffstudio convert writes a .safetensors file, got {dst}")
    check_pickle_allowed(src, True)  # running the command on this file is the opt-in
    tensors = load_pickle_state_dict(src)
    if key is not None:
        prefix = f"{key}."
        tensors = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
        if not tensors:
            raise CheckpointError(f"diffstudio convert: {src} has no tensors under {key!r}")
    data = save({name: t.contiguous() for name, t in tensors.items()})
    atomic_write_bytes(dst, bytes(data))
    return {"source": str(src), "target": str(dst), "tensors": len(tensors), "bytes": len(data)}


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="the pickle checkpoint (.bin, .pt, .pth, .ckpt)")
    parser.add_argument("target", help="the .safetensors file to write")
    parser.add_argument("--key", default=None, help="keep only the tensors under this top-level name (prefix dropped)")


def _run(args: argparse.Namespace, runtime: Runtime) -> int:
    done = convert_pickle(args.source, args.target, args.key)
    print(f"wrote {done['tensors']} tensors ({done['bytes']:,} bytes) to {done['target']}")
    return 0


@hookimpl
def register_commands(register: Callable[[CommandSpec], None]) -> None:
    """Register ``convert``."""
    register(CommandSpec("convert", "convert a pickle checkpoint (.bin/.pt/.pth) to safetensors", _arguments, _run))
