"""Saving generated images with the metadata image sites and tools read.

A PNG gets two text chunks:

* ``parameters``: the A1111 "infotext" that CivitAI, A1111, Forge and most image sites parse: the prompt,
  a ``Negative prompt:`` line (left out when empty), and one line of ``Key: value`` pairs
  (``Steps, Sampler, Schedule type, CFG scale, Distilled CFG Scale, Seed, Size, Model hash, Model,
  Denoising strength, Lora hashes, Templates, Version``). A value containing ``,``, ``:`` or a newline is
  JSON-quoted, as A1111 does. FLUX's embedded guidance uses Forge's key ``Distilled CFG Scale``.
* ``diffstudio``: a JSON document with everything needed to reproduce the image (model files and their
  SHA-256, LoRAs, templates with their inputs, the image's own seed, scheduler, call arguments, versions).

Both are written as ``tEXt`` chunks, which every reader understands. The JSON is ASCII-escaped, so it is
always ``tEXt``. The ``parameters`` text is written as A1111 writes it; when it holds characters outside
Latin-1 (a Chinese prompt, say) ``tEXt`` cannot carry it, and Pillow stores it as UTF-8 ``iTXt`` instead
(A1111 behaves the same way). Other formats (JPEG, WebP, ...) are saved without metadata. Every file is
written atomically: a crash never leaves a truncated image under the final name.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffstudio._io import atomic_write, file_sha256
from diffstudio._version import __version__
from diffstudio.errors import DiffstudioError

if TYPE_CHECKING:
    from PIL import Image

#: Identifies the layout of the ``diffstudio`` JSON chunk.
RECORD_FORMAT = "diffstudio.generation/1"
#: The PNG text chunk holding the A1111 infotext.
PARAMETERS_KEY = "parameters"
#: The PNG text chunk holding the JSON record.
RECORD_KEY = "diffstudio"

#: Call arguments that have their own record fields (not repeated under ``extra["arguments"]``).
_RECORDED_ARGUMENTS = frozenset(
    {
        "prompt",
        "negative_prompt",
        "seed",
        "num_inference_steps",
        "cfg_scale",
        "embedded_guidance",
        "denoising_strength",
        "height",
        "width",
        "progress_bar_cmd",
        "callback_on_step_end",
    }
)
#: File stems that say nothing about the model (diffusers / transformers default names).
_GENERIC_STEMS = frozenset({"diffusion_pytorch_model", "model", "pytorch_model", "flux", "ae"})


class ImageSaveError(DiffstudioError, ValueError):
    """An image cannot be saved under the given name (unknown extension)."""


def collect_versions(runtime: Any = None) -> dict[str, str]:
    """Return the versions that matter for reproducing an image.

    Args:
        runtime: A :class:`~diffstudio.runtime.Runtime`; when given, the distributions of its loaded plugins
            are added.

    Returns:
        ``{"diffstudio": ..., "python": ..., "torch": ..., "<plugin distribution>": ...}``.
    """
    versions = {"diffstudio": __version__, "python": platform.python_version()}
    torch = sys.modules.get("torch")
    if torch is not None:
        versions["torch"] = str(torch.__version__)
    else:
        try:
            versions["torch"] = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            pass
    for status in getattr(runtime, "statuses", ()):
        if getattr(status, "status", "") == "loaded":
            versions[str(status.distribution)] = str(status.version)
    return versions


@dataclass
class GenerationRecord:
    """How one image was made.

    Attributes:
        prompt: The prompt.
        negative_prompt: The negative prompt ("" when none).
        steps: Number of inference steps.
        cfg_scale: Classifier-free guidance scale.
        seed: This image's seed (each image of a batch has its own).
        width: Image width in pixels.
        height: Image height in pixels.
        sampler: Sampler name (A1111 ``Sampler``), e.g. ``"Euler"``.
        scheduler: Noise schedule name (A1111 ``Schedule type``), e.g. ``"FlowMatch flux2"``.
        model: Model name (A1111 ``Model``).
        model_hash: First 10 hex digits of the model file's SHA-256 (A1111 ``Model hash``).
        embedded_guidance: FLUX distilled guidance (Forge's ``Distilled CFG Scale``).
        denoising_strength: Image-to-image strength.
        loras: ``(name, sha256 or short hash or None, scale)`` per LoRA.
        templates: ``(name, inputs)`` per Diffusion Template.
        model_files: ``(path, sha256 or None)`` per loaded model file.
        extra: Anything else worth keeping (JSON record only).
        versions: Versions of diffstudio, python, torch and the plugins (see :func:`collect_versions`).
        job: The job row that made this image (a valid ``diffstudio run`` job line; ``run --from`` replays it).
        job_hash: The short hash of that job in the output file name (see :mod:`diffstudio.run_api`).
    """

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    cfg_scale: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    sampler: str | None = None
    scheduler: str | None = None
    model: str | None = None
    model_hash: str | None = None
    embedded_guidance: float | None = None
    denoising_strength: float | None = None
    loras: list[tuple[str, str | None, float]] = field(default_factory=list)
    templates: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    model_files: list[tuple[str, str | None]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=collect_versions)
    job: dict[str, Any] | None = None
    job_hash: str | None = None


# ----------------------------------------------------------------------------------------------------------
# A1111 infotext
# ----------------------------------------------------------------------------------------------------------


def quote_value(text: str) -> str:
    """Quote a value the way A1111 does: JSON string syntax when it contains ``,``, ``:`` or a newline."""
    if any(c in text for c in ",:\n"):
        return json.dumps(text, ensure_ascii=False)
    return text


def _number(value: float | int) -> str:
    if isinstance(value, bool) or isinstance(value, int):
        return str(int(value))
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _plain(name: str) -> str:
    """A name inside a quoted ``name: hash`` list must not contain the list's own separators."""
    return name.replace(":", "").replace(",", "").replace("\n", " ").strip()


def format_a1111_parameters(record: GenerationRecord) -> str:
    """Return the A1111 infotext of a record (see the module docstring for the layout).

    Args:
        record: The record.

    Returns:
        ``prompt``, an optional ``Negative prompt: ...`` line, and the ``Key: value, ...`` line.
    """
    pairs: list[tuple[str, str]] = []
    if record.steps is not None:
        pairs.append(("Steps", _number(record.steps)))
    if record.sampler:
        pairs.append(("Sampler", record.sampler))
    if record.scheduler:
        pairs.append(("Schedule type", record.scheduler))
    if record.cfg_scale is not None:
        pairs.append(("CFG scale", _number(record.cfg_scale)))
    if record.embedded_guidance is not None:
        pairs.append(("Distilled CFG Scale", _number(record.embedded_guidance)))
    if record.seed is not None:
        pairs.append(("Seed", _number(record.seed)))
    if record.width is not None and record.height is not None:
        pairs.append(("Size", f"{record.width}x{record.height}"))
    if record.model_hash:
        pairs.append(("Model hash", record.model_hash[:10]))
    if record.model:
        pairs.append(("Model", record.model))
    if record.denoising_strength is not None:
        pairs.append(("Denoising strength", _number(record.denoising_strength)))
    hashed = [(n, h) for n, h, _ in record.loras if h]
    if hashed:
        pairs.append(("Lora hashes", ", ".join(f"{_plain(n)}: {h[:12]}" for n, h in hashed)))
    if record.templates:
        pairs.append(("Templates", ", ".join(_plain(n) for n, _ in record.templates)))
    pairs.append(("Version", f"diffstudio {record.versions.get('diffstudio', __version__)}"))
    lines = [record.prompt]
    if record.negative_prompt:
        lines.append(f"Negative prompt: {record.negative_prompt}")
    lines.append(", ".join(f"{key}: {quote_value(value)}" for key, value in pairs))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# JSON record
# ----------------------------------------------------------------------------------------------------------


def _jsonable(value: Any, depth: int = 0) -> Any:
    """Convert call arguments to JSON: tensors and images become short descriptions, never their data."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth > 8:
        return repr(value)[:200]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v, depth + 1) for v in value]
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        if tuple(shape) == () and hasattr(value, "item"):
            return _jsonable(value.item(), depth + 1)
        return {"type": type(value).__name__, "shape": list(shape), "dtype": str(value.dtype)}
    size, mode = getattr(value, "size", None), getattr(value, "mode", None)
    if isinstance(size, tuple) and isinstance(mode, str):  # a PIL image
        return {"type": "PIL.Image", "size": list(size), "mode": mode}
    return str(value)[:200]


def record_to_dict(record: GenerationRecord) -> dict[str, Any]:
    """Return the JSON-ready dict behind :func:`record_to_json`."""
    return {
        "format": RECORD_FORMAT,
        "prompt": record.prompt,
        "negative_prompt": record.negative_prompt,
        "seed": record.seed,
        "steps": record.steps,
        "cfg_scale": record.cfg_scale,
        "embedded_guidance": record.embedded_guidance,
        "denoising_strength": record.denoising_strength,
        "width": record.width,
        "height": record.height,
        "sampler": record.sampler,
        "scheduler": record.scheduler,
        "model": {
            "name": record.model,
            "hash": record.model_hash,
            "files": [{"path": p, "sha256": h} for p, h in record.model_files],
        },
        "loras": [{"name": n, "hash": h, "scale": _jsonable(s)} for n, h, s in record.loras],
        "templates": [{"name": n, "inputs": _jsonable(i)} for n, i in record.templates],
        "extra": _jsonable(record.extra),
        "versions": dict(record.versions),
        **({"job": _jsonable(record.job)} if record.job is not None else {}),
        **({"job_hash": record.job_hash} if record.job_hash else {}),
    }


def record_to_json(record: GenerationRecord) -> str:
    """Return the reproducibility record as ASCII-only JSON (what the ``diffstudio`` PNG chunk holds)."""
    return json.dumps(_jsonable(record_to_dict(record)), ensure_ascii=True, sort_keys=False)


# ----------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------


def _image_format(path: Path) -> str:
    from PIL import Image

    extensions = Image.registered_extensions()
    fmt = extensions.get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        known = ", ".join(sorted(e for e, f in extensions.items() if f in Image.SAVE and e in _COMMON))
        raise ImageSaveError(f"cannot save an image as {path.name!r}: unknown extension; use one of {known}")
    return fmt


_COMMON = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})


def save_image(
    image: Image.Image,
    path: str | os.PathLike[str],
    record: GenerationRecord | None = None,
    *,
    metadata: bool = True,
) -> Path:
    """Save an image atomically, with its generation record in a PNG.

    Args:
        image: The image.
        path: Target file; the extension picks the format. Missing folders are created.
        record: How the image was made; written to PNGs as ``parameters`` and ``diffstudio`` text chunks.
        metadata: False writes no text chunk at all (``--no-metadata``).

    Returns:
        The path written.

    Raises:
        ImageSaveError: The extension is not an image format Pillow can write.
    """
    from PIL import PngImagePlugin

    target = Path(path)
    fmt = _image_format(target)
    options: dict[str, Any] = {}
    to_save: Image.Image = image
    if fmt == "PNG":
        if metadata and record is not None:
            info = PngImagePlugin.PngInfo()
            info.add_text(PARAMETERS_KEY, format_a1111_parameters(record))  # tEXt unless non-Latin-1
            info.add_text(RECORD_KEY, record_to_json(record))  # ASCII, always tEXt
            options["pnginfo"] = info
    elif fmt == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        to_save = image.convert("RGB")
    with atomic_write(target, "wb") as handle:
        to_save.save(handle, format=fmt, **options)
    return target


def read_image_metadata(path: str | os.PathLike[str]) -> tuple[str | None, dict[str, Any] | None]:
    """Read back what :func:`save_image` wrote.

    Args:
        path: An image file.

    Returns:
        ``(parameters, record)``: the A1111 text and the parsed JSON record; each None when absent (or, for
        the record, not valid JSON).
    """
    from PIL import Image

    with Image.open(path) as image:
        text: Mapping[Any, Any] = getattr(image, "text", None) or image.info
        parameters = text.get(PARAMETERS_KEY)
        raw = text.get(RECORD_KEY)
    record: dict[str, Any] | None = None
    if isinstance(raw, (str, bytes)):
        try:
            loaded = json.loads(raw)
        except ValueError:
            loaded = None
        record = loaded if isinstance(loaded, dict) else None
    return (str(parameters) if isinstance(parameters, str) else None), record


# ----------------------------------------------------------------------------------------------------------
# records from a pipeline call
# ----------------------------------------------------------------------------------------------------------


def _hash_or_none(path: str, enabled: bool) -> str | None:
    if not enabled:
        return None
    try:
        return file_sha256(path)
    except OSError:
        return None


def _scheduler_name(scheduler: Any) -> str | None:
    if scheduler is None:
        return None
    mode = getattr(scheduler, "shift_mode", None)
    base = type(scheduler).__name__.removesuffix("Scheduler") or type(scheduler).__name__
    return f"{base} {mode}" if mode else base


def record_for(
    pipe: Any,
    *,
    prompt: str,
    seed: int | None,
    image: Any,
    arguments: Mapping[str, Any],
    loras: Iterable[tuple[str, str | None, float]] = (),
    templates: Sequence[tuple[str, Mapping[str, Any]]] = (),
    hash_files: bool | None = None,
    job: Mapping[str, Any] | None = None,
    job_hash: str | None = None,
) -> GenerationRecord:
    """Build the record of one image a pipeline produced.

    Args:
        pipe: The pipeline (a :class:`~diffstudio.pipeline.base.BasePipeline`); its loaded components give
            the model files, its scheduler the schedule name, its runtime the plugin versions.
        prompt: The image's prompt.
        seed: The image's own seed.
        image: The image (its size is recorded when it has one).
        arguments: The call arguments.
        loras: ``(name, hash, scale)`` per LoRA applied.
        templates: ``(name, inputs)`` per template used.
        hash_files: Hash the model files (cached, see :func:`diffstudio._io.file_sha256`). Default: on,
            unless ``DIFFSTUDIO_HASH_FILES=0``.
        job: The job row to record (``run --from`` replays it).
        job_hash: The job's short hash (the one in the output file name).

    Returns:
        The record.
    """
    if hash_files is None:
        hash_files = os.environ.get("DIFFSTUDIO_HASH_FILES", "1").strip().lower() not in ("0", "false", "no")
    loaded: Mapping[str, Any] = getattr(pipe, "loaded", {}) or {}
    model_files: list[tuple[str, str | None]] = []
    hashes: dict[str, str | None] = {}
    components: dict[str, str] = {}
    for slot, component in loaded.items():
        claim = getattr(component, "claim", None)
        if claim is not None:
            components[slot] = str(claim.model_type)
        for file in getattr(component, "files", ()):
            hashes[str(file)] = _hash_or_none(str(file), hash_files)
            model_files.append((str(file), hashes[str(file)]))
    main = loaded.get("dit") or next(iter(loaded.values()), None)
    model_name: str | None = getattr(pipe, "pipeline_name", None) or None
    model_hash: str | None = None
    if main is not None:
        files = list(getattr(main, "files", ()))
        claim = getattr(main, "claim", None)
        if claim is not None:
            model_name = str(claim.model_type)
        if len(files) == 1:
            stem = Path(str(files[0])).stem
            model_name = model_name if stem in _GENERIC_STEMS else stem
            digest = hashes.get(str(files[0]))
            model_hash = digest[:10] if digest else None
    size = getattr(image, "size", None)
    width, height = size if isinstance(size, tuple) and len(size) == 2 else (None, None)
    steps = arguments.get("num_inference_steps")
    if steps is None:
        steps = getattr(getattr(pipe, "scheduler", None), "num_inference_steps", None) or None
    scheduler = getattr(pipe, "scheduler", None)
    extra: dict[str, Any] = {
        "pipeline": getattr(pipe, "pipeline_name", None) or type(pipe).__name__,
        "components": components,
        "arguments": {k: v for k, v in arguments.items() if k not in _RECORDED_ARGUMENTS},
    }
    if scheduler is not None:
        extra["scheduler_config"] = repr(scheduler)
    for key in ("device", "torch_dtype"):
        if getattr(pipe, key, None) is not None:
            extra[key] = str(getattr(pipe, key))
    return GenerationRecord(
        prompt=prompt,
        negative_prompt=str(arguments.get("negative_prompt") or ""),
        steps=None if steps is None else int(steps),
        cfg_scale=_optional_float(arguments.get("cfg_scale")),
        seed=seed,
        width=width if width is not None else arguments.get("width"),
        height=height if height is not None else arguments.get("height"),
        sampler="Euler",
        scheduler=_scheduler_name(scheduler),
        model=model_name,
        model_hash=model_hash,
        embedded_guidance=_optional_float(arguments.get("embedded_guidance")),
        denoising_strength=(
            _optional_float(arguments.get("denoising_strength"))
            if arguments.get("input_image") is not None or arguments.get("edit_image") is not None
            else None
        ),
        loras=list(loras),
        templates=[(name, dict(inputs)) for name, inputs in templates],
        model_files=model_files,
        extra=extra,
        versions=collect_versions(getattr(pipe, "runtime", None)),
        job=None if job is None else dict(job),
        job_hash=job_hash,
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
