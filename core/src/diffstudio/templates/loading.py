"""Loading template models: installed packages, data-only folders, seed-format folders (see :mod:`.trust`).

Data-only folder (the format ``diffstudio template export`` writes and the docs recommend for publishing)::

    my-template/
      template.json        {"format": "diffstudio-template", "format_version": 1,
                            "template": "<registered name>", "config": {...constructor kwargs...},
                            "weights": ["model.safetensors"],
                            "dit_geometry": {"double_blocks": 2, "single_blocks": 4, "heads": 2, "head_dim": 64},
                            "target_model": "diffstudio/shapes"}       (the last two optional)
      model.safetensors

``template.json`` is at most 16 MiB; weight names must stay inside the folder (``..``, absolute paths and symbolic
links out are refused) and be safetensors files.

Seed-format folder (DiffSynth's): ``model.py`` defining ``TEMPLATE_MODEL`` (the class), optionally
``TEMPLATE_MODEL_PATH`` (a relative safetensors path, a list of shards, or None for the class's own
initialisation), ``TEMPLATE_MODEL_CONFIG`` (constructor kwargs), ``TEMPLATE_DATA_PROCESSOR`` (a class) and
``TEMPLATE_DIT_GEOMETRY``, plus the weights. ``model.py`` runs only as :mod:`.trust` allows, compiled from the exact
bytes that were hashed (never from ``__pycache__``). When both ``template.json`` and ``model.py`` are present,
``template.json`` wins and no code runs.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from diffstudio._io import read_json
from diffstudio.config import ModelConfig
from diffstudio.errors import DiffstudioError, TemplateError, TemplateFormatError
from diffstudio.loading.assign import MetaTensorsRemainError
from diffstudio.registry import UnknownNameError
from diffstudio.templates.geometry import resolve_geometry
from diffstudio.templates.protocol import check_template_class
from diffstudio.templates.trust import TrustedCode, check_trust_flag, require_pin, trusted_code

if TYPE_CHECKING:
    import torch
    from torch import nn

    from diffstudio.runtime import Runtime

logger = logging.getLogger("diffstudio.templates")

TEMPLATE_JSON = "template.json"
CODE_FILE = "model.py"
FORMAT_NAME = "diffstudio-template"
FORMAT_VERSION = 1
MAX_TEMPLATE_JSON_BYTES = 16 * 1024 * 1024

TemplateKind = Literal["installed", "data", "code"]

__all__ = [
    "CODE_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "TEMPLATE_JSON",
    "LoadedTemplate",
    "build_template",
    "load_state_dict",
    "load_template",
    "load_template_data_processor",
    "load_template_model",
    "read_template_json",
    "template_kind",
]


@dataclass
class LoadedTemplate:
    """One loaded template model and where it came from.

    Attributes:
        model: The template model (``nn.Module``), in eval mode.
        name: Display name: the registered name (installed templates), else the folder name.
        kind: ``"installed"``, ``"data"`` or ``"code"``.
        source: The folder, or ``"package <distribution plugin>"`` for installed templates.
        model_id: What ``template_inputs[i]["model_id"]`` may name to route to it (the config's model_id or
            path), besides its index.
        registered_name: The registry name of its class (installed and data-only templates).
        config: The constructor keyword arguments used.
        data_processor: The data-processor class for training, or None.
        code_sha256: SHA-256 of the executed ``model.py`` (code templates).
        dit_geometry: The DiT geometry the template was made for (see :mod:`.geometry`), or None when unknown.
    """

    model: nn.Module
    name: str
    kind: TemplateKind
    source: str
    model_id: str | None = None
    registered_name: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    data_processor: type[Any] | None = None
    code_sha256: str | None = None
    dit_geometry: dict[str, int] | None = None


# ----------------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------------


def _safetensors_files(path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    entries = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    files: list[Path] = []
    for entry in entries:
        p = Path(os.fspath(entry))
        if p.is_dir():
            files.extend(sorted(p.glob("*.safetensors")))
        elif p.suffix != ".safetensors":
            raise TemplateFormatError(
                f"{p} is not a safetensors file; template weights are read from safetensors only (pickle files can "
                f"run code when loaded). Convert it with safetensors.torch.save_file."
            )
        elif not p.is_file():
            raise TemplateFormatError(f"the template weights file {p} does not exist")
        else:
            files.append(p)
    return files


def load_state_dict(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    torch_dtype: torch.dtype | None = None,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """Read safetensors weights (a file, a list of shards or a folder) into one state dict.

    Args:
        path: File, files or folder of ``*.safetensors``.
        torch_dtype: Cast floating-point tensors to this dtype (None keeps the file's).
        device: Where the tensors go.

    Returns:
        ``{name: tensor}``.
    """
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        try:
            tensors = load_file(str(file), device=device)
        except DiffstudioError:
            raise
        except (Exception, RecursionError) as exc:  # noqa: B014 - safetensors' own error class is not exported
            raise TemplateFormatError(
                f"cannot read the template weights {file}: {type(exc).__name__}: {exc}; it must be a valid "
                f"safetensors file"
            ) from exc
        for key, tensor in tensors.items():
            if torch_dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(torch_dtype)
            state[key] = tensor
    return state


def build_template(
    cls: type[Any],
    config: Mapping[str, Any],
    weights: Sequence[Path],
    *,
    torch_dtype: torch.dtype | None,
    device: str,
    where: str,
) -> nn.Module:
    """Instantiate a template class and load its weights strictly.

    With weights, the module is built on the meta device and the tensors assigned (no random initialisation);
    a class whose non-persistent buffers cannot be rebuilt that way is built normally instead. Without weights
    the class's own initialisation is used.
    """
    from diffstudio.loading.assign import build_on_meta, load_state_dict_into

    check_template_class(cls, where)
    kwargs = dict(config)
    try:
        if not weights:
            model: nn.Module = cls(**kwargs)
            model = model.to(device=device, dtype=torch_dtype) if torch_dtype is not None else model.to(device)
            return model.eval()
        state = load_state_dict(list(weights))
        try:
            model = build_on_meta(lambda: cls(**kwargs))
            load_state_dict_into(model, state, dtype=torch_dtype, device=device)
        except MetaTensorsRemainError:
            model = cls(**kwargs)
            load_state_dict_into(model, state, dtype=torch_dtype, device=device)
    except DiffstudioError:
        raise
    except (TypeError, ValueError, RuntimeError, OverflowError, MemoryError, IndexError, KeyError) as exc:
        message = f"cannot build the template class {cls.__name__} ({where}) with {kwargs}: {type(exc).__name__}: {exc}"
        raise TemplateFormatError(message) from exc
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# the three kinds
# ----------------------------------------------------------------------------------------------------------


def template_kind(folder: Path) -> Literal["data", "code"]:
    """``"data"`` when the folder has ``template.json``, ``"code"`` when it has only ``model.py``."""
    if (folder / TEMPLATE_JSON).is_file():
        return "data"
    if (folder / CODE_FILE).is_file():
        return "code"
    shown = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) if folder.is_dir() else "(not a folder)"
    raise TemplateFormatError(
        f"{folder} is not a template folder: it has neither {TEMPLATE_JSON} (data-only template) nor {CODE_FILE} "
        f"(seed format). Files: {shown}"
    )


def read_template_json(folder: Path) -> dict[str, Any]:
    """Read and validate ``template.json``."""
    path = folder / TEMPLATE_JSON
    try:
        data = read_json(path, max_bytes=MAX_TEMPLATE_JSON_BYTES)  # a template description is a small JSON file
    except (OSError, ValueError) as exc:
        raise TemplateFormatError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise TemplateFormatError(f"{path} is not a diffstudio template description (expected format={FORMAT_NAME!r})")
    version = data.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise TemplateFormatError(
            f"{path} has format_version {version!r}; this diffstudio reads up to {FORMAT_VERSION}. Upgrade diffstudio."
        )
    if not isinstance(data.get("template"), str) or not data["template"]:
        raise TemplateFormatError(f"{path} must name the registered template class under 'template'")
    if not isinstance(data.get("config", {}), dict):
        raise TemplateFormatError(f"{path}: 'config' must be an object of constructor arguments")
    weights = data.get("weights")
    if weights is not None and not (
        isinstance(weights, str) or (isinstance(weights, list) and all(isinstance(w, str) for w in weights))
    ):
        raise TemplateFormatError(f"{path}: 'weights' must be a file name or a list of file names, got {weights!r}")
    for key in ("target_model", "base_pipeline", "description"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise TemplateFormatError(f"{path}: {key!r} must be a string, got {data[key]!r}")
    return data


def _inside(folder: Path, relative: object, what: str) -> Path:
    if not isinstance(relative, (str, os.PathLike)) or not os.fspath(relative) or "\x00" in os.fspath(relative):
        raise TemplateFormatError(f"{what} {relative!r} in {folder} must be a relative file name")
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise TemplateFormatError(f"{what} {relative!r} points outside the template folder {folder}")
    return path


def _registered_class(runtime: Runtime, name: str, where: str) -> tuple[type[Any], Any]:
    try:
        spec = runtime.hooks.templates().get(name)
    except UnknownNameError as exc:
        raise TemplateError(
            f"{where} names the template class {name!r}, which no installed package registers. Install the "
            f"template package that provides it (data-only templates run no code, so the class must be installed). "
            f"{exc}"
        ) from exc
    return spec.factory(), spec


def _load_data(folder: Path, runtime: Runtime, torch_dtype: torch.dtype | None, device: str) -> LoadedTemplate:
    data = read_template_json(folder)
    where = str(folder / TEMPLATE_JSON)
    if (folder / CODE_FILE).exists():
        logger.info("diffstudio: %s has a template.json; its %s is ignored and not executed", folder, CODE_FILE)
    cls, spec = _registered_class(runtime, data["template"], where)
    listed = data.get("weights")
    if listed is None:
        weights = sorted(folder.glob("*.safetensors"))
    else:
        weights = [_inside(folder, w, "weights file") for w in ([listed] if isinstance(listed, str) else listed)]
    config = dict(data.get("config", {}))
    model = build_template(cls, config, weights, torch_dtype=torch_dtype, device=device, where=where)
    processor = spec.data_processor() if spec.data_processor is not None else None
    geometry = resolve_geometry(model, where, (where, data.get("dit_geometry")),
                                default=(f"the registration of {data['template']!r}", spec.dit_geometry))  # fmt: skip
    return LoadedTemplate(model, folder.name, "data", str(folder), registered_name=data["template"],
                          config=config, data_processor=processor, dit_geometry=geometry)  # fmt: skip


def _exec_code(trusted: TrustedCode) -> ModuleType:
    """Compile and execute exactly the checked bytes in a fresh module (no import system, no bytecode cache)."""
    # Executed afresh on every load, as the seed does: a model.py may compute TEMPLATE_MODEL_PATH from the files
    # present ("model.safetensors" if it exists else None), which the packaging steps change between two loads.
    # The import system is not used: it would prefer a __pycache__/*.pyc (possibly not compiled from these bytes)
    # and write one. compile() of the hashed bytes runs what was reviewed and writes nothing.
    code = trusted.path
    try:
        compiled = compile(trusted.source, str(code), "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        raise TemplateFormatError(f"{code} is not valid Python: {type(exc).__name__}: {exc}") from exc
    module_name = f"diffstudio_template_code_{trusted.sha256[:16]}"
    module = ModuleType(module_name)
    module.__file__ = str(code)
    sys.modules[module_name] = module  # classes defined in it resolve their module (dataclasses, pickling)
    writing = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # nor does what it imports leave bytecode in the folder
    try:
        exec(compiled, module.__dict__)  # noqa: S102 - the caller trusted exactly these bytes (see .trust)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise TemplateFormatError(f"executing {code} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.dont_write_bytecode = writing
    return module


def _code_module(
    folder: Path, *, trust_code: bool, code_sha256: str | None, env: Mapping[str, str] | None
) -> tuple[ModuleType, TrustedCode]:
    code = folder / CODE_FILE
    trusted = trusted_code(code, trust_code=trust_code, code_sha256=code_sha256, env=env)
    module = _exec_code(trusted)
    if not isinstance(getattr(module, "TEMPLATE_MODEL", None), type):
        raise TemplateFormatError(f"{code} must define TEMPLATE_MODEL, the template model class")
    return module, trusted


def _load_code(
    folder: Path,
    *,
    torch_dtype: torch.dtype | None,
    device: str,
    trust_code: bool,
    code_sha256: str | None,
    env: Mapping[str, str] | None,
) -> LoadedTemplate:
    module, trusted = _code_module(folder, trust_code=trust_code, code_sha256=code_sha256, env=env)
    code = folder / CODE_FILE
    listed = getattr(module, "TEMPLATE_MODEL_PATH", None)
    entries = [] if listed is None else [listed] if isinstance(listed, (str, os.PathLike)) else listed
    if not isinstance(entries, (list, tuple)):
        raise TemplateFormatError(f"{code}: TEMPLATE_MODEL_PATH must be a file name, a list of them or None")
    weights = [_inside(folder, w, "TEMPLATE_MODEL_PATH") for w in entries]
    config = getattr(module, "TEMPLATE_MODEL_CONFIG", None) or {}
    if not isinstance(config, Mapping):
        raise TemplateFormatError(f"{code}: TEMPLATE_MODEL_CONFIG must be a dict of constructor arguments")
    config = dict(config)
    model = build_template(module.TEMPLATE_MODEL, config, weights, torch_dtype=torch_dtype, device=device,
                           where=str(code))  # fmt: skip
    processor = getattr(module, "TEMPLATE_DATA_PROCESSOR", None)
    geometry = resolve_geometry(model, str(code), (f"{code} (TEMPLATE_DIT_GEOMETRY)",
                                                   getattr(module, "TEMPLATE_DIT_GEOMETRY", None)))  # fmt: skip
    return LoadedTemplate(model, folder.name, "code", str(folder), config=config, data_processor=processor,
                          code_sha256=trusted.sha256, dit_geometry=geometry)  # fmt: skip


def _load_installed(name: str, runtime: Runtime, torch_dtype: torch.dtype | None, device: str) -> LoadedTemplate:
    cls, spec = _registered_class(runtime, name, "ModelConfig(model_id=...)")
    weights = [Path(p) for p in spec.weights()] if spec.weights is not None else []
    config = dict(spec.config)
    owner = runtime.hooks.templates().owner(name)
    model = build_template(cls, config, weights, torch_dtype=torch_dtype, device=device, where=f"plugin {owner}")
    processor = spec.data_processor() if spec.data_processor is not None else None
    geometry = resolve_geometry(model, f"plugin {owner}", default=(f"the registration of {name!r}", spec.dit_geometry))
    return LoadedTemplate(model, name, "installed", f"package plugin {owner}", model_id=name, registered_name=name,
                          config=config, data_processor=processor, dit_geometry=geometry)  # fmt: skip


def _folder_of(config: ModelConfig, runtime: Runtime) -> Path:
    from diffstudio.resolve import resolve_files

    if config.path is not None and not isinstance(config.path, list) and Path(os.fspath(config.path)).is_dir():
        return Path(os.fspath(config.path))
    embedded = {m.model_id: m.root for m in runtime.hooks.embedded_models()}
    resolved = resolve_files(config, embedded=embedded)
    return resolved.folder if resolved.is_folder or config.path is None else resolved.root


def load_template(
    source: ModelConfig | str | os.PathLike[str],
    *,
    runtime: Runtime | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str = "cpu",
    trust_code: bool = False,
    code_sha256: str | None = None,
    env: Mapping[str, str] | None = None,
) -> LoadedTemplate:
    """Load one template by registered name, folder or ``ModelConfig``.

    Order: a ``model_id`` (or string) that is a registered template name loads the installed template; else the
    folder is found (``path``, or ``model_id`` resolved from the local caches) and loaded as data-only
    (``template.json``) or, only when trusted, as seed-format code (``model.py``).

    Args:
        source: ``ModelConfig(model_id=...)`` / ``ModelConfig(path=...)``, a registered name, or a folder.
        runtime: Plugin runtime holding the template registry (default: a new one).
        torch_dtype: Dtype of the template's floating-point weights (None keeps the file's).
        device: Where the template runs.
        trust_code: Allow executing a seed-format ``model.py`` for this call.
        code_sha256: Pin the SHA-256 of that ``model.py``.
        env: Environment for ``DIFFSTUDIO_DISABLE_REMOTE_CODE`` (default ``os.environ``).

    Raises:
        TrustFlagError: ``trust_code`` is not a bool, or ``code_sha256`` not a string (checked first, for every
            kind of template).
        UntrustedCodeError: A seed-format folder without ``trust_code`` (or under the kill switch, or with a
            pin that does not match). Nothing from the folder was executed.
        TemplateFormatError: The folder is not a template, or the class breaks the protocol.
        TemplateError: The class a data-only template names is not installed.
    """
    from diffstudio.runtime import Runtime

    check_trust_flag(trust_code)
    require_pin(code_sha256)
    runtime = runtime if runtime is not None else Runtime()
    if not isinstance(source, (ModelConfig, str, os.PathLike)):
        raise TemplateError(
            f"a template source must be a registered name, a folder or a ModelConfig, got {type(source).__name__}"
        )
    if isinstance(source, ModelConfig):
        config = source
    elif isinstance(source, str) and not Path(source).exists():
        config = ModelConfig(model_id=source)
    else:
        config = ModelConfig(path=os.fspath(source))
    if any(v is not None for v in config.memory_config().values()):
        logger.warning("diffstudio: memory settings on a template ModelConfig are ignored (%s)", config.describe())
    if config.path is None and config.model_id is not None and config.model_id in runtime.hooks.templates():
        return _load_installed(config.model_id, runtime, torch_dtype, device)
    folder = _folder_of(config, runtime)
    if template_kind(folder) == "data":
        loaded = _load_data(folder, runtime, torch_dtype, device)
    else:
        loaded = _load_code(folder, torch_dtype=torch_dtype, device=device, trust_code=trust_code,
                            code_sha256=code_sha256, env=env)  # fmt: skip
    loaded.model_id = config.model_id if config.model_id is not None else config.describe()
    return loaded


def load_template_model(
    path: ModelConfig | str | os.PathLike[str],
    torch_dtype: torch.dtype | None = None,
    device: str = "cpu",
    *,
    trust_code: bool = False,
    code_sha256: str | None = None,
    runtime: Runtime | None = None,
) -> nn.Module:
    """Load a template model (the seed's ``load_template_model``); see :func:`load_template` for the rules."""
    check_trust_flag(trust_code)
    return load_template(path, runtime=runtime, torch_dtype=torch_dtype, device=device, trust_code=trust_code,
                         code_sha256=code_sha256).model  # fmt: skip


def load_template_data_processor(
    path: ModelConfig | str | os.PathLike[str],
    *,
    trust_code: bool = False,
    code_sha256: str | None = None,
    runtime: Runtime | None = None,
) -> type[Any] | None:
    """Return a template's data-processor class (None when it has none), without building the model."""
    from diffstudio.runtime import Runtime

    check_trust_flag(trust_code)
    require_pin(code_sha256)
    runtime = runtime if runtime is not None else Runtime()
    if isinstance(path, str) and path in runtime.hooks.templates():
        spec = runtime.hooks.templates().get(path)
        return spec.data_processor() if spec.data_processor is not None else None
    config = path if isinstance(path, ModelConfig) else ModelConfig(path=os.fspath(path))
    folder = _folder_of(config, runtime)
    if template_kind(folder) == "data":
        _, spec = _registered_class(runtime, read_template_json(folder)["template"], str(folder / TEMPLATE_JSON))
        return spec.data_processor() if spec.data_processor is not None else None
    module, _ = _code_module(folder, trust_code=trust_code, code_sha256=code_sha256, env=None)
    processor = getattr(module, "TEMPLATE_DATA_PROCESSOR", None)
    return processor if isinstance(processor, type) else None
