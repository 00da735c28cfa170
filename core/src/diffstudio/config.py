"""``ModelConfig``: which files make up one model, and where its weights live while it runs.

A config names its files in one of two ways:

* ``path``: a file, a list of files, a folder or a glob, used as given;
* ``model_id`` (``"org/name"``) plus ``origin_file_pattern``: resolved offline from the usual places (a
  local folder, an embedded model, the Hugging Face and ModelScope caches) by
  :func:`diffstudio.resolve.resolve_files`, and downloaded only when nothing is found and downloading is
  allowed.

``config`` gives the model's own configuration (a diffusers ``config.json``: a dict, the file, or the folder
holding it) for weights that do not carry one beside them, such as a single BFL file with non-standard sizes.
A ``config.json`` beside the weights is read without it; either wins over sizes inferred from tensor shapes.

The eight memory fields say, per state of the model's weights, which device and dtype to use (see
:meth:`ModelConfig.memory_config`). Every field is checked when the config is built; a bad value raises
:class:`~diffstudio.errors.ConfigError` naming the field, the value and what is accepted.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from diffstudio.devices import parse_device, parse_dtype
from diffstudio.errors import ConfigError

if TYPE_CHECKING:
    import torch

#: A device setting: a string such as ``"cuda"`` / ``"cpu"`` / ``"disk"``, a :class:`torch.device`, or unset.
DeviceLike = Union[str, "torch.device", None]
#: A dtype setting: a name such as ``"bfloat16"`` / ``"float8_e4m3fn"``, a :class:`torch.dtype`, or unset.
DTypeLike = Union[str, "torch.dtype", None]
#: One path as users write it.
PathLike = Union[str, "os.PathLike[str]"]

#: Accepted values of ``download_source``.
DOWNLOAD_SOURCES: tuple[str, ...] = ("huggingface", "modelscope")

#: The four weight states, in the order weights move through them.
MEMORY_STATES: tuple[str, ...] = ("offload", "onload", "preparing", "computation")

#: States whose device may be ``"disk"``.
_DISK_STATES = frozenset({"offload", "onload"})


@dataclass
class ModelConfig:
    """One model's files and memory settings.

    Attributes:
        path: A file, a list of files, a folder or a glob. When set, it is used as given (no cache lookup).
        model_id: Repository id, e.g. ``"black-forest-labs/FLUX.2-klein-4B"`` or ``"diffstudio/shapes"``.
        origin_file_pattern: What to take from the repository: a glob relative to its root
            (``"transformer/*.safetensors"``), a list of globs (their union), a folder ending in ``"/"``
            (``"tokenizer/"``), or None / ``""`` / ``"./"`` for the whole repository.
        download_source: ``"huggingface"`` or ``"modelscope"``; None tries whichever client is installed
            (Hugging Face first). Only used when the files are not found locally.
        local_model_path: A folder holding downloads (``{local_model_path}/{model_id}``, or the folder
            itself); downloads go there when it is set.
        skip_download: Never download; fail with the list of paths tried instead.
        revision: Branch, tag or commit of the repository (Hugging Face cache: ``refs/{revision}`` or a commit
            sha). None means ``main``.
        offload_device: Where the weights rest while the model is not needed (``"disk"`` allowed).
        offload_dtype: Their dtype there.
        onload_device: Where they go when the model's stage starts (``"disk"`` allowed).
        onload_dtype: Their dtype there.
        preparing_device: Where a layer's weights are staged right before it runs.
        preparing_dtype: Their dtype there (e.g. ``"float8_e4m3fn"`` for fp8 storage).
        computation_device: Where the layer computes.
        computation_dtype: The dtype it computes in.
        config: The model's configuration, as the diffusers ``from_single_file(config=...)`` takes it: a dict
            of ``config.json`` fields (``{"axes_dims_rope": [4, 6, 6]}``), a ``config.json`` path, or a folder
            holding one. It overrides the ``config.json`` beside the weights field by field, and both win over
            what is inferred from tensor shapes (which cannot tell, e.g., the RoPE axes split or theta). Fields
            the weights contradict are an error naming both values.
    """

    path: PathLike | list[PathLike] | None = None
    model_id: str | None = None
    origin_file_pattern: str | list[str] | None = None
    download_source: str | None = None
    local_model_path: str | None = None
    skip_download: bool = False
    revision: str | None = None
    offload_device: DeviceLike = None
    offload_dtype: DTypeLike = None
    onload_device: DeviceLike = None
    onload_dtype: DTypeLike = None
    preparing_device: DeviceLike = None
    preparing_dtype: DTypeLike = None
    computation_device: DeviceLike = None
    computation_dtype: DTypeLike = None
    config: Mapping[str, Any] | PathLike | None = None

    def __post_init__(self) -> None:
        self._check_source()
        self._check_pattern()
        self._check_config()
        for state in MEMORY_STATES:
            device = getattr(self, f"{state}_device")
            if device is not None:
                parse_device(device, name=f"{state}_device", allow_disk=state in _DISK_STATES)
            dtype = getattr(self, f"{state}_dtype")
            if dtype is not None:
                _memory_dtype(state, dtype)

    # ----------------------------------------------------------------------------------------------------
    # validation
    # ----------------------------------------------------------------------------------------------------

    def _check_source(self) -> None:
        if self.path is None and self.model_id is None:
            raise ConfigError(
                "ModelConfig needs path= (a file, a list of files, a folder or a glob) or model_id= "
                "(e.g. 'black-forest-labs/FLUX.2-klein-4B'); both are None"
            )
        if self.path is not None:
            entries = self.path if isinstance(self.path, list) else [self.path]
            if not entries:
                raise ConfigError("path=[] names no file; accepted: a path, a non-empty list of paths, or None")
            for entry in entries:
                if not isinstance(entry, (str, os.PathLike)) or not os.fspath(entry):
                    raise ConfigError(f"path entry {entry!r} is not a path; accepted: a non-empty str or os.PathLike")
        if self.model_id is not None:
            _check_model_id(self.model_id)
        if self.download_source is not None:
            source = self.download_source
            if not isinstance(source, str) or source.lower() not in DOWNLOAD_SOURCES:
                raise ConfigError(
                    f"download_source={self.download_source!r} is not supported; accepted: "
                    f"{', '.join(repr(s) for s in DOWNLOAD_SOURCES)} or None"
                )
            self.download_source = self.download_source.lower()
        if self.local_model_path is not None and not isinstance(self.local_model_path, (str, os.PathLike)):
            raise ConfigError(
                f"local_model_path={self.local_model_path!r} is not a path; accepted: a folder path or None"
            )
        if not isinstance(self.skip_download, bool):
            raise ConfigError(f"skip_download={self.skip_download!r} must be True or False")
        if self.revision is not None and (not isinstance(self.revision, str) or not self.revision.strip()):
            raise ConfigError(
                f"revision={self.revision!r} is not a revision; accepted: a branch, tag or commit sha, or None"
            )

    def _check_pattern(self) -> None:
        pattern = self.origin_file_pattern
        if pattern is None:
            return
        items: Sequence[object] = pattern if isinstance(pattern, list) else [pattern]
        if isinstance(pattern, list) and not pattern:
            raise ConfigError(
                "origin_file_pattern=[] matches nothing; accepted: a glob, a folder ending in '/', "
                "a non-empty list of those, or None for the whole repository"
            )
        for item in items:
            if not isinstance(item, str):
                raise ConfigError(
                    f"origin_file_pattern entry {item!r} is not a string; accepted: a glob relative to the "
                    f"repository root, a folder ending in '/', or None"
                )
            parts = item.replace("\\", "/").split("/")
            if item.startswith(("/", "\\")) or ".." in parts or (len(item) > 1 and item[1] == ":"):
                raise ConfigError(
                    f"origin_file_pattern={item!r} leaves the repository; accepted: a glob relative to the "
                    f"repository root without '..' (e.g. 'transformer/*.safetensors' or 'tokenizer/')"
                )

    def _check_config(self) -> None:
        config = self.config
        if config is None:
            return
        if isinstance(config, Mapping):
            bad = [k for k in config if not isinstance(k, str)]
            if bad:
                raise ConfigError(f"config= has non-string keys {bad[:5]}; accepted: a dict of config.json fields")
            self.config = dict(config)
            return
        if not isinstance(config, (str, os.PathLike)) or not os.fspath(config):
            raise ConfigError(
                f"config={config!r} is not a configuration; accepted: a dict of config.json fields, a config.json "
                "path, a folder holding config.json, or None"
            )
        path = os.fspath(config)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ConfigError(
                f"config={path!r}: {file} does not exist; pass a config.json path, a folder holding config.json, "
                "or a dict of its fields"
            )

    # ----------------------------------------------------------------------------------------------------
    # memory settings
    # ----------------------------------------------------------------------------------------------------

    def memory_config(self) -> dict[str, Any]:
        """Return the eight memory settings, parsed, with unset ones filled in.

        Devices come back as strings (``"cuda"``, ``"cpu"``, ``"disk"``) and dtypes as :class:`torch.dtype`.
        An unset offload, onload or preparing field takes the computation device (or dtype), so a config that
        sets only ``computation_*`` keeps the whole model there. When the computation field itself is unset,
        it and every field following it stay None: the pipeline then uses its own ``device`` /
        ``torch_dtype``.

        Returns:
            ``{"offload_device": ..., "offload_dtype": ..., ..., "computation_dtype": ...}``.
        """
        compute_device = (
            None
            if self.computation_device is None
            else parse_device(self.computation_device, name="computation_device")
        )
        compute_dtype = (
            None if self.computation_dtype is None else parse_dtype(self.computation_dtype, name="computation_dtype")
        )
        result: dict[str, Any] = {}
        for state in MEMORY_STATES:
            device = getattr(self, f"{state}_device")
            dtype = getattr(self, f"{state}_dtype")
            result[f"{state}_device"] = (
                compute_device
                if device is None
                else parse_device(device, name=f"{state}_device", allow_disk=state in _DISK_STATES)
            )
            result[f"{state}_dtype"] = compute_dtype if dtype is None else _memory_dtype(state, dtype)
        return result

    def vram_config(self) -> dict[str, Any]:
        """Alias of :meth:`memory_config`, under the name DiffSynth-Studio scripts use."""
        return self.memory_config()

    @property
    def has_memory_fields(self) -> bool:
        """True when any offload, onload or preparing field is set (the model moves between states).

        The computation fields alone do not count: they only say where the model runs.
        """
        return any(
            getattr(self, f"{state}_{kind}") is not None for state in MEMORY_STATES[:3] for kind in ("device", "dtype")
        )

    def describe(self) -> str:
        """Return a short description for messages: the path(s), or ``model_id`` with pattern and revision."""
        if self.path is not None:
            entries = self.path if isinstance(self.path, list) else [self.path]
            return ", ".join(os.fspath(p) for p in entries)
        pattern = self.origin_file_pattern
        shown = ", ".join(pattern) if isinstance(pattern, list) else (pattern or "(whole repository)")
        revision = f" at revision {self.revision}" if self.revision else ""
        return f"{shown} of model {self.model_id!r}{revision}"


def _memory_dtype(state: str, dtype: Any) -> Any:
    """Parse a memory-state dtype, allowing ``"disk"`` for offload and onload.

    ``"disk"`` means the weights stay in the file in its dtype, as in DiffSynth-Studio's configs.
    """
    if state in _DISK_STATES and isinstance(dtype, str) and dtype.strip().lower() == "disk":
        return "disk"
    return parse_dtype(dtype, name=f"{state}_dtype")


def _check_model_id(model_id: object) -> None:
    if not isinstance(model_id, str) or not model_id.strip():
        raise ConfigError(f"model_id={model_id!r} is not a repository id; accepted: 'org/name' (or 'name')")
    parts = model_id.split("/")
    if (
        len(parts) > 2
        or any(not p or p in (".", "..") for p in parts)
        or "\\" in model_id
        or any(c.isspace() for c in model_id)
    ):
        raise ConfigError(
            f"model_id={model_id!r} is not a repository id; accepted: 'org/name' or 'name' (no spaces, "
            f"no empty or '..' parts). Use path= for local files."
        )
