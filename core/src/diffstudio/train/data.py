"""Training data: the metadata file (CSV, JSON, JSONL), its validation, image loading and size buckets.

A data set is a folder (``--dataset_base_path``) and a metadata file (``--dataset_metadata_path``) with one row
per sample: a ``prompt`` column, the file columns named by ``--data_file_keys`` (paths relative to the base
folder) and any columns named by ``--extra_inputs`` (passed to the pipeline as they are). Every row is checked
before training starts: a missing or unreadable image, an unknown column or an empty set stops with a message
naming the row and the column.

File paths must stay inside the data set folder: a path with ``..``, an absolute path or a symbolic link that
resolves outside ``--dataset_base_path`` is refused (a data set from elsewhere could otherwise have the trainer
read any image on the machine), unless ``--allow_outside_dataset`` is given. Images larger than PIL's
decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, 89,478,485 pixels by default; set it from Python to
change it, ``None`` to remove it) are refused before they are decoded.

Images are resized to ``--height`` x ``--width`` (scaled to cover, then centre-cropped), or, without a fixed
size, scaled down to at most ``--max_pixels`` pixels and cropped to multiples of 16. Samples are grouped by
their final size so that a batch always shares one size (aspect-ratio buckets).
"""

from __future__ import annotations

import csv
import json
import math
import random
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from diffstudio.errors import ConfigError


class DatasetError(ConfigError):
    """The training data set is missing, empty or has an invalid row."""


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Sample:
    """One validated row.

    Attributes:
        index: Row number in the metadata file (0-based).
        prompt: The caption.
        files: File column -> absolute path.
        extra: Extra-input column -> value (passed to the pipeline unchanged).
        size: ``(height, width)`` the images are resized to.
    """

    index: int
    prompt: str
    files: Mapping[str, Path]
    extra: Mapping[str, Any]
    size: tuple[int, int]


def read_metadata(path: str | Path) -> list[dict[str, Any]]:
    """Read a CSV (header row), JSON (a list of objects) or JSONL metadata file.

    Raises:
        DatasetError: unreadable file, unknown extension or rows that are not objects.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"--dataset_metadata_path {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as handle:
                rows: list[Any] = list(csv.DictReader(handle))
        elif suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
        elif suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            raise DatasetError(f"{path}: metadata must be .csv, .json or .jsonl, not {suffix or 'no extension'}")
    except (ValueError, RecursionError, csv.Error) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise DatasetError(f"{path} cannot be parsed: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        raise DatasetError(f"{path} cannot be read: {exc}") from exc
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DatasetError(f"{path} must hold a list of objects (one per sample)")
    return rows


def target_size(
    width: int, height: int, *, fixed: tuple[int | None, int | None], max_pixels: int, multiple: int = 16
) -> tuple[int, int]:
    """``(height, width)`` an image of ``width x height`` is trained at.

    With a fixed ``(height, width)`` that size; otherwise the image scaled down (never up) to at most
    ``max_pixels`` pixels, both sides floored to ``multiple``.
    """
    fixed_h, fixed_w = fixed
    if fixed_h is not None and fixed_w is not None:
        return fixed_h, fixed_w
    scale = min(1.0, math.sqrt(max_pixels / float(width * height)))
    h = max(multiple, int(height * scale) // multiple * multiple)
    w = max(multiple, int(width * scale) // multiple * multiple)
    return h, w


@contextmanager
def open_image(path: Path, where: str = "") -> Iterator[Image.Image]:
    """``Image.open(path)``, refusing images over PIL's decompression-bomb limit before they are decoded.

    Raises:
        DatasetError: the image has more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels, or cannot be opened.
    """
    prefix = f"{where} " if where else ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, as an error
            opened = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"{prefix}{path} is too large to decode safely ({exc}); downscale it") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise DatasetError(f"{prefix}{path} is not a readable image ({type(exc).__name__}: {exc})") from exc
    with opened:
        limit, (width, height) = Image.MAX_IMAGE_PIXELS, opened.size
        if limit is not None and width * height > limit:
            raise DatasetError(
                f"{prefix}{path} is {width} x {height} = {width * height} pixels, over PIL's decompression-bomb "
                f"limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS); downscale it"
            )
        if width < 1 or height < 1:
            raise DatasetError(f"{prefix}{path} is {width} x {height} pixels; an image needs at least one")
        yield opened


def load_image(path: Path, size: tuple[int, int]) -> Image.Image:
    """Open ``path`` as RGB, scale it to cover ``(height, width)`` and centre-crop to exactly that size."""
    height, width = size
    with open_image(path) as opened:
        try:
            image = opened.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
            raise DatasetError(f"{path} is not a readable image ({type(exc).__name__}: {exc})") from exc
    scale = max(width / image.width, height / image.height)
    if image.size != (width, height):
        resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        if resized != image.size:
            image = image.resize(resized, Image.Resampling.LANCZOS)
        left, top = (image.width - width) // 2, (image.height - height) // 2
        image = image.crop((left, top, left + width, top + height))
    return image


class TrainingDataset:
    """The validated rows of a metadata file, repeated ``dataset_repeat`` times.

    Args:
        base_path: Folder the file columns are relative to.
        metadata_path: CSV / JSON / JSONL file.
        data_file_keys: Columns holding image paths (``image`` by default).
        extra_inputs: Further columns passed to the pipeline unchanged.
        height: Fixed training height (with ``width``), or None for ``max_pixels`` sizing.
        width: Fixed training width.
        max_pixels: Pixel budget when no fixed size is given.
        repeat: How many times the rows are repeated per epoch.
        multiple: Height and width are multiples of this.
        allow_outside: Accept file paths that resolve outside ``base_path`` (``--allow_outside_dataset``).

    Raises:
        DatasetError: see :func:`validate`.
    """

    def __init__(
        self,
        base_path: str | Path,
        metadata_path: str | Path,
        *,
        data_file_keys: Sequence[str] = ("image",),
        extra_inputs: Sequence[str] = (),
        height: int | None = None,
        width: int | None = None,
        max_pixels: int = 1024 * 1024,
        repeat: int = 1,
        multiple: int = 16,
        allow_outside: bool = False,
    ) -> None:
        if (height is None) != (width is None):
            raise DatasetError("give both --height and --width, or neither (then --max_pixels decides)")
        for name, value in (("--height", height), ("--width", width)):
            if value is not None and (value <= 0 or value % multiple):
                raise DatasetError(f"{name}={value} is not a positive multiple of {multiple}")
        if repeat < 1:
            raise DatasetError(f"--dataset_repeat must be >= 1, got {repeat}")
        self.base_path = Path(base_path)
        self.metadata_path = Path(metadata_path)
        self.data_file_keys = tuple(data_file_keys)
        self.extra_inputs = tuple(extra_inputs)
        self.fixed = (height, width)
        self.max_pixels = max_pixels
        self.multiple = multiple
        self.repeat = repeat
        self.allow_outside = allow_outside
        self.rows = self.validate(read_metadata(self.metadata_path))

    def validate(self, rows: list[dict[str, Any]]) -> list[Sample]:
        """Check every row before training: columns, prompt, file presence and readability."""
        where = str(self.metadata_path)
        if not rows:
            raise DatasetError(f"{where} holds no samples; the data set is empty")
        allowed = {"prompt", *self.data_file_keys, *self.extra_inputs}
        samples = []
        for index, row in enumerate(rows):
            if None in row:  # csv.DictReader's key for cells beyond the header
                raise DatasetError(f"{where} row {index}: more cells than the header has columns")
            unknown = sorted(set(row) - allowed)
            if unknown:
                raise DatasetError(
                    f"{where} row {index}: unknown column(s) {unknown}. Known: prompt, file columns "
                    f"{list(self.data_file_keys)} (--data_file_keys), extra inputs {list(self.extra_inputs)} "
                    f"(--extra_inputs); add the column to one of those or remove it."
                )
            prompt = row.get("prompt")
            if not isinstance(prompt, str):
                raise DatasetError(f"{where} row {index}: the 'prompt' column is missing or not text")
            files: dict[str, Path] = {}
            size: tuple[int, int] | None = None
            for key in self.data_file_keys:
                value = row.get(key)
                if value in (None, ""):
                    raise DatasetError(f"{where} row {index}: column {key!r} is empty")
                path = data_file(self.base_path, value, f"{where} row {index}: {key}", self.allow_outside)
                try:
                    with open_image(path, f"{where} row {index}: {key} file") as image:
                        image.verify()
                    with open_image(path, f"{where} row {index}: {key} file") as image:
                        dims = image.size
                except DatasetError:
                    raise
                except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
                    raise DatasetError(
                        f"{where} row {index}: {key} file {path} is not a readable image ({type(exc).__name__}: {exc})"
                    ) from exc
                files[key] = path
                if size is None:
                    size = target_size(*dims, fixed=self.fixed, max_pixels=self.max_pixels, multiple=self.multiple)
            if size is None:
                fixed_h, fixed_w = self.fixed
                size = (fixed_h or 1024, fixed_w or 1024)
            extra = {key: _decode(row[key]) for key in self.extra_inputs if key in row}
            samples.append(Sample(index, prompt, files, extra, size))
        return samples

    def __len__(self) -> int:
        return len(self.rows) * self.repeat

    def sample(self, position: int) -> Sample:
        """The sample at ``position`` of the repeated list."""
        return self.rows[position % len(self.rows)]

    def load(self, position: int, *, with_files: bool = True) -> dict[str, Any]:
        """Pipeline inputs of one sample: ``prompt``, one PIL image per file column, the extra inputs.

        ``with_files=False`` leaves the images out (split training's second stage has their latents).
        """
        sample = self.sample(position)
        inputs: dict[str, Any] = {"prompt": sample.prompt, "height": sample.size[0], "width": sample.size[1]}
        for key, path in sample.files.items() if with_files else ():
            inputs[key] = load_image(path, sample.size)
        inputs.update(sample.extra)
        return inputs


def data_file(base: Path, value: Any, where: str, allow_outside: bool = False) -> Path:
    """The file a metadata cell names, checked: text, an existing file, inside ``base`` (unless allowed).

    Args:
        base: ``--dataset_base_path``.
        value: The cell (a path relative to ``base``).
        where: The metadata file, row and column, for messages.
        allow_outside: Accept paths that resolve outside ``base`` (``--allow_outside_dataset``).

    Raises:
        DatasetError: not text, a NUL character, outside ``base``, unresolvable, or not a file.
    """
    if not isinstance(value, str):
        raise DatasetError(f"{where}: a file path must be text, got {type(value).__name__} {value!r}")
    if "\x00" in value:
        raise DatasetError(f"{where}: the path {value!r} contains a NUL character")
    path = base / value
    try:
        if not allow_outside:
            root, real = base.resolve(), path.resolve()
            if not real.is_relative_to(root):
                raise DatasetError(
                    f"{where}: {value!r} resolves to {real}, outside --dataset_base_path {root}; move the file into "
                    "the data set folder, or pass --allow_outside_dataset to train on files elsewhere"
                )
        exists = path.is_file()
    except (OSError, RuntimeError) as exc:  # too long a name, a symbolic-link loop
        raise DatasetError(f"{where}: {value!r} cannot be resolved ({type(exc).__name__}: {exc})") from exc
    if not exists:
        raise DatasetError(f"{where} file {path} does not exist")
    return path


def _decode(value: Any) -> Any:
    """CSV cells holding JSON (objects, lists) are decoded; other values are kept."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def epoch_batches(dataset: TrainingDataset, epoch: int, seed: int, batch_size: int) -> list[list[int]]:
    """The batches of one epoch: a seeded shuffle, grouped by training size, each batch one size.

    Depends only on ``(seed, epoch)`` and the data, so a resumed run and every process see the same order.
    """
    order = list(range(len(dataset)))
    random.Random(f"diffstudio-train/{seed}/{epoch}").shuffle(order)
    buckets: dict[tuple[int, int], list[int]] = {}
    batches: list[list[int]] = []
    for position in order:
        bucket = buckets.setdefault(dataset.sample(position).size, [])
        bucket.append(position)
        if len(bucket) == batch_size:
            batches.append(list(bucket))
            bucket.clear()
    batches.extend(b for b in buckets.values() if b)
    return batches
