"""The trainer's file writes and its bounded JSON reads.

Every file training writes (trained weights, LoRAs, checkpoint parts, ``trainer_state.json``, the cache, the
log) goes to a temporary name in the target's folder, is fsynced and renamed over the target, so a killed run
never leaves a half-written file under a final name. Files get the permissions of any ordinary new file
(``0o666`` less the umask): ``safetensors`` itself creates its files ``0o600``, so the mode is set after it
wrote.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from diffstudio._io import _fsync_dir, _open_temp, atomic_write_text
from diffstudio.errors import CheckpointError

__all__ = ["read_json", "save_weights", "write_json"]

#: Largest JSON file the trainer reads from a checkpoint folder.
MAX_JSON_BYTES = 1 << 20


def save_weights(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Save a safetensors file atomically (temporary name in the same folder, fsync, rename); return ``path``.

    The file gets the mode of an ordinary new file (the umask decides, typically ``0o644``).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = _open_temp(path)  # created with 0o666 & ~umask: the mode the final file should have
    try:
        mode = os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
    try:
        owned = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        save_file(owned, str(temporary), metadata=dict(metadata or {}))
        os.chmod(temporary, mode)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_json(path: Path, value: Any) -> Path:
    """Write ``value`` as one line of JSON, atomically."""
    return atomic_write_text(path, json.dumps(value) + "\n")


def parse_json(text: str | bytes, where: str) -> Any:
    """Parse JSON text from a checkpoint; any failure is a :class:`CheckpointError` naming ``where``."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{where} is not valid JSON ({type(exc).__name__}: {exc})") from exc


def read_json(path: Path) -> Any:
    """Read a JSON file of a checkpoint folder (at most :data:`MAX_JSON_BYTES`).

    Raises:
        CheckpointError: missing, unreadable, too large or not JSON.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing") from exc
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read: {exc}") from exc
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path} is larger than {MAX_JSON_BYTES} bytes; it is not a trainer state file")
    return parse_json(data, str(path))
