"""Parallel read-ahead of a checkpoint's pages: what it reads, what it skips, and that tensors stay mapped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffstudio.loading import Checkpoint
from diffstudio.loading import readahead as ra
from safetensors.torch import save_file


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(300, 100, generator=gen), "b": torch.randn(50, generator=gen),
               "c": torch.randn(700, 64, generator=gen)}, str(path))  # fmt: skip
    return path


def test_coalesce_merges_close_ranges_in_offset_order() -> None:
    assert ra.coalesce([(100, 1), (12, 5), (0, 10)], gap=4) == [(0, 17), (100, 1)]
    assert ra.coalesce([(0, 10), (5, 20), (40, 0)], gap=0) == [(0, 25)]
    assert ra.coalesce([]) == []


def test_chunks_cover_each_range_exactly() -> None:
    assert ra._chunks([(0, 10), (20, 3)], 4) == [(0, 4), (4, 4), (8, 2), (20, 3)]


def test_prefetch_reads_every_requested_byte_and_tensors_stay_mapped(
    weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ra, "MIN_BYTES", 0)
    monkeypatch.setattr(ra, "CHUNK_BYTES", 4096)  # several chunks per tensor, several threads
    monkeypatch.delenv("DIFFSTUDIO_READAHEAD", raising=False)
    checkpoint = Checkpoint.open(weights)
    sizes = {name: checkpoint.tensor(name).nbytes for name in checkpoint.keys()}
    assert checkpoint.prefetch(["a", "c"]) >= sizes["a"] + sizes["c"]
    state = checkpoint.state_dict()
    expected = {"a": (300, 100), "b": (50,), "c": (700, 64)}
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    storage = checkpoint._storage(0)
    assert all(t.untyped_storage().data_ptr() == storage.data_ptr() for t in state.values())  # zero copy


def test_small_requests_disabled_read_ahead_and_missing_names(weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = Checkpoint.open(weights)
    assert checkpoint.prefetch() == 0  # below MIN_BYTES: the faults are cheap
    monkeypatch.setattr(ra, "MIN_BYTES", 0)
    monkeypatch.setenv("DIFFSTUDIO_READAHEAD", "0")
    assert checkpoint.prefetch() == 0
    monkeypatch.delenv("DIFFSTUDIO_READAHEAD")
    monkeypatch.setattr(ra, "available_memory_bytes", lambda: 1000)  # more than half of what is available
    assert checkpoint.prefetch() == 0
    with pytest.raises(KeyError, match="nope"):
        checkpoint.prefetch(["nope"])


def test_state_dict_without_prefetch_reads_nothing_ahead(weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(Checkpoint, "prefetch", lambda self, names=None: calls.append(1) or 0)
    checkpoint = Checkpoint.open(weights)
    checkpoint.state_dict(prefetch=False)
    assert calls == []
    checkpoint.state_dict(["a"])
    assert calls == [1]
