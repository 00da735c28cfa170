"""Fuzz the safetensors header parser against the reference reader (``safetensors.safe_open``), every case.

Cases start from valid headers (a few tensors of random dtypes and shapes, optional metadata) and are mutated at
three levels: structure (dtype, shape and offset edits, ``-0``, huge and out-of-range numbers, repeated names and
fields, unknown fields nested around the reference's depth limit, unicode and lone surrogate escapes, metadata
edits, whitespace and BOMs), bytes (flips, inserts, deletes, truncation) and file (length prefix, data size).
The oracle is the reference: ``should_fail`` is True exactly when ``safe_open`` refuses the file, so our parser
must agree both ways, and its refusals must be typed. Files both readers accept are then opened with
:class:`~diffstudio.loading.Checkpoint` and every tensor is compared with the reference's.

Figures: ``test_fuzz_header_mutations`` runs 1,500 cases in CI and 100,000 with ``DIFFSTUDIO_FUZZ=long``
(``DIFFSTUDIO_FUZZ_HEADER_CASES`` overrides both); the hypothesis test adds the profile's count.
"""

from __future__ import annotations

import copy
import json
import os
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio.loading import Checkpoint, read_header
from diffstudio.loading.safetensors_header import DTYPE_BITS
from diffstudio.testing import import_file
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

harness = import_file(Path(__file__).resolve().parent / "harness.py")

CASES = int(os.environ.get("DIFFSTUDIO_FUZZ_HEADER_CASES", "100000" if harness.LONG else "1500"))
DTYPES = sorted(DTYPE_BITS)


@dataclass(frozen=True)
class Raw:
    """A JSON token written as is (``-0``, ``1e400``, ``"\\ud800"``, ``NaN``...)."""

    text: str


class Obj(list[tuple[Any, Any]]):
    """A JSON object as pairs, so that keys may repeat and keys may be raw tokens."""


def render(value: Any, rng: random.Random | None = None) -> str:
    """JSON text of ``value`` (Obj, list, Raw, str, int, float, bool, None), with random whitespace when ``rng``."""

    def ws() -> str:
        return rng.choice(["", "", "", " ", "\n", "\t", "\r\n  "]) if rng else ""

    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Obj):
        items = [f"{ws()}{render(k, rng)}{ws()}:{ws()}{render(v, rng)}{ws()}" for k, v in value]
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(ws() + render(v, rng) + ws() for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def valid_case(rng: random.Random) -> tuple[Obj, int]:
    """A valid header (as pairs) and the size of its data buffer."""
    header = Obj()
    if rng.random() < 0.4:
        header.append(
            (
                "__metadata__",
                Obj((f"k{i}", rng.choice(["v", "", "é", "🙂", '{"x": 1}'])) for i in range(rng.randrange(3))),
            )
        )
    offset = 0
    for index in range(rng.choice([0, 1, 1, 2, 3, 5])):
        dtype = rng.choice(DTYPES)
        bits = DTYPE_BITS[dtype]
        shape = [rng.choice([0, 1, 2, 3, 4, 8]) for _ in range(rng.choice([0, 1, 1, 2, 3]))]
        count = 1
        for dim in shape:
            count *= dim
        if count * bits % 8:
            shape.append(8)
            count *= 8
        size = count * bits // 8
        name = rng.choice([f"t{index}", f"blocks.{index}.weight", f"é{index}", f"🙂{index}", f"a b{index}"])
        header.append((name, Obj([("dtype", dtype), ("shape", shape), ("data_offsets", [offset, offset + size])])))
        offset += size
    if rng.random() < 0.5:
        rng.shuffle(header)
    return header, offset


def deep(depth: int) -> Raw:
    return Raw("[" * depth + "]" * depth)


NUMBERS = [Raw("-0"), Raw("-0.0"), Raw("1e400"), Raw("-1e400"), Raw("9" * 309), Raw("9" * 308), Raw("NaN"), Raw("1.0"),
           Raw("1E2"), Raw("01"), Raw("+1"), -1, 2**64 - 1, 2**64, 2**63, True, None, 0.5]  # fmt: skip
STRINGS = [Raw('"\\ud800"'), Raw('"\\udc00x"'), Raw('"\\ud83d\\ude00"'), Raw('"\\\\ud800"'), Raw('"a\x01"'),
           Raw('"\\u0000"'), "", "__metadata__", "\U0001f600", "\x7f", Raw('"\\x"'), "x" * 300]  # fmt: skip
JUNK: list[Any] = [*NUMBERS, *STRINGS, [], Obj(), [1, [2, [3]]], deep(124), deep(125), deep(126), deep(200), deep(3000)]


def junk(rng: random.Random) -> Any:
    """A fresh copy of one JUNK value (the mutations edit what they insert; the table must stay as it is)."""
    return copy.deepcopy(rng.choice(JUNK))


def get_field(entry: Obj, key: str, default: Any) -> Any:
    return next((v for k, v in entry if k == key), default)


def set_field(entry: Obj, key: str, value: Any) -> None:
    for i, (k, _) in enumerate(entry):
        if k == key:
            entry[i] = (key, value)
            return
    entry.append((key, value))


def mutate_structure(header: Obj, rng: random.Random) -> None:  # noqa: C901 - one table of mutations
    """Apply one structure-aware edit to ``header`` in place."""
    tensors = [i for i, (k, v) in enumerate(header) if isinstance(v, Obj) and k != "__metadata__"]
    entry = header[rng.choice(tensors)][1] if tensors else None
    what = rng.randrange(12)
    if what == 0 and entry is not None:  # dtype
        set_field(
            entry, "dtype", rng.choice([*DTYPES, "u8", "F33", "", "BF16 ", Raw('"\\u0046\\u0033\\u0032"'), 1, None])
        )
    elif what == 1 and entry is not None:  # shape
        shape = get_field(entry, "shape", [])
        shape = list(shape) if isinstance(shape, list) and not isinstance(shape, Obj) else []
        choice = rng.randrange(4)
        if choice == 0 and shape:
            shape[rng.randrange(len(shape))] = rng.choice([*NUMBERS, 0, 2**64 - 1, [1], "1"])
        elif choice == 1:
            shape.append(rng.choice([0, 1, 2, 2**64 - 1, 2**32]))
        elif choice == 2 and shape:
            shape.pop()
        else:
            shape = rng.choice([[], [2**64 - 1, 2, 0], [0, 2**64 - 1, 2**64 - 1], [2**61], [2**58, 8]])
        set_field(entry, "shape", shape)
    elif what == 2 and entry is not None:  # offsets
        offsets = get_field(entry, "data_offsets", [0, 0])
        offsets = list(offsets) if isinstance(offsets, list) and len(offsets) == 2 else [0, 0]
        choice = rng.randrange(4)
        if choice == 0:
            i = rng.randrange(2)
            offsets[i] = offsets[i] + rng.choice([-1, 1, 8]) if type(offsets[i]) is int else 0
        elif choice == 1:
            offsets.reverse()
        elif choice == 2:
            offsets[rng.randrange(2)] = rng.choice(NUMBERS)
        else:
            offsets = rng.choice([[0], [0, 0, 0], Obj([("0", 0)]), "0,1", None])
        set_field(entry, "data_offsets", offsets)
    elif what == 3 and tensors:  # rename
        i = rng.choice(tensors)
        header[i] = (rng.choice(STRINGS), header[i][1])
    elif what == 4 and tensors:  # repeat an entry (same name), maybe changed, before or after
        name, value = header[rng.choice(tensors)]
        twin = Obj(value)
        if rng.random() < 0.5:
            set_field(twin, "shape", [1])
        header.insert(rng.randrange(len(header) + 1), (name, twin))
    elif what == 5:  # metadata
        meta = Obj(
            [
                (rng.choice(["k", *STRINGS[:2]]), rng.choice(["v", *copy.deepcopy(JUNK[:6]), *STRINGS[:3]]))
                for _ in range(2)
            ]
        )
        header.insert(rng.randrange(len(header) + 1), ("__metadata__", rng.choice([meta, None, [], "x", meta])))
    elif what == 6 and entry is not None:  # unknown field
        entry.insert(rng.randrange(len(entry) + 1), (rng.choice(["x", "dtype_", *STRINGS[:3]]), junk(rng)))
    elif what == 7 and entry is not None:  # repeat or drop a known field
        if rng.random() < 0.5 and entry:
            entry.append(rng.choice(list(entry)))
        elif entry:
            entry.pop(rng.randrange(len(entry)))
    elif what == 8 and tensors:  # entry not an object
        i = rng.choice(tensors)
        header[i] = (header[i][0], junk(rng))
    elif what == 9:
        header.append((rng.choice(["__metadata__", "", "t"]), junk(rng)))
    elif what == 10 and tensors:  # the deepest legal nesting and one more
        assert entry is not None
        entry.append(("x", Obj([("y", deep(rng.choice([122, 123, 124])))])))
    elif what == 11:
        header.clear()


def mutate_bytes(text: bytes, rng: random.Random) -> bytes:
    """One byte-level edit: flip, insert, delete, truncate, prefix or suffix."""
    data = bytearray(text)
    what = rng.randrange(6)
    position = rng.randrange(len(data) + 1)
    if what == 0 and data:
        data[min(position, len(data) - 1)] ^= 1 << rng.randrange(8)
    elif what == 1:
        data[position:position] = bytes(
            [rng.choice([0, 9, 10, 32, 34, 44, 58, 91, 92, 93, 123, 125, 0xC3, 0xED, 0xFF])]
        )
    elif what == 2 and data:
        del data[min(position, len(data) - 1)]
    elif what == 3:
        del data[position:]
    elif what == 4:
        data[:0] = rng.choice([b" ", b"\n", b"\t\r", b"\x0c", b"\xef\xbb\xbf", b"\xc2\xa0", b"\x00"])
    else:
        data += rng.choice([b" ", b"\n", b"\x00", b"}", b",", b" \t"])
    return bytes(data)


def make_case(rng: random.Random) -> bytes:
    """The bytes of one generated file."""
    header, data_size = valid_case(rng)
    for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
        mutate_structure(header, rng)
    root: Any = header
    if rng.random() < 0.02:
        root = rng.choice([[], "x", 1, deep(3), Raw("")])
    text = render(root, rng if rng.random() < 0.3 else None).encode("utf-8", "surrogatepass")
    if rng.random() < 0.1:
        text = rng.choice([b" ", b"\n\t", b"\r"]) + text + rng.choice([b"", b"  "])
    if rng.random() < 0.25:
        text = mutate_bytes(text, rng)
    length = len(text)
    if rng.random() < 0.08:
        length = rng.choice([max(0, length - 1), length + 1, 0, 2**63, 2**64 - 1, 100_000_001, length + data_size + 1])
    data = bytes(rng.randrange(256) for _ in range(min(data_size, 64))) + bytes(max(0, data_size - 64))
    if rng.random() < 0.08:
        data = data[: rng.randrange(len(data) + 1)] if rng.random() < 0.5 else data + b"\0" * rng.choice([1, 7])
    prefix = struct.pack("<Q", length) if rng.random() > 0.01 else b"\x05\x00\x00"
    return prefix + text + data


def reference_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception:
        return False
    return True


class TensorMismatchError(Exception):
    """Our tensor differs from the reference's (counted as untyped: it fails the suite)."""


def compare_tensors(path: Path) -> None:
    """Open ``path`` with Checkpoint, read every tensor, and compare those the reference can give."""
    with Checkpoint.open(path) as checkpoint, safe_open(str(path), framework="pt") as reference:
        for name in checkpoint.keys():
            ours = checkpoint.tensor(name)
            try:
                theirs = reference.get_tensor(name)
            except Exception:  # dtypes the reference cannot give as torch tensors (F4, F6...)
                continue
            same = ours.shape == theirs.shape and ours.dtype == theirs.dtype
            if not same or not torch.equal(ours.reshape(-1).view(torch.uint8), theirs.reshape(-1).view(torch.uint8)):
                raise TensorMismatchError(f"{name}: ours {ours.dtype} {tuple(ours.shape)}, reference {theirs.dtype}")


def run_case(path: Path, raw: bytes) -> str:
    """Write ``raw`` to ``path`` and check our reader against the reference; return the outcome."""
    path.write_bytes(raw)
    should_fail = not reference_accepts(path)
    outcome: str = harness.check("header", lambda: read_header(path), should_fail=should_fail, example=raw)
    if outcome == "ok":
        harness.check("header-tensors", lambda: compare_tensors(path), should_fail=None, example=raw)
    return outcome


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz-header") / "case.safetensors"
    path.write_bytes(struct.pack("<Q", 2) + b"{}")
    reference_accepts(path)  # the reference's first call imports torch support: keep it out of the first case
    return path


def test_fuzz_header_mutations(scratch: Path) -> None:
    rng = random.Random(20211)
    outcomes: dict[str, int] = {}
    for _ in range(CASES):
        outcome = run_case(scratch, make_case(rng))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # the generator must exercise both verdicts substantially, or the suite proves little
    assert outcomes.get("ok", 0) > CASES // 10 and outcomes.get("typed", 0) > CASES // 3, outcomes


json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.sampled_from(NUMBERS + STRINGS),
    lambda inner: st.lists(inner, max_size=3) | st.lists(st.tuples(st.text(max_size=4), inner), max_size=3).map(Obj),
    max_leaves=12,
)  # fmt: skip


@settings(max_examples=int(os.environ.get("DIFFSTUDIO_FUZZ_HEADER_EXAMPLES", 20000 if harness.LONG else 300)))
@given(seed=st.integers(0, 2**32), extra=json_values, where=st.sampled_from(["field", "metadata", "name", "root"]))
def test_fuzz_header_hypothesis(scratch: Path, seed: int, extra: Any, where: str) -> None:
    rng = random.Random(seed)
    header, data_size = valid_case(rng)
    tensors = [v for k, v in header if isinstance(v, Obj) and k != "__metadata__"]
    if where == "field" and tensors:
        tensors[0].append(("extra", extra))
    elif where == "metadata":
        header.insert(0, ("__metadata__", Obj([("k", extra)])))
    elif where == "name" and isinstance(extra, (str, Raw)):
        header.append((extra, Obj([("dtype", "U8"), ("shape", [0]), ("data_offsets", [data_size, data_size])])))
    else:
        header.append(("x", extra))
    text = render(header, rng).encode("utf-8", "surrogatepass")
    run_case(scratch, struct.pack("<Q", len(text)) + text + bytes(data_size))


def test_generator_is_deterministic() -> None:
    make: Callable[[int], bytes] = lambda seed: make_case(random.Random(seed))  # noqa: E731
    assert [make(s) for s in range(20)] == [make(s) for s in range(20)]
