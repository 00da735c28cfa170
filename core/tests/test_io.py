"""Atomic writes and cached SHA-256 hashes."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from diffstudio._io import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    file_sha256,
    hash_cache_path,
    short_hash,
)


class Boom(RuntimeError):
    pass


@pytest.fixture
def cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "cache"
    monkeypatch.setenv("DIFFSTUDIO_CACHE", str(folder))
    yield folder


def test_round_trip_and_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "out.bin"
    assert atomic_write_bytes(target, b"one") == target
    assert target.read_bytes() == b"one"
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    text = tmp_path / "t.txt"
    atomic_write_text(text, "h\u00e9llo\r\nworld")
    assert text.read_bytes() == "h\u00e9llo\r\nworld".encode()
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_failure_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "image.png"
    with pytest.raises(Boom), atomic_write(target) as handle:
        handle.write(b"half of it")
        handle.flush()
        assert target.exists() is False  # the data goes elsewhere until the end
        raise Boom
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"previous")
    with pytest.raises(Boom), atomic_write(target, "w") as text:
        text.write("new content")
        raise Boom
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]


def test_new_files_get_ordinary_permissions(tmp_path: Path) -> None:
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    old = os.umask(0o022)
    try:
        path = atomic_write_bytes(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_bad_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        atomic_write(tmp_path / "f", "a")  # type: ignore[call-overload]


def test_hash_matches_hashlib_and_short_hash(cache_dir: Path, tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert file_sha256(path) == expected
    assert short_hash(path) == expected[:10]
    assert file_sha256(path, use_cache=False) == expected


def test_cache_is_used_and_invalidated(cache_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights v1")
    real = hashlib.sha256(b"weights v1").hexdigest()
    assert file_sha256(path) == real
    cache_file = cache_dir / "hashes.json"
    assert hash_cache_path() == cache_file
    data = json.loads(cache_file.read_text())
    entry = data["entries"][str(path.resolve())]
    assert entry["sha256"] == real and entry["size"] == len(b"weights v1")
    # A second call must answer from the cache without reading the file: plant a different digest.
    entry["sha256"] = "f" * 64
    cache_file.write_text(json.dumps(data))
    assert file_sha256(path) == "f" * 64
    # A changed file (size and mtime) is hashed again.
    path.write_bytes(b"weights version 2")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))
    assert file_sha256(path) == hashlib.sha256(b"weights version 2").hexdigest()


def test_corrupt_or_unwritable_cache_is_ignored(cache_dir: Path, tmp_path: Path) -> None:
    cache_dir.mkdir()
    (cache_dir / "hashes.json").write_text("{not json")
    path = tmp_path / "a.bin"
    path.write_bytes(b"abc")
    assert file_sha256(path) == hashlib.sha256(b"abc").hexdigest()
    assert json.loads((cache_dir / "hashes.json").read_text())["version"] == 1
    other = tmp_path / "b.bin"
    other.write_bytes(b"def")
    file_sha256(other)
    entries = json.loads((cache_dir / "hashes.json").read_text())["entries"]
    assert set(entries) == {str(path.resolve()), str(other.resolve())}
    (cache_dir / "hashes.json").unlink()
    cache_dir.rmdir()
    cache_dir.write_text("a file where the folder should be")
    assert file_sha256(path) == hashlib.sha256(b"abc").hexdigest()


def test_use_cache_false_writes_nothing(cache_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"abc")
    file_sha256(path, use_cache=False)
    assert not cache_dir.exists()


def test_cache_location_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DIFFSTUDIO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hash_cache_path() == tmp_path / "xdg" / "diffstudio" / "hashes.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hash_cache_path() == tmp_path / "home" / ".cache" / "diffstudio" / "hashes.json"


def test_hub_blob_name_is_trusted(cache_dir: Path, tmp_path: Path) -> None:
    """A hub snapshot links to blobs/<sha256>; that name is the hash, so the file is not read."""
    stated = "0123456789abcdef" * 4
    blob = tmp_path / "blobs" / stated
    blob.parent.mkdir()
    blob.write_bytes(b"content whose real hash differs")
    link = tmp_path / "snapshots" / "c0ffee" / "model.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    assert file_sha256(link) == stated
    assert file_sha256(blob) == hashlib.sha256(b"content whose real hash differs").hexdigest()


def test_missing_and_folder(cache_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        file_sha256(tmp_path / "nope")
    with pytest.raises(IsADirectoryError):
        file_sha256(tmp_path)


def test_read_json_refuses_large_bad_and_deeply_nested_files(tmp_path: Path) -> None:
    from diffstudio._io import read_json

    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2]}')
    assert read_json(good, max_bytes=100) == {"a": [1, 2]}
    with pytest.raises(ValueError, match="more than the 5"):
        read_json(good, max_bytes=5)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        read_json(deep)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"\xe9": 1}')
    with pytest.raises(ValueError):
        read_json(latin)
    with pytest.raises(OSError):
        read_json(tmp_path / "missing.json")


def test_deeply_nested_config_json_and_shard_index_are_typed_errors(tmp_path: Path) -> None:
    from diffstudio.errors import ConfigError
    from diffstudio.loading.component_config import explicit_config
    from diffstudio.loading.sources import ShardIndexError, read_index

    deep = tmp_path / "config.json"
    deep.write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConfigError, match="nested too deeply"):
        explicit_config(deep)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(deep.read_text())
    with pytest.raises(ShardIndexError, match="nested too deeply"):
        read_index(index)
