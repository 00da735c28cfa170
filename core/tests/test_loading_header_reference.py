"""The header parser accepts exactly what the reference reader accepts, refuses the rest typed, and has limits.

Findings of issue 21: 21.5 (a deeply nested header raised RecursionError), 21.7 (a huge header took a minute and
1.8 GB to open), 21.11 (88 headers the reference rejects were accepted, leading whitespace it accepts was not).
Each differential case asks ``safetensors.safe_open`` for its verdict at test time, so the test follows the
installed reference rather than a copy of its rules.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import pytest
from diffstudio.errors import ConfigError, SafetensorsFormatError
from diffstudio.loading import Checkpoint
from diffstudio.loading.limits import ENV_MAX_HEADER_BYTES, ENV_MAX_TENSORS
from diffstudio.loading.safetensors_header import (
    MAX_JSON_DEPTH,
    HeaderJsonError,
    HeaderTooLargeError,
    TooManyTensorsError,
    read_header,
)
from safetensors import safe_open

ENTRY = b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]'


def write(path: Path, header: bytes, data: bytes = b"\0") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def reference_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception:
        return False
    return True


def ours_accepts(path: Path) -> bool:
    try:
        read_header(path)
    except SafetensorsFormatError:
        return False
    return True


def nested(depth: int) -> bytes:
    """A valid entry whose unknown field ``x`` brings the nesting to ``depth`` containers."""
    return b"{" + ENTRY + b',"x":' + b"[" * (depth - 2) + b"]" * (depth - 2) + b"}}"


CASES: dict[str, tuple[bytes, bytes]] = {
    "leading_space": (b" {" + ENTRY + b"}}", b"\0"),
    "leading_newline_tab": (b"\n\t\r {" + ENTRY + b"}}", b"\0"),
    "trailing_spaces": (b"{" + ENTRY + b"}}    ", b"\0"),
    "leading_bom": (b"\xef\xbb\xbf{" + ENTRY + b"}}", b"\0"),
    "leading_form_feed": (b"\x0c{" + ENTRY + b"}}", b"\0"),
    "minus_zero_offset": (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[-0,1]}}', b"\0"),
    "minus_zero_dim": (b'{"a":{"dtype":"U8","shape":[-0],"data_offsets":[0,0]}}', b""),
    "minus_zero_unknown_field": (b"{" + ENTRY + b',"x":-0}}', b"\0"),
    "lone_surrogate_metadata": (b'{"__metadata__":{"k":"\\ud800"},' + ENTRY + b"}}", b"\0"),
    "lone_surrogate_name": (b'{"\\udc00":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\0"),
    "lone_surrogate_unknown_field": (b"{" + ENTRY + b',"x":["\\ud800"]}}', b"\0"),
    "surrogate_pair": (b'{"\\ud83d\\ude00":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\0"),
    "escaped_backslash_u": (b'{"a\\\\ud800":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\0"),
    "float_out_of_range": (b"{" + ENTRY + b',"x":1e400}}', b"\0"),
    "integer_out_of_range": (b"{" + ENTRY + b',"x":' + b"9" * 309 + b"}}", b"\0"),
    "integer_in_double_range": (b"{" + ENTRY + b',"x":' + b"9" * 308 + b"}}", b"\0"),
    "nan_unknown_field": (b"{" + ENTRY + b',"x":NaN}}', b"\0"),
    "repeated_unknown_field": (b"{" + ENTRY + b',"x":1,"x":2}}', b"\0"),
    "escaped_metadata_key": (b'{"__meta\\u0064ata__":{"k":"v"},' + ENTRY + b"}}", b"\0"),
    "metadata_null": (b'{"__metadata__":null,' + ENTRY + b"}}", b"\0"),
    "metadata_repeated_key": (b'{"__metadata__":{"k":"1","k":"2"},' + ENTRY + b"}}", b"\0"),
    "metadata_repeated_key_bad_first": (b'{"__metadata__":{"k":1,"k":"2"},' + ENTRY + b"}}", b"\0"),
    "fnuz_dtype": (b'{"a":{"dtype":"F8_E4M3FNUZ","shape":[1],"data_offsets":[0,1]}}', b"\0"),
    "overflow_before_zero": (b'{"a":{"dtype":"U8","shape":[18446744073709551615,2,0],"data_offsets":[0,0]}}', b""),
    "zero_before_huge": (b'{"a":{"dtype":"U8","shape":[0,18446744073709551615,9],"data_offsets":[0,0]}}', b""),
    "bits_overflow": (b'{"a":{"dtype":"F64","shape":[288230376151711744],"data_offsets":[0,0]}}', b""),
    "depth_127": (nested(MAX_JSON_DEPTH), b"\0"),
    "depth_128": (nested(MAX_JSON_DEPTH + 1), b"\0"),
    "control_char_in_name": (b'{"a\x01":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\0"),
    "scalar_tensor_value": (b"{" + ENTRY + b'},"b":1}', b"\0"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_header_parser_matches_the_reference_both_ways(tmp_path: Path, name: str) -> None:
    header, data = CASES[name]
    path = write(tmp_path / f"{name}.safetensors", header, data)
    assert ours_accepts(path) == reference_accepts(path), name


def test_leading_whitespace_is_accepted_and_lone_surrogates_refused(tmp_path: Path) -> None:
    assert read_header(write(tmp_path / "ws.safetensors", b"\n {" + ENTRY + b"}}")).tensors["a"].shape == (1,)
    with pytest.raises(HeaderJsonError, match="surrogate"):
        read_header(write(tmp_path / "s.safetensors", b'{"__metadata__":{"k":"\\ud800"},' + ENTRY + b"}}"))
    with pytest.raises(SafetensorsFormatError, match="data_offsets must be two"):
        read_header(write(tmp_path / "z.safetensors", b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[-0,1]}}'))


@pytest.mark.parametrize("where", ["unknown_field", "top", "metadata", "shape"])
def test_deeply_nested_header_is_a_typed_error(tmp_path: Path, where: str) -> None:
    deep = b"[" * 10_000 + b"]" * 10_000  # 20 kB; a RecursionError through read_header before
    header = {
        "unknown_field": b"{" + ENTRY + b',"x":' + deep + b"}}",
        "top": deep,
        "metadata": b'{"__metadata__":' + deep + b"}",
        "shape": b'{"a":{"dtype":"U8","shape":' + deep + b',"data_offsets":[0,1]}}',
    }[where]
    path = write(tmp_path / "deep.safetensors", header)
    with pytest.raises(SafetensorsFormatError) as info:
        read_header(path)
    assert str(path) in str(info.value)
    with pytest.raises(SafetensorsFormatError):  # and through the checkpoint view that every loader uses
        Checkpoint.open(path)
    assert not reference_accepts(path)


def test_header_byte_limit_names_the_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "w.safetensors", b"{" + ENTRY + b"}}" + b" " * 200)
    assert read_header(path).tensors
    monkeypatch.setenv(ENV_MAX_HEADER_BYTES, "100")
    with pytest.raises(HeaderTooLargeError, match=ENV_MAX_HEADER_BYTES) as info:
        read_header(path)
    assert "more than the 100 allowed" in str(info.value) and "If you trust the file" in str(info.value)
    monkeypatch.setenv(ENV_MAX_HEADER_BYTES, "lots")
    with pytest.raises(ConfigError, match=ENV_MAX_HEADER_BYTES):
        read_header(path)


def test_tensor_count_limit_names_the_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entries = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(50)}
    entries["__metadata__"] = {"note": "{" * 500}  # braces inside strings are not objects
    path = write(tmp_path / "many.safetensors", json.dumps(entries).encode(), b"\0" * 50)
    monkeypatch.setenv(ENV_MAX_TENSORS, "60")
    assert len(read_header(path).tensors) == 50
    monkeypatch.setenv(ENV_MAX_TENSORS, "10")
    with pytest.raises(TooManyTensorsError, match=f"{ENV_MAX_TENSORS}=") as info:
        read_header(path)
    assert "limit of 10 tensor entries" in str(info.value) and str(path) in str(info.value)


def test_huge_header_is_refused_before_parsing(tmp_path: Path) -> None:
    # 210,000 entries (default limit 200,000) are refused from the raw bytes: parsing them would build about
    # 2 million Python objects (a 90 MB header of 1.35 M entries took 60 s and 1.8 GB before the limit)
    count = 210_000
    body = ",".join(f'"{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}' for i in range(count))
    path = write(tmp_path / "huge.safetensors", ("{" + body + "}").encode(), b"\0" * count)
    tracemalloc.start()
    try:
        with pytest.raises(TooManyTensorsError, match="200000"):
            read_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * path.stat().st_size, peak  # a few copies of the raw bytes, no parsed objects


def test_object_count_ignores_braces_in_strings_with_escapes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    note = '{ " {{ \\" {{{ \\ {' * 200_000  # 3.6 MB over several 1 MiB chunks; quotes and backslashes escaped
    header = {"__metadata__": {"k": note}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    path = write(tmp_path / "braces.safetensors", json.dumps(header).encode())
    monkeypatch.setenv(ENV_MAX_TENSORS, "1")  # 3 objects: the root, __metadata__ and one tensor
    assert read_header(path).metadata["k"] == note
