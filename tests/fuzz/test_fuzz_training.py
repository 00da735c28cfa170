"""Fuzz the trainer's input checks: data set metadata rows and checkpoint folders (no training runs).

``training-data``: one-row metadata files whose file column names a target of a prepared data set folder (valid
images, links inside and out, empty, truncated, text, decompression-bomb and zero-sized PNGs, a folder, a missing
file, a link loop) spelt in several ways (relative, absolute, ``./`` and ``dir/..`` detours, through a linked
folder), or a non-text value, or random text, with and without ``allow_outside``. The oracle knows each target:
a row must be refused exactly when its target is not a readable, safe image or lies outside the data set and
``allow_outside`` is off (random text: either, but typed).

``training-checkpoint``: a valid checkpoint folder (a toy objective, AdamW and an EMA) whose
``trainer_state.json`` is replaced by generated JSON (the oracle re-derives the format's rules), by random bytes,
or whose part files are truncated, overwritten by a pickle or flipped; :func:`read_checkpoint` checks it. A
payload pickle must never run.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio.testing import import_file
from diffstudio.train.checkpoints import FORMAT, TrainerState, TrainingParts, read_checkpoint, save_checkpoint
from diffstudio.train.data import TrainingDataset
from diffstudio.train.ema import EmaWeights
from diffstudio.train.optim import adamw
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

harness = import_file(Path(__file__).resolve().parent / "harness.py")

CASES = 2000 if harness.LONG else 150


# -- data sets ---------------------------------------------------------------------------------------------


def _png(path: Path, width: int = 24, height: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (10, 200, 40)).save(path)
    return path


def _claiming(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose header claims ``width x height``."""
    data = bytearray(_png(path, 1, 1).read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


# target -> (path relative to the fixture root, inside the data set, a readable safe image)
TARGETS: dict[str, tuple[str, bool, bool]] = {
    "ok": ("data/img/ok.png", True, True),
    "jpeg": ("data/img/ok.jpg", True, True),
    "empty": ("data/img/empty.png", True, False),
    "truncated": ("data/img/truncated.png", True, False),
    "text": ("data/img/text.png", True, False),
    "bomb": ("data/img/bomb.png", True, False),
    "bomb_warning": ("data/img/bomb2.png", True, False),
    "zero_width": ("data/img/zero.png", True, False),
    "folder": ("data/img/folder.png", True, False),
    "missing": ("data/img/missing.png", True, False),
    "loop": ("data/loop.png", True, False),
    "link_inside": ("data/link_in.png", True, True),
    "link_outside": ("data/link_out.png", False, True),
    "through_linked_folder": ("data/linkdir/ok.png", False, True),
    "outside": ("outside/ok.png", False, True),
    "outside_bomb": ("outside/bomb.png", False, False),
    "outside_missing": ("outside/missing.png", False, False),
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-data")
    _png(root / "data/img/ok.png")
    Image.new("RGB", (20, 30)).save(root / "data/img/ok.jpg")
    (root / "data/img/empty.png").write_bytes(b"")
    (root / "data/img/truncated.png").write_bytes(_png(root / "t.png").read_bytes()[:40])
    (root / "data/img/text.png").write_text("not an image")
    _claiming(root / "data/img/bomb.png", 30000, 30000)
    _claiming(root / "data/img/bomb2.png", 10000, 9000)
    _claiming(root / "data/img/zero.png", 0, 7)
    (root / "data/img/folder.png").mkdir()
    (root / "data/loop.png").symlink_to(root / "data/loop.png")
    (root / "data/link_in.png").symlink_to(root / "data/img/ok.png")
    _png(root / "outside/ok.png")
    _claiming(root / "outside/bomb.png", 30000, 30000)
    (root / "data/link_out.png").symlink_to(root / "outside/ok.png")
    (root / "data/linkdir").symlink_to(root / "outside")
    return root


def _spell(root: Path, relative: str, how: str) -> str:
    target = root / relative
    inner = Path(relative).relative_to("data") if relative.startswith("data/") else Path("..") / relative
    if how == "absolute":
        return str(target)
    if how == "dot":
        return f"./{inner}"
    if how == "detour":
        return f"img/../{inner}"
    if how == "double_slash":
        return str(inner).replace("/", "//")
    return str(inner)


def _load(root: Path, value: Any, allow: bool, prompt: Any = "a prompt") -> None:
    with tempfile.TemporaryDirectory() as folder:
        metadata = Path(folder) / "metadata.json"
        metadata.write_text(json.dumps([{"image": value, "prompt": prompt}]))
        TrainingDataset(root / "data", metadata, height=16, width=16, allow_outside=allow)


_SPELLINGS = st.sampled_from(["relative", "absolute", "dot", "detour", "double_slash"])
_ODD_VALUES = st.one_of(
    st.integers(), st.none(), st.lists(st.text(max_size=3)), st.dictionaries(st.text(max_size=3), st.text(max_size=3)),
    st.just(""), st.just("img/ok.png\x00.txt"), st.just("x" * 5000), st.just("/"), st.just("."), st.just(".."),
)  # fmt: skip


@settings(max_examples=CASES)
@given(target=st.sampled_from(sorted(TARGETS)), how=_SPELLINGS, allow=st.booleans())
def test_fuzz_dataset_rows_naming_files(data_root: Path, target: str, how: str, allow: bool) -> None:
    relative, inside, valid = TARGETS[target]
    value = _spell(data_root, relative, how)
    should_fail = not valid or (not inside and not allow)
    harness.check(
        "training-data", lambda: _load(data_root, value, allow), should_fail=should_fail, example=(target, value, allow)
    )


@settings(max_examples=CASES)
@given(value=st.one_of(_ODD_VALUES, st.text(max_size=40)), allow=st.booleans(), prompt=st.sampled_from(["a", None, 3]))
def test_fuzz_dataset_odd_values(data_root: Path, value: Any, allow: bool, prompt: Any) -> None:
    odd = not isinstance(value, str) or value in ("", ".", "..", "/") or "\x00" in value or len(value) > 4096
    should_fail = True if odd or prompt != "a" else None  # random text may name a file: either outcome, typed
    harness.check(
        "training-data",
        lambda: _load(data_root, value, allow, prompt),
        should_fail=should_fail,
        example=(value, prompt),
    )


# -- checkpoints -------------------------------------------------------------------------------------------


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trained = nn.ModuleDict({"net": nn.Linear(3, 2)})


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.marker,))


def _parts() -> TrainingParts:
    torch.manual_seed(0)
    toy = _Toy()
    return TrainingParts(toy, adamw(toy.parameters(), lr=1e-2, weight_decay=0.0), EmaWeights(toy, 0.9))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    output = tmp_path_factory.mktemp("fuzz-checkpoint")
    parts = _parts()
    for _ in range(3):
        parts.module.trained["net"](torch.ones(1, 3)).sum().backward()
        parts.optimizer.step()
        parts.optimizer.zero_grad()
        parts.ema.update()  # type: ignore[union-attr]
    folder = save_checkpoint(Accelerator(cpu=True), output, TrainerState(3, 1, 2), parts)
    assert folder is not None
    read_checkpoint(folder, _parts())  # the unmutated folder is valid
    return folder


def _valid_state(record: Any) -> bool:
    """The oracle: whether a ``trainer_state.json`` value is acceptable for the fixture's ``step-3`` folder."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        return False

    def count(name: str, low: int = 0) -> bool:
        value = record.get(name)
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    if not all(count(n) for n in ("step", "epoch", "update_in_epoch")) or record["step"] != 3:
        return False
    if record["update_in_epoch"] > 3 or not count("processes", 1) or record["processes"] != 1:
        return False  # the folder has rng-0 only
    parts = record.get("parts")
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts) or "weights" not in parts:
        return False
    scaler = record.get("scaler")
    numbers = (int, float)
    return scaler is None or (
        isinstance(scaler, dict)
        and all(isinstance(v, numbers) and not isinstance(v, bool) and abs(v) < float("inf") for v in scaler.values())
    )


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 5), st.floats(allow_nan=True), st.text(max_size=4))
_FIELDS = {
    "format": st.one_of(st.just(FORMAT), st.just("diffstudio-train-checkpoint/1"), _SCALARS),
    "step": st.one_of(st.just(3), _SCALARS),
    "epoch": st.one_of(st.just(1), _SCALARS),
    "update_in_epoch": st.one_of(st.just(2), st.just(4), _SCALARS),
    "processes": st.one_of(st.just(1), st.just(2), _SCALARS),
    "parts": st.one_of(
        st.just(["weights", "optimizer", "ema"]),
        st.just(["weights", "optimizer"]),
        st.just(["optimizer"]),
        st.lists(st.one_of(st.sampled_from(["weights", "ema", "x"]), st.integers()), max_size=3),
        _SCALARS,
    ),  # fmt: skip
    "scaler": st.one_of(
        st.none(), st.dictionaries(st.sampled_from(["scale", "_growth_tracker"]), _SCALARS, max_size=2), _SCALARS
    ),
}
_RECORDS = st.fixed_dictionaries({}, optional=_FIELDS)
_VALID = st.fixed_dictionaries({k: st.just(v) for k, v in
                                {"format": FORMAT, "step": 3, "epoch": 1, "update_in_epoch": 2, "processes": 1,
                                 "parts": ["weights", "optimizer", "ema"], "scaler": None}.items()})  # fmt: skip


def _in_copy(checkpoint: Path, mutate: Any) -> None:
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "checkpoints" / checkpoint.name
        shutil.copytree(checkpoint, copy)
        mutate(copy)
        read_checkpoint(copy, _parts())


@settings(max_examples=CASES)
@given(record=st.one_of(_RECORDS, _VALID, st.recursive(_SCALARS, lambda c: st.lists(c, max_size=3), max_leaves=8)))
def test_fuzz_checkpoint_trainer_state(checkpoint: Path, record: Any) -> None:
    text = json.dumps(record)

    def mutate(folder: Path) -> None:
        (folder / "trainer_state.json").write_text(text)

    harness.check(
        "training-checkpoint", lambda: _in_copy(checkpoint, mutate), should_fail=not _valid_state(record), example=text
    )


_PART_FILES = ["weights.safetensors", "optimizer.safetensors", "ema.safetensors", "rng-0.safetensors",
               "trainer_state.json"]  # fmt: skip


@settings(max_examples=CASES)
@given(
    name=st.sampled_from(_PART_FILES),
    how=st.sampled_from(["truncate", "pickle", "torch_pickle", "flip", "bytes", "delete"]),
    where=st.floats(0, 1),
    noise=st.binary(max_size=64),
)
def test_fuzz_checkpoint_part_files(checkpoint: Path, name: str, how: str, where: float, noise: bytes) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        marker = Path(scratch) / "pwned"

        def mutate(folder: Path) -> None:
            path = folder / name
            data = path.read_bytes()
            at = int(where * (len(data) - 1))
            if how == "truncate":
                path.write_bytes(data[:at])
            elif how == "pickle":
                path.write_bytes(pickle.dumps(_Payload(marker)))
            elif how == "torch_pickle":
                torch.save({"state": _Payload(marker)}, path)
            elif how == "flip":
                path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
            elif how == "bytes":
                path.write_bytes(noise)
            else:
                path.unlink()

        size = (checkpoint / name).stat().st_size
        cut = (
            how == "truncate"
            and (checkpoint / name).read_bytes()[: int(where * (size - 1))].strip()
            == (checkpoint / name).read_bytes().strip()
        )  # only the JSON's final newline was cut
        # a flipped byte may land in tensor data (a different number, still a valid checkpoint): either outcome
        harness.check(
            "training-checkpoint",
            lambda: _in_copy(checkpoint, mutate),
            should_fail=None if how == "flip" or cut else True,
            example=(name, how, where, noise[:16]),
        )
        assert not marker.exists(), "a checkpoint pickle was unpickled"
