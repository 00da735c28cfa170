r"""Strict reading and validation of safetensors headers (no torch, no tensor data).

A safetensors file is laid out as::

    [8 bytes: N, little-endian u64][N bytes: UTF-8 JSON object][data buffer]

The JSON maps tensor names to ``{"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]}`` (offsets
relative to the start of the data buffer) plus an optional ``"__metadata__": {str: str}`` entry.

:func:`read_header` accepts exactly the files the reference reader (the ``safetensors`` Rust crate's
``SafeTensors::read_metadata``, behind ``safetensors.safe_open``) accepts, and refuses the others with a typed
error; ``tests/fuzz/test_fuzz_header.py`` checks that both ways on generated headers. The reference's rules,
which a plain ``json.loads`` does not follow, are:

* the header is UTF-8 JSON (``serde_json``): whitespace may surround the object; ``NaN``/``Infinity``, numbers
  out of the double range (``1e400``, 400-digit integers), lone UTF-16 surrogate escapes (``"\ud800"``) and
  nesting deeper than :data:`MAX_JSON_DEPTH` containers are errors anywhere, even in fields nobody reads;
* ``shape`` and ``data_offsets`` hold unsigned 64-bit integers (``-0`` and ``1.0`` are not);
* a tensor entry may carry unknown fields (ignored) but not the same known field twice; ``__metadata__`` may
  appear once, as ``null`` or an object of strings (the last of repeated keys wins);
* the same tensor name may appear twice: every entry must be valid and the last one wins;
* each tensor's element count, then its bit count, must fit in 64 bits (multiplied dimension by dimension, so
  ``[2**64 - 1, 2, 0]`` overflows) and be a whole number of bytes; sorted by offsets, the tensors tile the data
  buffer from 0 with no gap, overlap or trailing byte.

Before any of that, the length prefix is checked against the file size and against
``DIFFSTUDIO_MAX_HEADER_BYTES``, and the number of JSON objects against ``DIFFSTUDIO_MAX_TENSORS``
(:mod:`diffstudio.loading.limits`), so that a lying or huge header can neither hang the reader nor make it
allocate much memory. Every violation is a subclass of :class:`~diffstudio.errors.SafetensorsFormatError`
whose message names the file, the tensor and the problem.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffstudio.errors import SafetensorsFormatError
from diffstudio.loading.limits import DEFAULT_MAX_HEADER_BYTES, ENV_MAX_HEADER_BYTES, ENV_MAX_TENSORS, header_limits

__all__ = [
    "DTYPE_BITS",
    "MAX_HEADER_SIZE",
    "MAX_JSON_DEPTH",
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
    "TooManyTensorsError",
    "ValidationOverflowError",
    "read_header",
]

MAX_HEADER_SIZE = DEFAULT_MAX_HEADER_BYTES
"""Largest JSON header the safetensors format allows, in bytes (the reference loader's limit)."""

MAX_JSON_DEPTH = 127
"""Deepest nesting of JSON objects/arrays the reference reader parses (``serde_json``'s recursion limit)."""

_U64 = 2**64 - 1  # offsets, sizes and counts are usize (u64) in the reference implementation

DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
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
"""Bits per element of every safetensors dtype string (the reference's ``Dtype`` enum)."""

_ADVICE = "The file is probably truncated or corrupt; delete it and download (or export) it again."
_FIELDS = ("dtype", "shape", "data_offsets")


class _HeaderError(SafetensorsFormatError):
    """Base of the header errors: formats ``path``, ``tensor`` and the problem into one message.

    Attributes:
        path: The file that failed validation.
        tensor: The tensor entry at fault, or None when the problem is not about one tensor.
    """

    def __init__(self, path: Path, problem: str, tensor: str | None = None, advice: str = _ADVICE) -> None:
        where = f" (tensor {tensor!r})" if tensor is not None else ""
        super().__init__(f"Invalid safetensors file {path}{where}: {problem}. {advice}")
        self.path = path
        self.tensor = tensor


class HeaderTooSmallError(_HeaderError):
    """The file is shorter than the 8-byte header length prefix."""


class HeaderTooLargeError(_HeaderError):
    """The header length prefix exceeds ``DIFFSTUDIO_MAX_HEADER_BYTES`` (default :data:`MAX_HEADER_SIZE`)."""


class TooManyTensorsError(_HeaderError):
    """The header holds more JSON objects than ``DIFFSTUDIO_MAX_TENSORS`` allows."""


class HeaderLengthError(_HeaderError):
    """The header length prefix points past the end of the file."""


class HeaderEncodingError(_HeaderError):
    """The header bytes are not valid UTF-8."""


class HeaderJsonError(_HeaderError):
    """The header is not a JSON object the reference reader parses (see the module docstring)."""


class InvalidMetadataError(_HeaderError):
    """``__metadata__`` is not a mapping of strings to strings, or appears twice."""


class InvalidTensorInfoError(_HeaderError):
    """A tensor entry lacks a field, repeats one, or has one of the wrong type (dtype, shape, data_offsets)."""


class InvalidOffsetError(_HeaderError):
    """Tensor data offsets leave a gap, overlap, or run backwards."""


class TensorSizeError(_HeaderError):
    """A tensor's byte range does not match ``prod(shape) * itemsize`` (or is not whole bytes)."""


class ValidationOverflowError(_HeaderError):
    """Shape, offset or size arithmetic exceeds 64 bits."""


class IncompleteBufferError(_HeaderError):
    """The tensors do not cover the data buffer exactly (missing or trailing bytes)."""


@dataclass(frozen=True, slots=True)
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


# -- JSON with the reference's rules -------------------------------------------------------------------------


class _Object(list[tuple[str, Any]]):
    """A JSON object as its ``(key, value)`` pairs in file order, repeated keys kept (``object_pairs_hook``)."""


_NEGATIVE_ZERO = -0.0  # what serde_json makes of the integer literal -0: a float, which no usize field accepts
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_UNESCAPED_STRING = re.compile(rb'"[^"]*"')


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:24]} is out of the double range")
    return value


def _parse_int(text: str) -> int | float:
    return _NEGATIVE_ZERO if text == "-0" else int(text)


def _depth(value: object) -> int:
    """Nesting depth of JSON containers in ``value`` (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, _Object):
            deepest = max(deepest, level)
            stack.extend((inner, level + 1) for _, inner in item)
        elif isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((inner, level + 1) for inner in item)
    return deepest


def _has_lone_surrogate(value: object) -> bool:
    """True when a key or string anywhere in ``value`` holds a UTF-16 surrogate code point (a lone escape)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if any("\ud800" <= char <= "\udfff" for char in item):
                return True
        elif isinstance(item, _Object):
            for key, inner in item:
                stack.extend((key, inner))
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _count_objects(raw: bytes, limit: int) -> int:
    """Number of JSON objects in ``raw``: its ``{`` count, less those inside strings when that count exceeds ``limit``.

    Escaped backslashes, then escaped quotes, are dropped first (exact for valid JSON, where a backslash always
    starts a two-character escape inside a string), so every remaining ``"`` opens or closes a string. Strings are
    then removed 1 MiB at a time (a chunk that starts or ends inside a string gets a quote added there), so the
    memory used stays a small multiple of the header's size.
    """
    count = raw.count(b"{")
    if count <= limit:
        return count
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    count, inside, step = 0, False, 1 << 20
    for start in range(0, len(unescaped), step):
        chunk = unescaped[start : start + step]
        if inside:
            chunk = b'"' + chunk
        inside = chunk.count(b'"') % 2 == 1
        if inside:
            chunk += b'"'
        count += _UNESCAPED_STRING.sub(b"", chunk).count(b"{")
    return count


def _parse_json(path: Path, raw: bytes) -> _Object:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderEncodingError(path, f"the {len(raw)}-byte header is not valid UTF-8 ({exc.reason})") from None
    hooks: dict[str, Any] = {}
    if "-0" in text:
        hooks["parse_int"] = _parse_int
    try:
        parsed = json.loads(
            text, object_pairs_hook=_Object, parse_constant=_reject_constant, parse_float=_parse_float, **hooks
        )
    except RecursionError:
        raise HeaderJsonError(path, f"the header nests JSON deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError, as are the hooks' errors
        raise HeaderJsonError(path, f"the header is not valid JSON ({exc})") from None
    if not isinstance(parsed, _Object):
        raise HeaderJsonError(path, f"the header is JSON but not an object (it is a {type(parsed).__name__})")
    if ("\\ud" in text or "\\uD" in text) and _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(parsed):
        raise HeaderJsonError(path, "the header holds a lone UTF-16 surrogate escape (\\ud800-\\udfff unpaired)")
    return parsed


# -- entries -------------------------------------------------------------------------------------------------


def _parse_metadata(path: Path, value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, _Object):
        kind = "array" if isinstance(value, list) else type(value).__name__
        raise InvalidMetadataError(path, f"__metadata__ must be an object of strings, got {kind}")
    for key, item in value:
        if not isinstance(item, str):
            shown = "an object" if isinstance(item, _Object) else f"{type(item).__name__} {item!r:.60}"
            raise InvalidMetadataError(path, f"__metadata__[{key!r}] must be a string, got {shown}")
    return dict(value)


def _out_of_double_range(value: object) -> bool:
    """True when an integer anywhere in ``value`` is too large for a double (the reference cannot parse it)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is int and (item > _U64 or item < -_U64):
            try:
                float(item)
            except OverflowError:
                return True
        elif isinstance(item, _Object):
            stack.extend(inner for _, inner in item)
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _check_extra(path: Path, name: str, key: str, item: object) -> None:
    """An unknown field of a tensor entry is ignored, but must be JSON the reference can parse."""
    if isinstance(item, list) and _depth(item) > MAX_JSON_DEPTH - 2:
        raise HeaderJsonError(path, f"field {key!r} nests JSON deeper than {MAX_JSON_DEPTH} levels", name)
    if _out_of_double_range(item):
        raise HeaderJsonError(path, f"field {key!r} holds a number out of the double range", name)


def _entry_fields(path: Path, name: str, value: _Object) -> dict[str, Any]:
    fields = dict(value)
    if len(fields) == len(value) == len(_FIELDS):
        return fields  # the usual entry: exactly the three known fields, once each
    fields = {}
    for key, item in value:
        if key in _FIELDS:
            if key in fields:
                raise InvalidTensorInfoError(path, f"the entry has {key} twice", name)
            fields[key] = item
        else:
            _check_extra(path, name, key, item)
    return fields


def _parse_entry(path: Path, name: str, value: object) -> TensorInfo:
    if not isinstance(value, _Object):
        kind = "array" if isinstance(value, list) else type(value).__name__
        raise InvalidTensorInfoError(path, f"the entry must be an object, got {kind}", name)
    fields = _entry_fields(path, name, value)
    missing = [key for key in _FIELDS if key not in fields]
    if missing:
        raise InvalidTensorInfoError(path, f"the entry lacks {', '.join(missing)}", name)
    dtype = fields["dtype"]
    if type(dtype) is not str or dtype not in DTYPE_BITS:
        known = ", ".join(DTYPE_BITS)
        raise InvalidTensorInfoError(path, f"unknown dtype {dtype!r:.40} (known: {known})", name)
    shape = fields["shape"]
    if type(shape) is not list or not set(map(type, shape)) <= {int}:  # bool, float, -0 (a float) are not
        raise InvalidTensorInfoError(path, f"shape must be a list of integers, got {shape!r:.80}", name)
    if shape and min(shape) < 0:
        raise InvalidTensorInfoError(path, f"shape {shape!r:.80} has a negative dimension", name)
    if shape and max(shape) > _U64:
        raise ValidationOverflowError(path, f"shape {shape!r:.80} has a dimension beyond 64 bits", name)
    offsets = fields["data_offsets"]
    if (
        type(offsets) is not list
        or len(offsets) != 2
        or type(offsets[0]) is not int
        or type(offsets[1]) is not int
        or not (0 <= offsets[0] <= _U64 and 0 <= offsets[1] <= _U64)
    ):
        raise InvalidTensorInfoError(
            path, f"data_offsets must be two non-negative 64-bit integers, got {offsets!r:.80}", name
        )
    return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])


def _checked_bits(shape: tuple[int, ...], bits_per_element: int) -> int | None:
    """Return ``prod(shape) * bits_per_element``, or None when a step overflows 64 bits (as the reference does).

    The element count is multiplied dimension by dimension and each partial product must fit in 64 bits (so
    ``[2**64 - 1, 2, 0]`` overflows although its product is 0); then the bit count must fit too. Stops at the
    first overflow, so a hostile shape cannot make it slow.
    """
    count = 1
    for dim in shape:
        count *= dim
        if count > _U64:
            return None
    total = count * bits_per_element
    return None if total > _U64 else total


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
            shown = f"{list(info.shape)!r:.80}"
            raise ValidationOverflowError(path, f"shape {shown} x {info.dtype} overflows 64 bits", info.name)
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
                f"{list(info.shape)!r:.80} of {info.dtype} needs {bits // 8}",
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


def _read_raw(file: Path) -> tuple[int, int, bytes]:
    """Read the length prefix and the header bytes after checking them; return (file size, N, header bytes)."""
    limits = header_limits()
    with open(file, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < 8:
            raise HeaderTooSmallError(file, f"it is {size} bytes long, shorter than the 8-byte header length")
        header_size = int.from_bytes(handle.read(8), "little")
        if header_size > limits.max_header_bytes:
            raise HeaderTooLargeError(
                file,
                f"the header length prefix says {header_size} bytes, more than the {limits.max_header_bytes} "
                f"allowed (the format allows {MAX_HEADER_SIZE}; {ENV_MAX_HEADER_BYTES} sets the limit)",
                advice=_ADVICE
                if header_size > MAX_HEADER_SIZE
                else f"If you trust the file, raise the limit with {ENV_MAX_HEADER_BYTES}=<bytes>.",
            )
        if header_size + 8 > size:
            raise HeaderLengthError(
                file,
                f"the header length prefix says {header_size} bytes but the file has only {size - 8} after it",
            )
        raw = handle.read(header_size)
    if len(raw) != header_size:  # the file shrank while we read it
        raise HeaderLengthError(file, f"only {len(raw)} of the {header_size} header bytes could be read")
    objects = _count_objects(raw, limits.max_tensors + 2)
    if objects > limits.max_tensors + 2:
        raise TooManyTensorsError(
            file,
            f"the header holds {objects} JSON objects, more than the limit of {limits.max_tensors} tensor entries",
            advice=f"If you trust the file, raise the limit with {ENV_MAX_TENSORS}=<number>.",
        )
    return size, header_size, raw


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file.

    Args:
        path: The file to read.

    Returns:
        The validated header; no tensor data is read.

    Raises:
        SafetensorsFormatError: a subclass naming the file, the tensor and the problem.
        ConfigError: ``DIFFSTUDIO_MAX_HEADER_BYTES`` or ``DIFFSTUDIO_MAX_TENSORS`` is not a positive number.
        OSError: the file cannot be opened or read.
    """
    file = Path(path)
    size, header_size, raw = _read_raw(file)
    parsed = _parse_json(file, raw)
    del raw
    metadata: dict[str, str] = {}
    tensors: dict[str, TensorInfo] = {}
    seen_metadata = False
    for name, value in parsed:
        if name == "__metadata__":
            if seen_metadata:
                raise InvalidMetadataError(file, "__metadata__ appears twice")
            seen_metadata = True
            metadata = _parse_metadata(file, value)
        else:
            tensors[name] = _parse_entry(file, name, value)  # a repeated name: the last entry wins, as in the reference
    entries = sorted(tensors.values(), key=lambda info: (info.begin, info.end))
    _check_layout(file, entries, size - 8 - header_size)
    return SafetensorsHeader(
        path=file,
        file_size=size,
        header_size=header_size,
        tensors={info.name: info for info in entries},
        metadata=metadata,
    )
