"""Read a diffusers repository folder: ``model_index.json`` and its component folders.

A diffusers pipeline repository (``black-forest-labs/FLUX.2-klein-4B`` as downloaded, or a folder written by
``pipeline.save_pretrained``) holds ``model_index.json`` and one sub-folder per component::

    model_index.json      {"_class_name": "Flux2KleinPipeline", "transformer": ["diffusers", "..."], ...}
    transformer/          config.json + *.safetensors (+ *.index.json when sharded)
    vae/                  config.json + *.safetensors
    text_encoder/         config.json + *.safetensors
    tokenizer/            tokenizer files
    scheduler/            scheduler_config.json

:func:`read_repo` turns it into one :class:`~diffstudio.config.ModelConfig` per weight-bearing component (the
families identify each one as usual), the tokenizer folders, and the components that are listed but absent.
A folder without ``model_index.json`` whose sub-folders hold weight files (and that holds none itself) is
read the same way: each such sub-folder is a component. Scheduler folders are not models and are skipped (each
family pipeline owns its schedule).

No torch import; only JSON and directory listings are read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffstudio._io import read_json
from diffstudio.config import ModelConfig
from diffstudio.errors import CheckpointError
from diffstudio.loading.sources import WEIGHT_SUFFIXES

#: The index file of a diffusers pipeline repository.
MODEL_INDEX = "model_index.json"
#: Largest ``model_index.json`` read (real ones are under 1 kB).
MAX_INDEX_BYTES = 1 << 20


class DiffusersRepoError(CheckpointError):
    """A diffusers repository folder's ``model_index.json`` cannot be read or names no usable component."""


@dataclass(frozen=True)
class DiffusersRepo:
    """What a diffusers repository folder holds.

    Attributes:
        root: The repository folder.
        pipeline_class: ``_class_name`` of ``model_index.json`` (None without an index).
        model_configs: One config per component folder that holds weight files, in index order.
        components: ``{name: folder}`` of those components.
        tokenizers: ``{name: folder}`` of tokenizer / processor folders (``tokenizer``, ``tokenizer_2``, ...).
        missing: Components the index lists whose folder is absent or holds no weight file.
        skipped: Listed components that are not models (schedulers, empty ``[null, null]`` entries).
    """

    root: Path
    pipeline_class: str | None
    model_configs: list[ModelConfig] = field(default_factory=list)
    components: dict[str, Path] = field(default_factory=dict)
    tokenizers: dict[str, Path] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def tokenizer_config(self, name: str = "tokenizer") -> ModelConfig | None:
        """The ``ModelConfig`` of tokenizer folder ``name`` (``"tokenizer"``, ``"tokenizer_2"``), if present."""
        folder = self.tokenizers.get(name)
        return None if folder is None else ModelConfig(path=str(folder))


def _has_weights(folder: Path) -> bool:
    try:
        return any(
            entry.is_file() and not entry.name.startswith(".") and Path(entry.name).suffix.lower() in WEIGHT_SUFFIXES
            for entry in os.scandir(folder)
        )
    except OSError:
        return False


def _is_tokenizer(name: str, entry: Any) -> bool:
    cls = str(entry[1]) if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] else ""
    return name.startswith("tokenizer") or "Tokenizer" in cls or "Processor" in cls or "FeatureExtractor" in cls


def _is_scheduler(name: str, entry: Any) -> bool:
    cls = str(entry[1]) if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] else ""
    return name.startswith("scheduler") or "Scheduler" in cls


def is_diffusers_repo(folder: str | os.PathLike[str]) -> bool:
    """True when ``folder`` is a repository folder this module reads (see the module docstring).

    That is: it holds ``model_index.json``, or it holds no weight file itself and at least one sub-folder
    that does.
    """
    root = Path(folder)
    if not root.is_dir():
        return False
    if (root / MODEL_INDEX).is_file():
        return True
    if _has_weights(root):
        return False
    return any(_component_folders(root))


def _component_folders(root: Path) -> list[Path]:
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    return [p for p in folders if _has_weights(p)]


def _read_index(root: Path) -> Mapping[str, Any]:
    index = root / MODEL_INDEX
    try:
        parsed = read_json(index, max_bytes=MAX_INDEX_BYTES)
    except (OSError, ValueError) as exc:
        raise DiffusersRepoError(
            f"cannot read {index}: {type(exc).__name__}: {exc}. A diffusers repository's model_index.json is a "
            f"JSON object mapping component names to [library, class]; fix or remove the file"
        ) from None
    if not isinstance(parsed, dict):
        raise DiffusersRepoError(
            f"{index} holds a JSON {type(parsed).__name__}, not an object mapping component names to [library, class]"
        )
    return parsed


def read_repo(folder: str | os.PathLike[str], **config_fields: Any) -> DiffusersRepo:
    """Read a diffusers repository folder (see the module docstring).

    Args:
        folder: The repository folder.
        **config_fields: Further ``ModelConfig`` fields for every component (memory settings such as
            ``offload_device="disk"``).

    Returns:
        The components, tokenizers and what is missing.

    Raises:
        DiffusersRepoError: ``model_index.json`` is not a JSON object, or no listed component holds weights.
    """
    root = Path(folder)
    repo = DiffusersRepo(root=root, pipeline_class=None)
    if (root / MODEL_INDEX).is_file():
        index = _read_index(root)
        cls = index.get("_class_name")
        repo = DiffusersRepo(root=root, pipeline_class=str(cls) if isinstance(cls, str) else None)
        for name, entry in index.items():
            if name.startswith("_"):
                continue
            empty = not isinstance(entry, (list, tuple)) or not any(entry)
            if _is_scheduler(name, entry) or (empty and not (root / name).is_dir()):
                repo.skipped.append(name)
                continue
            if not _safe_name(name):
                raise DiffusersRepoError(
                    f"{root / MODEL_INDEX} names the component {name!r}, which is not a plain folder name"
                )
            path = root / name
            if _is_tokenizer(name, entry):
                if path.is_dir():
                    repo.tokenizers[name] = path
                else:
                    repo.missing.append(name)
                continue
            if path.is_dir() and _has_weights(path):
                repo.components[name] = path
            else:
                repo.missing.append(name)
    else:
        for path in _component_folders(root):
            repo.components[path.name] = path
        for path in sorted(root.glob("tokenizer*")):
            if path.is_dir():
                repo.tokenizers[path.name] = path
    if not repo.components:
        listed = ", ".join(repo.missing) or "none"
        raise DiffusersRepoError(
            f"the repository folder {root} holds no component with weight files (listed but missing: {listed}); "
            f"download the component folders (e.g. transformer/, vae/, text_encoder/) or pass the weight files "
            f"themselves"
        )
    repo.model_configs.extend(ModelConfig(path=str(p), **config_fields) for p in repo.components.values())
    return repo


def _safe_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def repo_model_configs(
    folder: str | os.PathLike[str], **config_fields: Any
) -> tuple[list[ModelConfig], ModelConfig | None]:
    """Return ``(one ModelConfig per component, the tokenizer config or None)`` of a repository folder.

    The short form of :func:`read_repo` for single-tokenizer families (FLUX.2): ``Pipeline.from_pretrained(
    model_configs=configs, tokenizer_config=tokenizer)``. FLUX.1's second tokenizer is
    ``read_repo(folder).tokenizer_config("tokenizer_2")`` (each family also finds ``tokenizer*/`` beside its
    text encoders on its own).

    Args:
        folder: The repository folder.
        **config_fields: Further ``ModelConfig`` fields for every component (memory settings).

    Raises:
        DiffusersRepoError: See :func:`read_repo`.
    """
    repo = read_repo(folder, **config_fields)
    return list(repo.model_configs), repo.tokenizer_config("tokenizer")
