"""Strict reading and validation of safetensors headers (no torch, no tensor data).

A safetensors file is laid out as::

    [8 bytes: N, little-endian u64][N bytes: UTF-8 JSON object][data buffer]

The JSON maps tensor names to ``{"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]}`` (offsets
relative to the start of the data buffer) plus an optional ``"__metadata__": {str: str}`` entry.

:func:`read_header` checks everything the reference loader checks: header size limits, UTF-8, JSON, metadata
types, known dtypes, offsets that tile the buffer from 0 with no gap or overlap, tensor byte sizes that match
``prod(shape) * itemsize``, and a buffer that is covered exactly (no trailing bytes). It reads at most the
``N`` header bytes, and only after checking ``N`` against the file size, so a lying header can neither hang
the reader nor make it allocate much memory. Every violation is a subclass of
:class:`~diffstudio.errors.SafetensorsFormatError` whose message names the file, the tensor and the problem.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffstudio.errors import SafetensorsFormatError

__all__ = [
    "DTYPE_BITS",
    "MAX_HEADER_SIZE",
    "HeaderEncodingError",
    "HeaderJsonError",
    "HeaderLengthError",
    "HeaderTooLargeError",
    "HeaderTooSmallError",
    "IncompleteBufferError",
    "InvalidMetadataError",
    "InvalidOffsetError",
    "InvalidTensorInfoError",
    "SafetensorsHeader",
    "TensorInfo",
    "TensorSizeError",
    "ValidationOverflowError",
    "read_header",
]

MAX_HEADER_SIZE = 100_000_000
"""Largest JSON header accepted, in bytes (the reference loader's limit)."""

_MAX_BYTES = 2**64 - 1  # offsets and sizes are u64 in the reference implementation

DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
"""Bits per element of every safetensors dtype string this reader accepts."""

_ADVICE = "The file is probably truncated or corrupt; delete it and download (or export) it again."


class _HeaderError(SafetensorsFormatError):
    """Base of the header errors: formats ``path``, ``tensor`` and the problem into one message.

    Attributes:
        path: The file that failed validation.
        tensor: The tensor entry at fault, or None when the problem is not about one tensor.
    """

    def __init__(self, path: Path, problem: str, tensor: str | None = None) -> None:
        where = f" (tensor {tensor!r})" if tensor is not None else ""
        super().__init__(f"Invalid safetensors file {path}{where}: {problem}. {_ADVICE}")
        self.path = path
        self.tensor = tensor


class HeaderTooSmallError(_HeaderError):
    """The file is shorter than the 8-byte header length prefix."""


class HeaderTooLargeError(_HeaderError):
    """The header length prefix exceeds :data:`MAX_HEADER_SIZE`."""


class HeaderLengthError(_HeaderError):
    """The header length prefix points past the end of the file."""


class HeaderEncodingError(_HeaderError):
    """The header bytes are not valid UTF-8."""


class HeaderJsonError(_HeaderError):
    """The header is not a JSON object (or has duplicate keys / non-finite constants)."""


class InvalidMetadataError(_HeaderError):
    """``__metadata__`` is not a mapping of strings to strings."""


class InvalidTensorInfoError(_HeaderError):
    """A tensor entry lacks a field or has one of the wrong type (dtype, shape, data_offsets)."""


class InvalidOffsetError(_HeaderError):
    """Tensor data offsets leave a gap, overlap, or run backwards."""


class TensorSizeError(_HeaderError):
    """A tensor's byte range does not match ``prod(shape) * itemsize`` (or is not whole bytes)."""


class ValidationOverflowError(_HeaderError):
    """Shape, offset or size arithmetic exceeds 64 bits."""


class IncompleteBufferError(_HeaderError):
    """The tensors do not cover the data buffer exactly (missing or trailing bytes)."""


@dataclass(frozen=True)
class TensorInfo:
    """One validated tensor entry.

    Attributes:
        name: Tensor name in the file.
        dtype: Safetensors dtype string, e.g. ``"BF16"``.
        shape: Dimensions; ``()`` for a scalar.
        begin: Start of the tensor's bytes, relative to the data buffer.
        end: End (exclusive) of the tensor's bytes, relative to the data buffer.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.begin

    @property
    def numel(self) -> int:
        """Number of elements (``prod(shape)``, 1 for a scalar)."""
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclass(frozen=True)
class SafetensorsHeader:
    """The validated header of one safetensors file.

    Attributes:
        path: The file.
        file_size: Size of the file in bytes when it was validated.
        header_size: ``N``, the length of the JSON header in bytes.
        tensors: Tensor entries by name, in file order (sorted by data offset).
        metadata: The ``__metadata__`` entry (empty when absent).
    """

    path: Path
    file_size: int
    header_size: int
    tensors: dict[str, TensorInfo] = field(repr=False)
    metadata: dict[str, str]

    @property
    def data_start(self) -> int:
        """Absolute file offset of the data buffer (``8 + N``)."""
        return 8 + self.header_size


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r} in the JSON header")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _is_u64(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_BYTES


def _parse_json(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderEncodingError(path, f"the {len(raw)}-byte header is not valid UTF-8 ({exc.reason})") from None
    if not text.startswith("{"):
        raise HeaderJsonError(path, f"the header does not start with '{{' (starts with {text[:16]!r})")
    try:
        parsed = json.loads(text, object_pairs_hook=_object_pairs, parse_constant=_reject_constant)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError, as are the hooks' errors
        raise HeaderJsonError(path, f"the header is not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise HeaderJsonError(path, f"the header is JSON but not an object (it is a {type(parsed).__name__})")
    return parsed


def _parse_metadata(path: Path, value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidMetadataError(path, f"__metadata__ must be an object of strings, got {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise InvalidMetadataError(
                path, f"__metadata__[{key!r}] must be a string, got {type(item).__name__} {item!r:.60}"
            )
    return dict(value)


def _parse_entry(path: Path, name: str, value: object) -> TensorInfo:
    if not isinstance(value, dict):
        raise InvalidTensorInfoError(path, f"the entry must be an object, got {type(value).__name__}", name)
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in value]
    if missing:
        raise InvalidTensorInfoError(path, f"the entry lacks {', '.join(missing)}", name)
    dtype = value["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        known = ", ".join(DTYPE_BITS)
        raise InvalidTensorInfoError(path, f"unknown dtype {dtype!r} (known: {known})", name)
    shape = value["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidTensorInfoError(path, f"shape must be a list of integers, got {shape!r:.80}", name)
    if any(d < 0 for d in shape):
        raise InvalidTensorInfoError(path, f"shape {shape} has a negative dimension", name)
    if any(d > _MAX_BYTES for d in shape):
        raise ValidationOverflowError(path, f"shape {shape} has a dimension beyond 64 bits", name)
    offsets = value["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        raise InvalidTensorInfoError(
            path, f"data_offsets must be two non-negative 64-bit integers, got {offsets!r:.80}", name
        )
    return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])


def _checked_bits(shape: tuple[int, ...], bits_per_element: int) -> int | None:
    """Return ``prod(shape) * bits_per_element``, or None when it exceeds 64-bit byte arithmetic.

    Stops multiplying as soon as the limit is passed, so a hostile shape cannot make it slow.
    """
    if 0 in shape:
        return 0
    total = bits_per_element
    for dim in shape:
        total *= dim
        if total > _MAX_BYTES * 8:
            return None
    return total


def _check_layout(path: Path, tensors: list[TensorInfo], buffer_size: int) -> None:
    """Check that ``tensors`` (sorted by offset) tile ``[0, buffer_size)`` exactly, with the right sizes."""
    position = 0
    for info in tensors:
        if info.begin != position or info.end < info.begin:
            if info.begin > position:
                problem = f"gap: its data starts at byte {info.begin} but the previous tensor ends at {position}"
            elif info.begin < position:
                problem = f"overlap: its data starts at byte {info.begin}, before the previous end {position}"
            else:
                problem = f"data_offsets [{info.begin}, {info.end}] run backwards"
            raise InvalidOffsetError(path, problem, info.name)
        bits = _checked_bits(info.shape, DTYPE_BITS[info.dtype])
        if bits is None:
            raise ValidationOverflowError(path, f"shape {list(info.shape)} x {info.dtype} overflows 64 bits", info.name)
        if bits % 8:
            raise TensorSizeError(
                path,
                f"shape {list(info.shape)} of {info.dtype} is {bits} bits, not a whole number of bytes",
                info.name,
            )
        if info.nbytes != bits // 8:
            raise TensorSizeError(
                path,
                f"data_offsets [{info.begin}, {info.end}] hold {info.nbytes} bytes but shape "
                f"{list(info.shape)} "
                f"of {info.dtype} needs {bits // 8}",
                info.name,
            )
        position = info.end
    if position != buffer_size:
        if position < buffer_size:
            problem = f"the tensors cover {position} bytes but the data buffer has {buffer_size} (trailing bytes)"
        else:
            problem = f"the tensors need {position} bytes but the data buffer has only {buffer_size}"
        last = tensors[-1].name if tensors else None
        raise IncompleteBufferError(path, problem, last)


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file.

    Args:
        path: The file to read.

    Returns:
        The validated header; no tensor data is read.

    Raises:
        SafetensorsFormatError: a subclass naming the file, the tensor and the problem.
        OSError: the file cannot be opened or read.
    """
    file = Path(path)
    with open(file, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < 8:
            raise HeaderTooSmallError(file, f"it is {size} bytes long, shorter than the 8-byte header length")
        header_size = int.from_bytes(handle.read(8), "little")
        if header_size > MAX_HEADER_SIZE:
            raise HeaderTooLargeError(
                file,
                f"the header length prefix says {header_size} bytes, more than the {MAX_HEADER_SIZE} allowed",
            )
        if header_size + 8 > size:
            raise HeaderLengthError(
                file,
                f"the header length prefix says {header_size} bytes but the file has only {size - 8} after it",
            )
        raw = handle.read(header_size)
    if len(raw) != header_size:  # the file shrank while we read it
        raise HeaderLengthError(file, f"only {len(raw)} of the {header_size} header bytes could be read")
    parsed = _parse_json(file, raw)
    metadata = _parse_metadata(file, parsed.pop("__metadata__", None))
    entries = [_parse_entry(file, name, value) for name, value in parsed.items()]
    entries.sort(key=lambda info: (info.begin, info.end))
    _check_layout(file, entries, size - 8 - header_size)
    return SafetensorsHeader(
        path=file,
        file_size=size,
        header_size=header_size,
        tensors={info.name: info for info in entries},
        metadata=metadata,
    )
