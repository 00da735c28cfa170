"""What ``diffstudio run`` loads: the models a run or job names, their file identity, devices and memory settings.

``--model`` (or a job's ``"model"``) takes, once or several times:

* an embedded model id (``diffstudio/shapes``, the default): its files and tokenizer;
* a diffusers repository folder (``model_index.json`` + component folders): every component in it (see
  :mod:`diffstudio.loading.diffusers_repo`);
* a checkpoint file, a component folder or a glob: one component each;
* a model id (``org/name``): found in the local caches (downloaded only when allowed).

Messages speak of flags and files, not of Python arguments. Importing this module imports no torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffstudio.config import ModelConfig
from diffstudio.errors import ConfigError, DiffstudioError, ModelNotFoundError, PipelineInputError
from diffstudio.jobs import Job
from diffstudio.loading.diffusers_repo import is_diffusers_repo, read_repo
from diffstudio.resolve import resolve_files
from diffstudio.runtime import Runtime

DEFAULT_MODEL_ID = "diffstudio/shapes"
_GLOB_CHARS = frozenset("*?[")
_WEIGHT_LIKE = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".sft", ".gguf")
#: ``--offload`` choices: where weights rest between uses.
OFFLOAD_CHOICES = ("cpu", "disk")
#: The float8 storage type of ``--fp8``.
FP8_DTYPE = "float8_e4m3fn"


class ModelArgumentError(ConfigError):
    """A ``--model`` / ``--tokenizer`` entry (or a job's ``model``) names no usable file, folder or model."""


class MissingComponentsError(PipelineInputError):
    """The files given as the model lack components the pipeline needs (all of them are named)."""


@dataclass
class ModelPlan:
    """The model of a run or job, resolved without loading anything.

    Attributes:
        names: The model entries: absolute paths for files and folders, ids otherwise.
        configs: One ``ModelConfig`` per component.
        tokenizers: Tokenizer folders (from ``--tokenizer``, a repository folder or the embedded model).
        embedded: The embedded model spec, when the model is one.
        files: Files that make up the model (weights and configs; for identity and records).
    """

    names: tuple[str, ...]
    configs: list[ModelConfig]
    tokenizers: list[ModelConfig] = field(default_factory=list)
    embedded: Any = None
    files: list[Path] = field(default_factory=list)

    @property
    def defaults(self) -> dict[str, Any]:
        """Call arguments the embedded model was made for (none for other models)."""
        return dict(self.embedded.defaults) if self.embedded is not None else {}


@dataclass
class PlannedJob:
    """A job with everything resolved: settings, model, canonical row, hash, and each image's (seed, path)."""

    job: Job
    plan: ModelPlan
    settings: dict[str, Any]
    row: dict[str, Any]
    digest: str
    images: list[tuple[int, Path]] = field(default_factory=list)
    todo: list[tuple[int, Path]] = field(default_factory=list)

    @property
    def pipe_key(self) -> tuple[Any, ...]:
        """What consecutive jobs must share to keep one pipeline loaded: model, tokenizer, dtype, fp8."""
        return (self.plan.names, tuple(self.row.get("tokenizer", ())), self.row["dtype"], self.row.get("fp8", False))


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~", "\\"))
        or name.count("/") > 1
        or "\\" in name
        or name.lower().endswith(_WEIGHT_LIKE)
        or (len(name) > 1 and name[1] == ":")
    )


def _embedded(runtime: Runtime) -> dict[str, Any]:
    return {m.model_id: m for m in runtime.hooks.embedded_models()}


def _files_of(config: ModelConfig, embedded_roots: Mapping[str, Path]) -> list[Path]:
    """The files a config names, found offline (never downloads); empty when they are not here yet."""
    probe = config
    if config.model_id is not None and not config.skip_download:
        probe = ModelConfig(model_id=config.model_id, origin_file_pattern=config.origin_file_pattern,
                            local_model_path=config.local_model_path, revision=config.revision,
                            skip_download=True)  # fmt: skip
    try:
        return list(resolve_files(probe, embedded=embedded_roots).files)
    except ModelNotFoundError:
        return []


def plan_model(
    runtime: Runtime,
    names: Sequence[str] | None,
    *,
    tokenizers: Sequence[str] | None = None,
    memory: Mapping[str, Any] | None = None,
    flag: str = "--model",
) -> ModelPlan:
    """Resolve the model entries of a run or job (see the module docstring).

    Args:
        runtime: The plugin runtime (embedded models).
        names: The entries; None or empty: the embedded default model.
        tokenizers: ``--tokenizer`` folders.
        memory: ``ModelConfig`` memory fields for every component (``--offload``, ``--fp8``).
        flag: The flag named in messages.

    Raises:
        ModelArgumentError: An entry is neither a file, a folder, a glob with matches nor a model id, or the
            embedded default is not installed.
    """
    memory = dict(memory or {})
    embedded = _embedded(runtime)
    roots = {m.model_id: Path(m.root) for m in embedded.values()}
    if not names:
        if DEFAULT_MODEL_ID not in embedded:
            raise ModelArgumentError(
                f"No model given and the embedded default model {DEFAULT_MODEL_ID!r} is not installed. "
                f"Install it (pip install -e plugins/shapes) or pass --model PATH to a checkpoint."
            )
        names = [DEFAULT_MODEL_ID]
    plan = ModelPlan(names=(), configs=[])
    shown: list[str] = []
    for name in names:
        given = Path(name).expanduser()
        if len(names) == 1 and name in embedded:
            spec = plan.embedded = embedded[name]
            plan.configs += [ModelConfig(model_id=name, origin_file_pattern=p, **memory) for p in spec.model_configs]
            if spec.tokenizer_pattern:
                plan.tokenizers.append(ModelConfig(model_id=name, origin_file_pattern=spec.tokenizer_pattern))
            shown.append(name)
        elif given.is_dir() and is_diffusers_repo(given):
            repo = read_repo(given, **memory)
            plan.configs += repo.model_configs
            plan.tokenizers += [ModelConfig(path=str(p)) for p in repo.tokenizers.values()]
            shown.append(str(given.resolve()))
        elif given.exists():
            plan.configs.append(ModelConfig(path=str(given.resolve()), **memory))
            shown.append(str(given.resolve()))
        elif any(c in name for c in _GLOB_CHARS):
            plan.configs.append(ModelConfig(path=name, **memory))
            shown.append(name)
        elif _looks_like_path(name):
            raise ModelArgumentError(
                f"{flag} {name}: no such file or folder. Give a checkpoint file (.safetensors), a component folder, "
                f"a diffusers repository folder (with model_index.json), a glob, or a model id such as org/name"
            )
        else:
            try:
                plan.configs.append(ModelConfig(model_id=name, **memory))
            except ConfigError:
                raise ModelArgumentError(
                    f"{flag} {name!r} is neither an existing file or folder nor a model id (org/name); give the path "
                    f"of a checkpoint file, a component folder or a diffusers repository folder"
                ) from None
            shown.append(name)
    for entry in tokenizers or ():
        if not Path(entry).expanduser().is_dir():
            raise ModelArgumentError(f"--tokenizer {entry}: no such folder; give the tokenizer folder (tokenizer/)")
    if tokenizers:
        plan.tokenizers = [ModelConfig(path=str(Path(t).expanduser().resolve())) for t in tokenizers]
    plan.names = tuple(shown)
    for config in plan.configs:
        try:
            if config.path is not None and not any(c in str(config.path) for c in _GLOB_CHARS):
                path = Path(os.fspath(config.path))  # type: ignore[arg-type]
                plan.files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            else:
                files = _files_of(config, roots)
                if not files and config.path is not None:
                    raise ModelArgumentError(f"{flag} {config.path}: the pattern matches no file")
                plan.files += files
        except OSError as exc:
            raise ModelArgumentError(f"{flag} {config.describe()}: cannot list its files: {exc}") from None
    for config in plan.tokenizers:
        plan.files += _files_of(config, roots)
    return plan


def file_identity(paths: Sequence[str | os.PathLike[str]]) -> list[list[Any]]:
    """A cheap identity of files: ``[absolute path, size, mtime in ns]`` each (``[path]`` when absent).

    Used in job hashes: a file that changes gets a new identity, and hashing its content is not needed.
    """
    identity: list[list[Any]] = []
    for entry in paths:
        path = Path(entry)
        try:
            stat = path.stat()
        except (OSError, ValueError):
            identity.append([str(path)])
            continue
        if path.is_dir():
            identity.append([str(path.resolve()), "folder"])
            identity.extend(file_identity(sorted(p for p in path.rglob("*") if p.is_file())[:10_000]))
        else:
            identity.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return identity


def memory_fields(offload: str | None, fp8: bool) -> dict[str, Any]:
    """``ModelConfig`` memory fields for ``--offload {cpu,disk}`` and ``--fp8`` (empty: everything resident).

    ``--offload D`` keeps weights on ``D`` (``disk``: memory-mapped from the file) between uses and onloads
    them layer by layer; ``--fp8`` stores them as float8 and computes in the run's dtype.

    Raises:
        ConfigError: ``offload`` is not one of :data:`OFFLOAD_CHOICES`.
    """
    fields: dict[str, Any] = {}
    if offload is not None:
        if offload not in OFFLOAD_CHOICES:
            raise ConfigError(f"--offload {offload!r}: choose one of {', '.join(OFFLOAD_CHOICES)}")
        fields.update(offload_device=offload, onload_device=offload)
    if fp8:
        fields.update(offload_dtype=FP8_DTYPE, onload_dtype=FP8_DTYPE, preparing_dtype=FP8_DTYPE)
    return fields


def check_device(device: str | None) -> str:
    """Return the computation device (default: CUDA when available), checked to exist on this machine.

    Raises:
        ConfigError: The name is not a device, or this machine / torch build has no such device.
    """
    import torch

    from diffstudio.devices import parse_device

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    name = parse_device(device, name="--device")
    if name == "disk":
        raise ConfigError("--device disk: weights can rest on disk (--offload disk) but compute on cpu or cuda")
    try:
        torch.empty(1, device=name)
    except Exception as exc:  # AssertionError on CPU builds, RuntimeError for absent devices
        built = torch.version.cuda is not None
        cuda = "no such GPU is visible" if built else "this torch build has no CUDA"
        reason = cuda if name.startswith("cuda") else f"{type(exc).__name__}: {str(exc)[:200]}"
        raise ConfigError(
            f"--device {device}: not available on this machine ({reason}; torch {torch.__version__}). "
            f"Use --device cpu, or leave --device out to pick cuda when it is available"
        ) from None
    return name


def torch_dtype_for(dtype: Any, device: str) -> Any:
    """The computation dtype: the given name or dtype, else bfloat16 on CUDA and on CPUs with native bf16.

    Elsewhere (a CPU without ``avx512_bf16`` / AMX-BF16, see :func:`diffstudio.devices.cpu_compute_path`)
    the default is float32.

    Raises:
        ConfigError: Not a floating dtype name (the message lists the accepted ones).
    """
    from diffstudio.devices import default_compute_dtype, parse_dtype

    if dtype is None:
        return default_compute_dtype(device)
    return parse_dtype(dtype, name="--dtype")


def needed_components(pipe: Any) -> list[str]:
    """Slots some unit of ``pipe`` needs and cannot do without."""
    needed: list[str] = []
    for unit in getattr(pipe, "units", ()):
        for slot in unit.components:
            if slot not in unit.optional_components and slot not in needed:
                needed.append(slot)
    return needed


def check_complete(pipe: Any, plan: ModelPlan) -> None:
    """Refuse a pipeline that lacks components or a tokenizer, naming all of them and the flags that add them.

    Raises:
        MissingComponentsError: Something the pipeline needs was not in the given files.
    """
    slots: Mapping[str, str] = getattr(type(pipe), "slots", {})
    missing = [s for s in needed_components(pipe) if not pipe.has(s)]
    problems = [f"{s} ({slots[s]})" if s in slots else s for s in missing]
    tokenizer_missing = (
        pipe.has("text_encoder") and hasattr(pipe, "tokenizer") and getattr(pipe, "tokenizer", 1) is None
    )
    if tokenizer_missing:
        problems.append("the tokenizer (no tokenizer/ folder beside the text encoder)")
    if not problems:
        return
    loaded = ", ".join(f"{name} from {Path(c.files[0]).name if c.files else '?'}" for name, c in pipe.loaded.items())
    hint = []
    if missing:
        hint.append("add each missing component's file or folder with another --model (one per component), or give "
                    "the diffusers repository folder (with model_index.json) as --model")  # fmt: skip
    if tokenizer_missing:
        hint.append("give the tokenizer folder with --tokenizer DIR")
    raise MissingComponentsError(
        f"the model given ({', '.join(plan.names)}) lacks {'; '.join(problems)}. Loaded: {loaded or 'nothing'}. "
        f"To fix it, {' and '.join(hint)}."
    )


def explain_load_error(exc: DiffstudioError, plan: ModelPlan) -> DiffstudioError:
    """Rephrase Python-facing load errors for the command line (missing files, tokenizer, model ids)."""
    if isinstance(exc, ModelNotFoundError):
        ids = [n for n in plan.names if not Path(n).exists()]
        return ModelArgumentError(
            f"--model {', '.join(ids) or ', '.join(plan.names)}: not found as a file or folder, nor in the local "
            f"model caches. Give the checkpoint file(s) or a diffusers repository folder, or download the model "
            f"first (e.g. hf download {ids[0] if ids else 'ORG/NAME'}). Details: {exc}"
        )
    if "tokenizer" in type(exc).__name__.lower():
        return MissingComponentsError(
            f"the model given ({', '.join(plan.names)}) has no usable tokenizer: give the tokenizer folder with "
            f"--tokenizer DIR (a tokenizer/ folder of the model's repository). Details: {exc}"
        )
    return exc
