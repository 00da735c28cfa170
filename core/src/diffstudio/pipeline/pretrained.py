"""The arguments of ``Pipeline.from_pretrained``: a repository as the first positional argument, checked types.

``from_pretrained`` takes, as diffusers users write it, a repository first::

    Flux2ImagePipeline.from_pretrained("/path/to/FLUX.2-klein-4B", torch_dtype=torch.bfloat16)
    Flux2ImagePipeline.from_pretrained("black-forest-labs/FLUX.2-klein-4B")   # a model id (local caches first)
    Flux2ImagePipeline.from_pretrained("diffstudio/shapes")                    # an embedded model

A folder with ``model_index.json`` (or whose sub-folders hold the component weights) becomes one
``ModelConfig`` per component through :func:`diffstudio.loading.diffusers_repo.read_repo`; a single checkpoint
file or a component folder becomes one ``ModelConfig``; a model id is resolved like a ``ModelConfig`` (embedded
models by their registered file patterns). ``model_configs=`` given as well are loaded after the repository's,
replacing the components they claim. The seed's keyword form (``torch_dtype=``, ``device=``,
``model_configs=``) is unchanged, and the old positional form ``from_pretrained(torch.bfloat16, "cuda",
[configs])`` still works.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from diffstudio.config import ModelConfig
from diffstudio.devices import check_device_available, parse_device, parse_dtype
from diffstudio.errors import ConfigError

#: The seed's positional order of ``from_pretrained`` (kept for scripts that pass them by position).
LEGACY_POSITIONAL = ("torch_dtype", "device", "model_configs")


def split_positional(args: Sequence[Any], named: dict[str, Any], defaults: dict[str, Any]) -> Any:
    """Sort ``from_pretrained``'s positional arguments into the repository and the seed's named ones.

    Args:
        args: The positional arguments.
        named: ``torch_dtype``, ``device`` and ``model_configs`` as given by keyword (updated in place).
        defaults: Their defaults (a keyword equal to its default counts as not given).

    Returns:
        The repository (path or model id) or None.

    Raises:
        ConfigError: Too many positional arguments, or one given both by position and by keyword.
    """
    repo: Any = None
    rest = list(args)
    if rest and isinstance(rest[0], (str, os.PathLike)):
        repo = rest.pop(0)
    if len(rest) > len(LEGACY_POSITIONAL):
        raise ConfigError(
            f"from_pretrained() got {len(args)} positional arguments; pass the repository (a folder or model id) "
            f"first and everything else by name (torch_dtype=, device=, model_configs=)"
        )
    for key, value in zip(LEGACY_POSITIONAL, rest):
        if named[key] is not defaults[key]:
            raise ConfigError(f"from_pretrained() got {key} both by position and by name; pass it once")
        named[key] = value
    return repo


def init_options(cls: type, base: type) -> set[str]:
    """Keyword options of ``cls.__init__`` that ``from_pretrained`` passes on (``base``'s when it takes ``**kwargs``).

    ``device``, ``torch_dtype`` and ``runtime`` are not counted: ``from_pretrained`` names them itself.
    """
    import inspect

    names: set[str] = set()
    for klass in (cls, base):
        params = inspect.signature(klass.__init__).parameters.values()  # type: ignore[misc]
        names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names - {"device", "torch_dtype", "runtime"}


def check_dtype_device(torch_dtype: Any, device: Any) -> tuple[torch.dtype, str | None]:
    """Check ``torch_dtype`` (a floating torch.dtype or its name) and ``device`` (str or torch.device, usable here).

    Raises:
        ConfigError: Naming the argument, the value and what is accepted.
    """
    dtype = parse_dtype(torch.bfloat16 if torch_dtype is None else torch_dtype, name="torch_dtype")
    if device is None:
        return dtype, None
    return dtype, check_device_available(parse_device(device, name="device"), "device")


def check_model_configs(model_configs: Any, name: str = "model_configs") -> list[ModelConfig]:
    """Return ``model_configs`` as a list, refusing anything that is not an iterable of ``ModelConfig``."""
    if isinstance(model_configs, ModelConfig):
        raise ConfigError(f"{name} is one ModelConfig; pass a list: {name}=[ModelConfig(...)]")
    if isinstance(model_configs, (str, bytes, os.PathLike)) or not isinstance(model_configs, Iterable):
        raise ConfigError(
            f"{name}={model_configs!r} is not a list of ModelConfig; pass [ModelConfig(path=...)], or the "
            f"repository folder as the first argument of from_pretrained"
        )
    configs = list(model_configs)
    for index, config in enumerate(configs):
        if not isinstance(config, ModelConfig):
            raise ConfigError(f"{name}[{index}] is a {type(config).__name__}, not a ModelConfig")
    return configs


def repository_configs(repo: str | os.PathLike[str], runtime: Any) -> list[ModelConfig]:
    """The model configs of a repository folder, checkpoint file or model id (see the module docstring).

    Raises:
        ConfigError: ``repo`` is neither an existing path nor a model id.
        DiffusersRepoError: A repository folder names no usable component.
        ModelNotFoundError: A model id is not found locally and cannot be downloaded.
    """
    from diffstudio.loading.diffusers_repo import DiffusersRepoError, is_diffusers_repo, read_repo

    text = os.fspath(repo)
    path = Path(text).expanduser()
    if path.is_dir():
        return list(read_repo(path).model_configs) if is_diffusers_repo(path) else [ModelConfig(path=str(path))]
    if path.is_file():
        return [ModelConfig(path=str(path))]
    embedded = {m.model_id: m for m in runtime.hooks.embedded_models()}
    if text in embedded:
        spec = embedded[text]
        return [ModelConfig(model_id=text, origin_file_pattern=p) for p in spec.model_configs]
    if text.startswith((".", "/", "~")) or os.sep in text.replace("/", "") or text.count("/") > 1:
        raise ConfigError(f"from_pretrained({text!r}): no such file or folder")
    try:
        index = ModelConfig(model_id=text, origin_file_pattern="model_index.json")
    except ConfigError:
        raise ConfigError(
            f"from_pretrained({text!r}) is neither an existing path nor a repository id ('org/name')"
        ) from None
    from diffstudio.resolve import resolve_files

    root = resolve_files(index).root
    try:
        return list(read_repo(root).model_configs)
    except DiffusersRepoError:  # only the index is local: fetch the component folders too
        pass
    everything = ModelConfig(model_id=text, origin_file_pattern=["model_index.json", "*/*"])
    return list(read_repo(resolve_files(everything).root).model_configs)
