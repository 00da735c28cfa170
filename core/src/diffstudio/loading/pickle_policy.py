"""The pickle policy: pickle-based checkpoints are refused unless the caller opts in.

Files ending in ``.bin``, ``.pt``, ``.pth`` or ``.ckpt`` are Python pickles: unpickling can run arbitrary
code.
They are refused with :class:`~diffstudio.errors.PickleRefusedError` unless ``allow_pickle=True`` is passed;
even then they are loaded only with ``torch.load(weights_only=True, mmap=True)`` (an allowlist unpickler, with
tensor data memory-mapped rather than read), and only on torch 2.6 or newer, because ``weights_only`` could be
bypassed on older versions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from diffstudio.errors import CheckpointError, PickleRefusedError

if TYPE_CHECKING:
    import torch

__all__ = [
    "MIN_TORCH_FOR_PICKLE",
    "PICKLE_SUFFIXES",
    "PickleContentError",
    "check_pickle_allowed",
    "is_pickle_path",
    "load_pickle_state_dict",
    "torch_supports_safe_pickle",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
"""File suffixes treated as pickle-based checkpoints."""

MIN_TORCH_FOR_PICKLE = (2, 6)
"""Oldest torch whose ``weights_only`` unpickler is trusted."""


class PickleContentError(CheckpointError):
    """A pickle checkpoint was loaded but does not hold a flat mapping of names to tensors."""


def is_pickle_path(path: Path) -> bool:
    """Return True when ``path`` has a pickle-checkpoint suffix (case-insensitive)."""
    return path.suffix.lower() in PICKLE_SUFFIXES


def torch_supports_safe_pickle(version: str) -> bool:
    """Return True when a torch version string (e.g. ``"2.6.0+cpu"``) is 2.6 or newer."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return False
    return (int(match.group(1)), int(match.group(2))) >= MIN_TORCH_FOR_PICKLE


def check_pickle_allowed(path: Path, allow_pickle: bool) -> None:
    """Refuse a pickle checkpoint unless the caller opted in.

    Args:
        path: The pickle file.
        allow_pickle: The caller's opt-in.

    Raises:
        PickleRefusedError: ``allow_pickle`` is not ``True``; a value that is not a real ``bool`` (``"no"``, ``1``,
            ``None``) is refused with a message saying so, never read as "truthy".
    """
    if not isinstance(allow_pickle, bool):
        raise PickleRefusedError(
            f"Refusing to load the pickle-based checkpoint {path}: allow_pickle={allow_pickle!r} "
            f"({type(allow_pickle).__name__}) is not a boolean. The opt-in to unpickling must be allow_pickle=True "
            "exactly (a string or number from a config file never enables it)."
        )
    if not allow_pickle:
        raise PickleRefusedError(
            f"Refusing to load the pickle-based checkpoint {path}: unpickling a file can run arbitrary "
            "code, so a "
            f"malicious or tampered {path.suffix} file could take over this machine. If you trust where "
            "it came "
            "from, pass allow_pickle=True (it is then loaded with torch.load(weights_only=True), which "
            "allows "
            "tensors only). Better: convert it once to safetensors with `diffstudio convert "
            f"{path} {path.with_suffix('.safetensors')}` or download "
            f"the .safetensors version of the model."
        )


def load_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a pickle checkpoint safely: ``weights_only=True``, memory-mapped, on CPU.

    A Lightning-style ``{"state_dict": {...}}`` wrapper is unwrapped; other nested mappings of tensors are
    flattened with dotted names (``{"image_proj": {"w": t}}`` -> ``image_proj.w``, as IP-Adapter and InfiniteYou
    publish them). The caller must have called :func:`check_pickle_allowed` first.

    Args:
        path: The pickle file (torch's zip format; legacy pre-1.6 files cannot be memory-mapped).

    Returns:
        Tensor names mapped to CPU tensors whose storage is memory-mapped from the file.

    Raises:
        PickleRefusedError: the installed torch is older than 2.6.
        PickleContentError: the file cannot be loaded safely or holds something other than named tensors.
    """
    import torch

    if not torch_supports_safe_pickle(str(torch.__version__)):
        raise PickleRefusedError(
            f"Refusing to load the pickle-based checkpoint {path}: torch {torch.__version__} is "
            "installed, and "
            "torch.load(weights_only=True) is only safe from torch 2.6 on (CVE-2025-32434). Upgrade "
            "torch, or "
            f"convert the file to safetensors on a machine that has torch 2.6 or newer."
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # the unpickler raises many types (UnpicklingError, RuntimeError, ...)
        raise PickleContentError(
            f"Could not load {path} with torch.load(weights_only=True, mmap=True): {exc}. The file may be "
            f"corrupt, in the legacy (pre-zip) format, or contain objects other than tensors; convert it to "
            f"safetensors in a trusted environment."
        ) from exc
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise PickleContentError(f"{path} holds a {type(loaded).__name__}, not a mapping of names to tensors.")
    result: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    for name, value in _flattened(loaded):
        if isinstance(name, str) and isinstance(value, torch.Tensor):
            result[name] = value
        else:
            bad.append(f"{name!r} ({type(value).__name__})")
    if bad:
        raise PickleContentError(
            f"{path} is not a flat state dict: {len(bad)} entries are not tensors: {', '.join(bad[:8])}."
        )
    return result


def _flattened(mapping: Mapping[object, object], prefix: str = "") -> list[tuple[object, object]]:
    """``(name, value)`` pairs of a nested mapping, nested string keys joined with dots (other keys kept as given)."""
    pairs: list[tuple[object, object]] = []
    for name, value in mapping.items():
        if isinstance(name, str) and isinstance(value, Mapping):
            pairs.extend(_flattened(value, f"{prefix}{name}."))
        else:
            pairs.append((f"{prefix}{name}" if isinstance(name, str) else name, value))
    return pairs
