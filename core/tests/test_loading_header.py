"""Strict safetensors header validation: each bad file gets a typed error naming file, tensor and problem."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio.errors import SafetensorsFormatError
from diffstudio.loading.safetensors_header import (
    MAX_HEADER_SIZE,
    HeaderEncodingError,
    HeaderJsonError,
    HeaderLengthError,
    HeaderTooLargeError,
    HeaderTooSmallError,
    IncompleteBufferError,
    InvalidMetadataError,
    InvalidOffsetError,
    InvalidTensorInfoError,
    TensorSizeError,
    ValidationOverflowError,
    read_header,
)
from safetensors import safe_open
from safetensors.torch import save_file


def write_raw(path: Path, header: dict[str, Any] | bytes, data: bytes = b"", *, length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def f32(begin: int, end: int, *shape: int) -> dict[str, Any]:
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, end]}


def reference_rejects(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                handle.get_tensor(key)
    except Exception:
        return True
    return False


def assert_error(path: Path, error: type[SafetensorsFormatError], *words: str, tensor: str | None = None) -> str:
    with pytest.raises(error) as info:
        read_header(path)
    message = str(info.value)
    assert str(path) in message
    assert "download" in message and "corrupt" in message
    for word in words:
        assert word in message, message
    if tensor is not None:
        assert info.value.tensor == tensor  # type: ignore[attr-defined]
        assert repr(tensor) in message
    assert isinstance(info.value, SafetensorsFormatError)
    # the reference loader agrees that the file is bad
    assert reference_rejects(path)
    return message


def test_valid_file_round_trip(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.zeros(0, 5),
        "c": torch.ones(2, dtype=torch.bfloat16),
        "d": torch.tensor(7, dtype=torch.int64),
        "e": torch.ones(3).to(torch.float8_e5m2),
    }
    path = tmp_path / "ok.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    header = read_header(path)
    assert header.metadata == {"format": "pt", "note": "x"}
    assert set(header.tensors) == set(tensors)
    assert header.tensors["a"].shape == (3, 4) and header.tensors["a"].dtype == "F32"
    assert header.tensors["b"].nbytes == 0 and header.tensors["d"].shape == ()
    assert header.tensors["e"].dtype == "F8_E5M2"
    assert header.file_size == path.stat().st_size
    assert header.data_start + sum(t.nbytes for t in header.tensors.values()) == header.file_size
    assert not reference_rejects(path)


def test_hand_written_minimal_file_is_valid(tmp_path: Path) -> None:
    path = write_raw(
        tmp_path / "m.safetensors", b'{"x": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}  ', b"\1\2"
    )
    header = read_header(path)
    assert header.tensors["x"].begin == 0 and header.tensors["x"].end == 2
    assert header.metadata == {}


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    assert_error(path, HeaderTooSmallError, "0 bytes")


def test_shorter_than_length_prefix(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    assert_error(path, HeaderTooSmallError, "3 bytes", "8-byte")


def test_header_length_too_large_reads_nothing_more(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "huge.safetensors", b"{}", length=MAX_HEADER_SIZE + 1)
    started = time.perf_counter()
    assert_error(path, HeaderTooLargeError, str(MAX_HEADER_SIZE + 1), "more than")
    assert time.perf_counter() - started < 5


def test_header_length_past_end_of_file(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "lying.safetensors", b"{}", length=5000)
    assert_error(path, HeaderLengthError, "5000", "only 2")


def test_truncated_inside_header(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.randn(8, 8)}, str(path))
    full = path.read_bytes()
    path.write_bytes(full[:20])
    assert_error(path, HeaderLengthError, "header length prefix")


def test_truncated_inside_data(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_file({"a": torch.randn(4), "w": torch.randn(8, 8)}, str(path))
    full = path.read_bytes()
    path.write_bytes(full[:-10])
    assert_error(path, IncompleteBufferError, "need", "only", tensor="w")


def test_extra_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "polyglot.safetensors"
    save_file({"w": torch.randn(2, 2)}, str(path))
    with open(path, "ab") as handle:
        handle.write(b"PK\x03\x04 trailing payload")
    assert_error(path, IncompleteBufferError, "trailing", tensor="w")


def test_not_utf8(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "bad.safetensors", b'{"\xff\xfe": 1}')
    assert_error(path, HeaderEncodingError, "UTF-8")


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"[1, 2, 3]", ("not an object", "list")),
        (b"not json at all", ("not valid JSON",)),
        (b'{"a": ', ("not valid JSON",)),
        (b'{"a": NaN}', ("not valid JSON", "NaN")),
    ],
)
def test_not_a_json_object(tmp_path: Path, raw: bytes, words: tuple[str, ...]) -> None:
    path = write_raw(tmp_path / "bad.safetensors", raw)
    assert_error(path, HeaderJsonError, *words)


def test_duplicate_tensor_names_last_wins_as_in_the_reference(tmp_path: Path) -> None:
    # serde's HashMap keeps the last of repeated keys, after checking every entry; so do we (finding 21.11)
    first = '{"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}'
    last = '{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'
    path = write_raw(tmp_path / "dup.safetensors", f'{{"x": {first}, "x": {last}}}'.encode(), b"\0")
    assert read_header(path).tensors["x"].shape == (1,)
    assert not reference_rejects(path)
    swapped = write_raw(tmp_path / "dup2.safetensors", f'{{"x": {last}, "x": {first}}}'.encode(), b"\0")
    assert_error(swapped, IncompleteBufferError, "need 2 bytes", tensor="x")
    bad_first = '{"dtype": "XX", "shape": [1], "data_offsets": [0, 1]}'
    invalid = write_raw(tmp_path / "dup3.safetensors", f'{{"x": {bad_first}, "x": {last}}}'.encode(), b"\0")
    assert_error(invalid, InvalidTensorInfoError, "unknown dtype", tensor="x")


def test_repeated_metadata_or_field_is_refused(tmp_path: Path) -> None:
    entry = '"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'
    twice = write_raw(
        tmp_path / "meta2.safetensors", f'{{"__metadata__": {{}}, "__metadata__": {{}}, {entry}}}'.encode(), b"\0"
    )
    assert_error(twice, InvalidMetadataError, "twice")
    field = b'{"w": {"dtype": "U8", "dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    assert_error(write_raw(tmp_path / "field2.safetensors", field, b"\0"), InvalidTensorInfoError, "twice", tensor="w")


@pytest.mark.parametrize("metadata", [{"epoch": 3}, {"tags": ["a"]}, ["a"], "text"])
def test_metadata_must_be_str_to_str(tmp_path: Path, metadata: Any) -> None:
    path = write_raw(tmp_path / "meta.safetensors", {"__metadata__": metadata, "w": f32(0, 4, 1)}, b"\0" * 4)
    message = assert_error(path, InvalidMetadataError, "__metadata__")
    if isinstance(metadata, dict):
        assert repr(next(iter(metadata))) in message and "must be a string" in message


def test_size_lie_shape_vs_offsets(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "lie.safetensors", {"w": f32(0, 32, 4, 4)}, b"\0" * 32)
    assert_error(path, TensorSizeError, "hold 32 bytes", "needs 64", tensor="w")


def test_gap_between_tensors(tmp_path: Path) -> None:
    header = {"a": f32(0, 8, 2), "b": f32(12, 20, 2)}
    path = write_raw(tmp_path / "gap.safetensors", header, b"\0" * 20)
    assert_error(path, InvalidOffsetError, "gap", "starts at byte 12", tensor="b")


def test_first_tensor_not_at_zero(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "gap0.safetensors", {"a": f32(4, 12, 2)}, b"\0" * 12)
    assert_error(path, InvalidOffsetError, "gap", tensor="a")


def test_overlapping_tensors(tmp_path: Path) -> None:
    header = {"a": f32(0, 8, 2), "b": f32(4, 12, 2)}
    path = write_raw(tmp_path / "overlap.safetensors", header, b"\0" * 12)
    assert_error(path, InvalidOffsetError, "overlap", tensor="b")


def test_offsets_run_backwards(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "back.safetensors", {"a": f32(0, 8, 2), "b": f32(8, 4, 1)}, b"\0" * 8)
    assert_error(path, InvalidOffsetError, "backwards", tensor="b")


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}, ("unknown dtype 'F33'",)),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, ("negative",)),
        ({"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}, ("list of integers",)),
        ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, ("list of integers",)),
        ({"dtype": "F32", "shape": [1]}, ("lacks data_offsets",)),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0]}, ("data_offsets must be two",)),
        ({"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}, ("data_offsets must be two",)),
        ("F32", ("must be an object",)),
    ],
)
def test_invalid_tensor_entries(tmp_path: Path, entry: Any, words: tuple[str, ...]) -> None:
    path = write_raw(tmp_path / "entry.safetensors", {"w": entry}, b"\0" * 4)
    assert_error(path, InvalidTensorInfoError, *words, tensor="w")


def test_shape_overflow(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}
    path = write_raw(tmp_path / "overflow.safetensors", header, b"\0" * 4)
    assert_error(path, ValidationOverflowError, "overflows 64 bits", tensor="w")


def test_hostile_shape_is_rejected_quickly(tmp_path: Path) -> None:
    shape = ", ".join(["9223372036854775807"] * 200_000)
    raw = f'{{"w": {{"dtype": "F32", "shape": [{shape}], "data_offsets": [0, 4]}}}}'.encode()
    path = write_raw(tmp_path / "hostile.safetensors", raw, b"\0" * 4)
    started = time.perf_counter()
    with pytest.raises(ValidationOverflowError):
        read_header(path)
    assert time.perf_counter() - started < 10


def test_sub_byte_dtype_must_fill_whole_bytes(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "f4.safetensors", {"w": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"\0\0")
    with pytest.raises(TensorSizeError, match="12 bits"):
        read_header(path)
    ok = write_raw(tmp_path / "f4ok.safetensors", {"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, b"\0\0")
    assert read_header(ok).tensors["w"].nbytes == 2


def test_empty_header_with_data_is_incomplete(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "nodata.safetensors", {}, b"\0" * 3)
    assert_error(path, IncompleteBufferError, "trailing")
    assert read_header(write_raw(tmp_path / "empty.safetensors", {})).tensors == {}
