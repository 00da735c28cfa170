"""Turning what the user passed (file, shard list, folder, index file, glob) into a list of weight files.

Rules, in order, for one item:

* an existing folder: its ``*.safetensors.index.json`` (exactly one) names the shards; else every
  ``*.safetensors`` file directly inside it; else a pickle index (``*.bin.index.json``) or pickle files
  (``.bin/.pt/.pth/.ckpt``), which the pickle policy then refuses unless allowed. Nothing found is an error
  that
  lists what the folder contains.
* an existing ``*.index.json`` file: the shards its ``weight_map`` names.
* an existing file: itself, if its suffix is ``.safetensors`` or a pickle suffix.
* a string containing ``*``, ``?`` or ``[``: a glob (``**`` recursive); the matching weight files, sorted.

Index files are validated here (every shard exists and stays inside the index's folder); that each tensor
really lives in the shard the index names is checked by :class:`~diffstudio.loading.checkpoint.Checkpoint`
once the headers are read.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from diffstudio._io import read_json
from diffstudio.errors import CheckpointError
from diffstudio.loading.pickle_policy import PICKLE_SUFFIXES

__all__ = [
    "CheckpointFileNotFoundError",
    "CheckpointSource",
    "NoWeightFilesError",
    "ResolvedSource",
    "ShardIndex",
    "ShardIndexError",
    "UnsupportedFileError",
    "describe_files",
    "resolve_source",
]

CheckpointSource: TypeAlias = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
"""What :meth:`Checkpoint.open` accepts: a path, a glob string, or a list/tuple of paths."""

SAFETENSORS_SUFFIX = ".safetensors"
WEIGHT_SUFFIXES = (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES)
_GLOB_CHARS = frozenset("*?[")
_REDOWNLOAD = "The download is probably incomplete; download the model again."


class CheckpointFileNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path does not exist (and is not a glob)."""


class UnsupportedFileError(CheckpointError):
    """A file is neither safetensors nor a pickle checkpoint."""


class NoWeightFilesError(CheckpointError):
    """A folder or glob holds no weight files."""


class ShardIndexError(CheckpointError):
    """A ``*.index.json`` file is unreadable or disagrees with the shards."""


@dataclass(frozen=True)
class ShardIndex:
    """A parsed ``*.index.json``.

    Attributes:
        path: The index file.
        weight_map: Tensor name -> shard file (absolute path inside the index's folder).
    """

    path: Path
    weight_map: dict[str, Path]

    @property
    def shards(self) -> tuple[Path, ...]:
        """The distinct shard files, sorted."""
        return tuple(sorted(set(self.weight_map.values())))


@dataclass(frozen=True)
class ResolvedSource:
    """The weight files a source stands for.

    Attributes:
        description: Human-readable description of the source, for messages.
        files: The weight files, in a stable order, without duplicates.
        indexes: The index files that named (some of) the files.
    """

    description: str
    files: tuple[Path, ...]
    indexes: tuple[ShardIndex, ...] = ()


def describe_files(files: Sequence[Path]) -> str:
    """Return ``a, b, c`` or ``a, ... (N files in <folder>)`` for messages."""
    if len(files) <= 3:
        return ", ".join(str(f) for f in files)
    return f"{files[0]}, ... ({len(files)} files in {files[0].parent})"


def _check_weight_file(path: Path) -> Path:
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise UnsupportedFileError(
            f"{path} is not a weight file diffstudio can read: expected a .safetensors file (or, with "
            f"allow_pickle=True, one of {', '.join(PICKLE_SUFFIXES)}), got a "
            f"{path.suffix or 'suffix-less'} file."
        )
    return path


def read_index(path: Path) -> ShardIndex:
    """Parse and check a ``*.index.json`` file.

    Args:
        path: The index file.

    Returns:
        The index with shard paths resolved against its folder.

    Raises:
        ShardIndexError: invalid JSON, no ``weight_map`` of strings, a shard outside the folder or missing.
    """
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise ShardIndexError(f"Cannot read the shard index {path}: {exc}. {_REDOWNLOAD}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ShardIndexError(f"The shard index {path} has no weight_map of tensor names to file names. {_REDOWNLOAD}")
    folder = path.parent.resolve()
    resolved: dict[str, Path] = {}
    missing: set[str] = set()
    for name, shard in weight_map.items():
        shard_path = (folder / shard).resolve()
        if shard_path.parent != folder:
            raise ShardIndexError(
                f"The shard index {path} names {shard!r} for tensor {name!r}, which is not a file in {folder}."
            )
        if not shard_path.is_file():
            missing.add(shard)
        resolved[name] = shard_path
    if missing:
        raise ShardIndexError(
            f"The shard index {path} names {len(missing)} shard file(s) that do not exist: "
            f"{', '.join(sorted(missing))}. {_REDOWNLOAD}"
        )
    return ShardIndex(path, resolved)


def _folder_listing(folder: Path, limit: int = 20) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "it is empty"
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")
    return f"it contains: {shown}"


def _resolve_folder(folder: Path) -> ResolvedSource:
    def files_with(pattern: str) -> list[Path]:
        return sorted(p for p in folder.glob(pattern) if p.is_file())

    safetensors_indexes = files_with("*.safetensors.index.json")
    if len(safetensors_indexes) > 1:
        raise ShardIndexError(
            f"The folder {folder} has several shard indexes "
            f"({', '.join(p.name for p in safetensors_indexes)}); "
            f"pass the one you want (e.g. {safetensors_indexes[0]}) instead of the folder."
        )
    if safetensors_indexes:
        index = read_index(safetensors_indexes[0])
        return ResolvedSource(str(folder), index.shards, (index,))
    safetensors = files_with("*" + SAFETENSORS_SUFFIX)
    if safetensors:
        return ResolvedSource(str(folder), tuple(safetensors))
    other_indexes = files_with("*.index.json")
    if len(other_indexes) == 1:
        index = read_index(other_indexes[0])
        return ResolvedSource(str(folder), tuple(_check_weight_file(p) for p in index.shards), (index,))
    pickles = [p for p in files_with("*") if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        return ResolvedSource(str(folder), tuple(pickles))
    raise NoWeightFilesError(
        f"The folder {folder} holds no weight files (*.safetensors, or pickle files with allow_pickle=True); "
        f"{_folder_listing(folder)}. Point at the folder that holds the model weights (for a diffusers "
        f"repository, a component folder such as transformer/ or vae/)."
    )


def _resolve_glob(pattern: str) -> ResolvedSource:
    matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    weights = [p for p in matches if p.suffix.lower() in WEIGHT_SUFFIXES]
    if not weights:
        found = ", ".join(p.name for p in matches[:20]) if matches else "nothing"
        raise NoWeightFilesError(
            f"The pattern {pattern!r} matches no weight files (*.safetensors, or pickle files with "
            f"allow_pickle=True); it matches {found}."
        )
    return ResolvedSource(pattern, tuple(weights))


def _resolve_one(item: str | os.PathLike[str]) -> ResolvedSource:
    path = Path(item)
    if path.is_dir():
        return _resolve_folder(path)
    if path.is_file():
        if path.name.endswith(".index.json"):
            index = read_index(path)
            return ResolvedSource(str(path), tuple(_check_weight_file(p) for p in index.shards), (index,))
        return ResolvedSource(str(path), (_check_weight_file(path),))
    text = os.fspath(item)
    if isinstance(text, str) and _GLOB_CHARS.intersection(text):
        return _resolve_glob(text)
    raise CheckpointFileNotFoundError(f"The checkpoint path {path} does not exist.")


def resolve_source(source: CheckpointSource) -> ResolvedSource:
    """Resolve a checkpoint source into its weight files.

    Args:
        source: A file, folder, ``*.index.json`` or glob string, or a list/tuple of them.

    Returns:
        The files (absolute, deduplicated, in order) and any index files that named them.

    Raises:
        CheckpointError: a subclass saying what is missing or unsupported.
    """
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise NoWeightFilesError("An empty list of checkpoint files was given.")
    parts = [_resolve_one(item) for item in items]
    files: dict[Path, None] = {}
    for part in parts:
        for file in part.files:
            files.setdefault(file.resolve(), None)
    description = parts[0].description if len(parts) == 1 else describe_files([Path(p.description) for p in parts])
    return ResolvedSource(description, tuple(files), tuple(i for p in parts for i in p.indexes))
