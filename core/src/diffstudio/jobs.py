"""Job rows for ``diffstudio run``: the fields, their validation, job files, and where outputs go.

A job is one prompt with its options (a JSON object). Job files are a JSON list of objects or JSON lines (one
object per line, blank lines ignored). The reproducibility record that ``diffstudio run`` writes into each PNG
(``"format": "diffstudio.generation/1"``) is itself a valid job line: it holds the job that made the image.

Every field is checked for its type and range (``true`` is not an integer, ``1e9`` is not an integer, NaN is
not a number); a bad value is a :class:`JobFieldError` naming the file, the line, the job and the field. An
unknown field is an error listing the known ones. See :data:`FIELDS` for the fields and :data:`ALIASES` for
the short names. Paths in a job file (``model``, ``loras``, ``image``, ...) are relative to the job file's
folder when such a file exists there, else used as given.

``output`` is a file name relative to the output folder: absolute names, ``..`` and names reaching outside
the folder through a symbolic link are refused (:class:`OutputPathError`). Importing this module imports no
torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from diffstudio.errors import DiffstudioError
from diffstudio.outputs import RECORD_FORMAT

#: Most images one job may ask for.
MAX_NUM_IMAGES = 10_000
#: Most denoising steps a job may ask for (the pipelines may set tighter limits).
MAX_STEPS = 10_000
#: Largest image side a job may ask for, in pixels (the pipelines may set tighter limits).
MAX_SIDE = 16_384
#: Largest job file read, in bytes.
MAX_JOB_FILE_BYTES = 64 << 20
#: Most entries in a list field (models, LoRAs, templates, edit images, template inputs, sigmas).
MAX_LIST = 1_000
#: Image file extensions an output may have.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SCHEDULER_NAME = re.compile(r"[A-Za-z0-9_.\-/]{1,100}")
_DTYPES = (
    "float32", "float16", "bfloat16", "float64", "fp32", "fp16", "bf16", "fp64", "half", "float", "double"
)  # fmt: skip


class JobFileError(DiffstudioError, ValueError):
    """A job file cannot be read, or a row in it is invalid."""


class JobFieldError(JobFileError):
    """A job field has the wrong type or an out-of-range value, or is unknown.

    Attributes:
        job: The job's index (0-based) in its file or list.
        line: The job's line in a JSON-lines file (1-based), when known.
        field: The field's name as written in the job.
    """

    def __init__(self, message: str, *, job: int, line: int | None, field: str) -> None:
        super().__init__(message)
        self.job, self.line, self.field = job, line, field


class OutputPathError(JobFileError):
    """A job's ``output`` names a file outside the output folder, or not an image file."""


# ----------------------------------------------------------------------------------------------------------
# the fields
# ----------------------------------------------------------------------------------------------------------

Checker = Callable[[Any], Any]


class _Bad(Exception):
    """Raised by a checker with the reason; turned into a JobFieldError naming the job and the field."""


def _int(low: int, high: int) -> Checker:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"must be an integer from {low} to {high}, got {_show(value)}")
        if not low <= value <= high:
            raise _Bad(f"must be from {low} to {high}, got {_show(value)}")
        return value

    return check


def _float(low: float, high: float, *, low_open: bool = False) -> Checker:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad(f"must be a number, got {_show(value)}")
        number = float(value)
        if not math.isfinite(number):
            raise _Bad(f"must be a finite number, got {_show(value)}")
        if number < low or number > high or (low_open and number == low):
            side = "(" if low_open else "["
            raise _Bad(f"must be in {side}{low:g}, {high:g}], got {_show(value)}")
        return number

    return check


def _str(*, empty: bool = True, limit: int = 100_000) -> Checker:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise _Bad(f"must be a string, got {_show(value)}")
        if not empty and not value.strip():
            raise _Bad("must be a non-empty string")
        if len(value) > limit:
            raise _Bad(f"is {len(value)} characters long, more than {limit}")
        return value

    return check


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"must be a path (a non-empty string), got {_show(value)}")
    if "\0" in value or len(value) > 4096:
        raise _Bad("is not a usable path (NUL character, or longer than 4096 characters)")
    return value


def _paths(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or len(items) > MAX_LIST:
        raise _Bad(f"must be a path or a non-empty list of paths, got {_show(value)}")
    return [_path(item) for item in items]


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"must be true or false, got {_show(value)}")
    return value


def _dtype(value: Any) -> str:
    if not isinstance(value, str) or value.strip().lower().removeprefix("torch.") not in _DTYPES:
        raise _Bad(f"must be one of {', '.join(_DTYPES)}, got {_show(value)}")
    return value.strip().lower().removeprefix("torch.")


def _scheduler(value: Any) -> str:
    if not isinstance(value, str) or not _SCHEDULER_NAME.fullmatch(value):
        raise _Bad(f"must be a scheduler name such as 'flux2' or 'static', got {_show(value)}")
    return value


def _inputs(value: Any) -> list[dict[str, Any]]:
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list) or len(items) > MAX_LIST or not all(isinstance(i, dict) for i in items):
        raise _Bad(f"must be an object or a list of objects (template inputs), got {_show(value)}")
    return [dict(item) for item in items]


def _loras(value: Any) -> list[dict[str, Any]]:
    items = [value] if isinstance(value, (str, dict)) else value
    if not isinstance(items, list) or len(items) > MAX_LIST:
        raise _Bad(
            f'must be a list of "FILE[:SCALE]" strings or {{"path": ..., "scale": ...}} objects, got {_show(value)}'
        )
    loras = []
    for item in items:
        if isinstance(item, str):
            path, scale = parse_lora(item)
        elif isinstance(item, dict) and set(item) <= {"path", "scale", "name"} and "path" in item:
            path = _path(item["path"])
            scale = _float(-100.0, 100.0)(item.get("scale", 1.0))
        else:
            raise _Bad(f'entries must be "FILE[:SCALE]" or {{"path": FILE, "scale": NUMBER}}, got {_show(item)}')
        loras.append({"path": path, "scale": scale})
    return loras


def _sigmas(value: Any) -> list[float]:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_STEPS:
        raise _Bad(f"must be a non-empty list of numbers in (0, 1], got {_show(value)}")
    return [_float(0.0, 1.0, low_open=True)(item) for item in value]


def _step_cache(value: Any) -> str:
    from diffstudio.cache.errors import StepCacheError
    from diffstudio.cache.spec import parse_cache_spec

    try:
        spec = parse_cache_spec(value, "cache")
    except StepCacheError as exc:
        raise _Bad(str(exc).removeprefix(f"cache {value!r}: ")) from None
    return "off" if spec is None else str(spec)


def _hashes(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or len(value) > MAX_LIST:
        raise _Bad(f"must be an object mapping file paths to SHA-256 hex digests, got {_show(value)}")
    for key, digest in value.items():
        _path(key)
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise _Bad(f"entry {key!r} is not a SHA-256 hex digest (64 lowercase hex digits): {_show(digest)}")
    return dict(value)


def parse_lora(text: str) -> tuple[str, float]:
    r"""Split ``"FILE[:SCALE]"`` (the ``--lora`` syntax); the scale defaults to 1.

    A trailing ``:NUMBER`` is the scale; any other colon belongs to the path (``C:\x.safetensors``).

    Raises:
        _Bad: the path is empty or the scale is not a finite number in [-100, 100].
    """
    path, sep, tail = text.rpartition(":")
    if sep and path and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", tail.strip()):
        return _path(path), _float(-100.0, 100.0)(float(tail))
    return _path(text), 1.0


#: Every job field: ``name -> (checker, what it is)``. Pipeline arguments keep the pipelines' names.
FIELDS: dict[str, tuple[Checker, str]] = {
    "prompt": (_str(empty=False), "the prompt (required)"),
    "negative_prompt": (_str(), "negative prompt (used when cfg_scale > 1)"),
    "seed": (_int(0, 2**63 - 1 - MAX_NUM_IMAGES), "seed of the first image (image i uses seed + i)"),
    "num_images": (_int(1, MAX_NUM_IMAGES), "images for this prompt"),
    "output": (_path, "file name in the output folder (default: index, prompt, seed and job hash)"),
    "model": (_paths, "model file(s), folder, glob or model id"),
    "tokenizer": (_paths, "tokenizer folder(s)"),
    "loras": (_loras, 'LoRAs: "FILE[:SCALE]" or {"path": FILE, "scale": NUMBER}'),
    "templates": (_paths, "Diffusion Templates: installed names or folders"),
    "template_inputs": (_inputs, "template inputs (objects)"),
    "negative_template_inputs": (_inputs, "template inputs for the negative CFG branch"),
    "num_inference_steps": (_int(1, MAX_STEPS), "denoising steps"),
    "cfg_scale": (_float(0.0, 100.0), "classifier-free guidance scale"),
    "embedded_guidance": (_float(0.0, 100.0), "distilled guidance (FLUX dev / Kontext)"),
    "height": (_int(1, MAX_SIDE), "image height in pixels"),
    "width": (_int(1, MAX_SIDE), "image width in pixels"),
    "denoising_strength": (_float(0.0, 1.0, low_open=True), "image-to-image strength in (0, 1]"),
    "input_image": (_path, "image-to-image / inpainting source image"),
    "inpaint_mask": (_path, "inpainting mask (white = repaint)"),
    "edit_image": (_paths, "edit / Kontext / reference image(s)"),
    "scheduler": (_scheduler, "noise schedule name (flux1, flux2, static, ...)"),
    "shift": (_float(0.0, 100.0, low_open=True), "shift of the noise schedule"),
    "max_sequence_length": (_int(1, 4096), "text tokens (FLUX.2)"),
    "t5_sequence_length": (_int(1, 4096), "T5 tokens (FLUX.1)"),
    "sigmas": (_sigmas, "explicit schedule: unshifted sigmas"),
    "dtype": (_dtype, "computation dtype"),
    "fp8": (_bool, "store weights in float8"),
    "sha256": (_hashes, "expected SHA-256 of files (a warning when a file differs)"),
    "step_cache": (_step_cache, "step cache KIND:THRESHOLD: teacache:0.4 or fbcache:0.1 (diffstudio.cache)"),
}
#: Short names accepted for fields.
ALIASES: dict[str, str] = {
    "steps": "num_inference_steps",
    "cfg": "cfg_scale",
    "negative": "negative_prompt",
    "guidance": "embedded_guidance",
    "image": "input_image",
    "mask": "inpaint_mask",
    "strength": "denoising_strength",
    "edit_images": "edit_image",
    "reference_images": "edit_image",
    "kontext_images": "edit_image",
    "lora": "loras",
    "template": "templates",
    "cache": "step_cache",
}
#: Fields naming files, resolved against the job file's folder.
PATH_FIELDS = ("model", "tokenizer", "templates", "input_image", "inpaint_mask", "edit_image")
#: Fields that are pipeline call arguments, passed as they are.
CALL_FIELDS = (
    "negative_prompt", "num_inference_steps", "cfg_scale", "embedded_guidance", "height", "width",
    "denoising_strength", "max_sequence_length", "t5_sequence_length", "sigmas", "step_cache",
)  # fmt: skip


def _show(value: Any) -> str:
    text = f"{type(value).__name__} {value!r}" if isinstance(value, (bool, float)) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class Job:
    """One prompt to render, with its options.

    Attributes:
        prompt: The prompt.
        seed: Seed of the first image (image i uses ``seed + i``); defaults to the job's index.
        num_images: Images for this prompt.
        output: File name relative to the output folder, or None for the default name.
        fields: Every other validated field, under its canonical name (see :data:`FIELDS`).
        index: The job's index in its file or list.
        line: Its line in a JSON-lines file (1-based), when known.
        source: The job file, when the job comes from one.
    """

    prompt: str
    seed: int
    num_images: int = 1
    output: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    index: int = 0
    line: int | None = None
    source: str | None = None

    @property
    def where(self) -> str:
        """``file:line: job N`` for messages."""
        return _where(self.source, self.line, self.index)

    @property
    def seeds(self) -> list[int]:
        """The seed of each image."""
        return [self.seed + i for i in range(self.num_images)]

    def call_options(self) -> dict[str, Any]:
        """The pipeline call arguments this job sets."""
        return {k: v for k, v in self.fields.items() if k in CALL_FIELDS}


def check_field(name: str, value: Any, label: str | None = None) -> Any:
    """Check one value with the rules of job field ``name``; return it canonical.

    Raises:
        JobFieldError: Wrong type or range; the message starts with ``label`` (default: the field name).
    """
    checker, _ = FIELDS[name]
    try:
        return checker(value)
    except _Bad as bad:
        raise JobFieldError(f"{label or name}: {bad}", job=0, line=None, field=name) from None


def _where(source: str | None, line: int | None, index: int) -> str:
    if source and line:
        return f"{source}:{line}: job {index}"
    return f"{source}: job {index}" if source else f"job {index}"


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _anchor(value: str, base: Path | None) -> str:
    """``base / value`` when ``value`` is relative and that file exists, else ``value``."""
    if base is None or os.path.isabs(value) or PureWindowsPath(value).drive:
        return value
    candidate = base / value
    return str(candidate) if _exists(candidate) else value


def validate_row(
    row: Any, index: int, *, source: str | None = None, line: int | None = None, base: Path | None = None
) -> Job:
    """Check one job row and return the job (see the module docstring for the rules).

    Args:
        row: The parsed JSON value (must be an object; a PNG record is converted with :func:`row_from_record`).
        index: The job's index (its default seed).
        source: The job file, for messages.
        line: The row's line in a JSON-lines file.
        base: Folder that relative paths are tried against (the job file's folder).

    Raises:
        JobFieldError: A field is unknown, given twice, of the wrong type or out of range.
    """
    where = _where(source, line, index)

    def fail(name: str, message: str) -> JobFieldError:
        return JobFieldError(f"{where}: {message}", job=index, line=line, field=name)

    if not isinstance(row, dict):
        raise fail("", f'is a JSON {type(row).__name__}, expected an object with a "prompt"')
    if row.get("format") == RECORD_FORMAT:
        row = row_from_record(row, where=where)
    values: dict[str, Any] = {}
    written: dict[str, str] = {}
    for key, value in row.items():
        name = ALIASES.get(key, key) if isinstance(key, str) else key
        if name not in FIELDS:
            known = ", ".join(sorted(FIELDS)) + "; short names: " + ", ".join(f"{a}={c}" for a, c in ALIASES.items())
            raise fail(str(key), f"unknown field {key!r}. Known fields: {known}")
        if name in written:
            raise fail(key, f"{key!r} and {written[name]!r} name the same field; give it once")
        written[name] = key
        checker, _ = FIELDS[name]
        try:
            values[name] = checker(value)
        except _Bad as bad:
            raise fail(key, f"{key!r} {bad}") from None
    if "prompt" not in values:
        raise fail("prompt", 'has no "prompt" (a non-empty string)')
    output = values.pop("output", None)
    if output is not None:
        try:
            check_output_name(output)
        except OutputPathError as exc:
            raise JobFieldError(f"{where}: {exc}", job=index, line=line, field=written["output"]) from None
    for name in PATH_FIELDS:
        if name in values:
            value = values[name]
            values[name] = [_anchor(v, base) for v in value] if isinstance(value, list) else _anchor(value, base)
    if "loras" in values:
        values["loras"] = [{**lora, "path": _anchor(lora["path"], base)} for lora in values["loras"]]
    num_images = values.pop("num_images", 1)
    seed = values.pop("seed", index)
    if seed + num_images - 1 > 2**63 - 1:
        raise fail("seed", f"seed {seed} + num_images {num_images} exceeds the largest seed 2**63 - 1")
    prompt = values.pop("prompt")
    return Job(prompt=prompt, seed=seed, num_images=num_images, output=output, fields=values, index=index,
               line=line, source=source)  # fmt: skip


def check_output_name(name: str) -> None:
    """Refuse output names that are absolute, contain ``..`` or are not image files.

    Raises:
        OutputPathError: The name says why.
    """
    posix, windows = PurePosixPath(name.replace("\\", "/")), PureWindowsPath(name)
    if posix.is_absolute() or windows.drive or windows.root:
        raise OutputPathError(f"output {name!r} is an absolute path; give a file name relative to --out")
    if ".." in posix.parts:
        raise OutputPathError(f"output {name!r} contains '..'; outputs stay inside the --out folder")
    if any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in posix.parts) or not posix.parts:
        raise OutputPathError(f"output {name!r} is not a usable file name (empty, or a part longer than 255 bytes)")
    if posix.suffix.lower() not in IMAGE_SUFFIXES:
        raise OutputPathError(f"output {name!r} is not an image file name; use one of {', '.join(IMAGE_SUFFIXES)}")


def contained(folder: Path, name: str) -> Path:
    """Return ``folder / name`` after checking that it stays inside ``folder``, symbolic links resolved.

    Raises:
        OutputPathError: The name is refused by :func:`check_output_name`, or a link leads outside ``folder``.
    """
    check_output_name(name)
    target = folder / name
    root = os.path.realpath(folder)
    real = os.path.realpath(target)
    if os.path.commonpath([root, real]) != root or real == root:
        raise OutputPathError(
            f"output {name!r} resolves to {real}, outside the output folder {root} (through a symbolic link); "
            f"outputs are only written inside --out"
        )
    return target


# ----------------------------------------------------------------------------------------------------------
# job files and records
# ----------------------------------------------------------------------------------------------------------


def load_jobs(path: str | os.PathLike[str]) -> list[Job]:
    """Read and validate a job file: a JSON list of objects, or JSON lines (PNG records included).

    Raises:
        JobFileError: The file cannot be read, is too large, is not JSON, or holds no job.
        JobFieldError: A row is invalid (names the line, the job and the field).
    """
    file = Path(path)
    try:
        size = file.stat().st_size
        if size > MAX_JOB_FILE_BYTES:
            raise JobFileError(f"the job file {file} is {size} bytes, more than {MAX_JOB_FILE_BYTES}; split it")
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JobFileError(f"cannot read the job file {file}: {exc}") from None
    base = file.resolve().parent
    jobs: list[Job] = []
    if text.lstrip().startswith("["):
        rows = _json(text, f"{file}")
        if not isinstance(rows, list):
            raise JobFileError(f"{file} is not a JSON list of job objects")
        jobs = [validate_row(row, i, source=str(file), base=base) for i, row in enumerate(rows)]
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                row = _json(line, f"{file}:{number}")
                jobs.append(validate_row(row, len(jobs), source=str(file), line=number, base=base))
    if not jobs:
        raise JobFileError(f"{file} holds no jobs (a JSON list of objects, or one JSON object per line)")
    return jobs


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise JobFileError(f"{where}: the JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and ints longer than Python's digit limit
        raise JobFileError(f"{where}: not valid JSON (a JSON list of objects, or one object per line): {exc}") from None


def row_from_record(record: Mapping[str, Any], *, where: str = "record") -> dict[str, Any]:
    """Turn a PNG's JSON record (see :mod:`diffstudio.outputs`) into the job row that made the image.

    Records carry the job under ``"job"``; older ones are rebuilt from their top-level fields.

    Raises:
        JobFileError: The record is not a diffstudio generation record.
    """
    if record.get("format") != RECORD_FORMAT:
        raise JobFileError(f"{where}: not a diffstudio generation record (format {record.get('format')!r})")
    job = record.get("job")
    if isinstance(job, dict):
        return {k: v for k, v in job.items() if k != "format"}
    row: dict[str, Any] = {}
    for key, name in (("prompt", "prompt"), ("negative_prompt", "negative_prompt"), ("seed", "seed"),
                      ("steps", "num_inference_steps"), ("cfg_scale", "cfg_scale"), ("width", "width"),
                      ("height", "height"), ("embedded_guidance", "embedded_guidance")):  # fmt: skip
        if record.get(key) is not None:
            row[name] = record[key]
    model = record.get("model")
    files = model.get("files") if isinstance(model, dict) else None
    if isinstance(files, list) and files and all(isinstance(f, dict) and isinstance(f.get("path"), str) for f in files):
        row["model"] = [f["path"] for f in files]
        row["sha256"] = {f["path"]: f["sha256"] for f in files if isinstance(f.get("sha256"), str)}
    templates = record.get("templates")
    if isinstance(templates, list) and templates:
        row["templates"] = [t.get("name") for t in templates if isinstance(t, dict)]
    extra = record.get("extra")
    arguments = extra.get("arguments") if isinstance(extra, dict) else None
    if isinstance(arguments, dict):
        row.update({k: v for k, v in arguments.items() if k in FIELDS and k not in row})
    return row


def rows_from_images(paths: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """The job rows recorded in PNG files (``diffstudio run --from``).

    Raises:
        JobFileError: A file cannot be read as an image or holds no diffstudio record.
    """
    from diffstudio.outputs import read_image_metadata

    rows = []
    for path in paths:
        try:
            _, record = read_image_metadata(path)
        except Exception as exc:  # PIL: OSError, UnidentifiedImageError, DecompressionBombError, SyntaxError
            raise JobFileError(f"--from {path}: cannot read the image: {type(exc).__name__}: {exc}") from None
        if record is None:
            raise JobFileError(
                f"--from {path}: the image holds no diffstudio record (it was written with --no-metadata, by "
                f"another tool, or re-saved by an editor that dropped the PNG text chunks)"
            )
        rows.append(row_from_record(record, where=f"--from {path}"))
    return rows
