"""Atomic file writes and cached file hashes.

Nothing diffstudio writes ever appears half-written under its final name: data goes to a temporary file in the
same folder, is flushed and fsynced, and is renamed over the target with :func:`os.replace` (atomic on POSIX
and Windows when both names are on one file system). On any error the temporary file is removed and the
target is left as it was.

File hashes are SHA-256 (the A1111 "Model hash" is its first 10 hex digits). Hashing a 20 GB checkpoint takes
a while, so results are kept in a JSON cache keyed by (absolute path, size, mtime in ns): a file is hashed
again only when it changes. The cache lives in ``$DIFFSTUDIO_CACHE/hashes.json``, else
``$XDG_CACHE_HOME/diffstudio/hashes.json``, else ``~/.cache/diffstudio/hashes.json``; it is written
atomically, and an unreadable or corrupt cache is ignored (and rebuilt), never an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal, overload

#: Bytes read per chunk while hashing.
_CHUNK = 1 << 20
#: Format version of the hash cache file.
_CACHE_VERSION = 1
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_cache_lock = threading.Lock()


def _fsync_dir(folder: Path) -> None:
    """Persist a rename on POSIX by fsyncing the folder (not possible, nor needed, on Windows)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _open_temp(target: Path) -> tuple[int, Path]:
    """Create a new, empty temporary file next to ``target``; return its descriptor and path.

    ``os.open`` with mode 0o666 lets the umask decide the permissions, as for any ordinary new file (unlike
    :func:`tempfile.mkstemp`, which would leave the final file readable by its owner only).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(temp, flags, 0o666), temp
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue


@overload
def atomic_write(
    path: str | os.PathLike[str], mode: Literal["wb"] = "wb", *, encoding: str = "utf-8"
) -> contextlib.AbstractContextManager[IO[bytes]]: ...


@overload
def atomic_write(
    path: str | os.PathLike[str], mode: Literal["w"], *, encoding: str = "utf-8"
) -> contextlib.AbstractContextManager[IO[str]]: ...


def atomic_write(
    path: str | os.PathLike[str], mode: Literal["w", "wb"] = "wb", *, encoding: str = "utf-8"
) -> contextlib.AbstractContextManager[IO[Any]]:
    """Open ``path`` for writing so that it is replaced all at once, or not at all.

    Use it as a context manager: what is written goes to a temporary file beside ``path``; when the block
    ends normally the file is flushed, fsynced and renamed to ``path``; when it raises, the temporary file is
    deleted and ``path`` keeps its old content (or stays absent). Missing parent folders are created.

    Args:
        path: The final file name.
        mode: ``"wb"`` (bytes) or ``"w"`` (text).
        encoding: Text encoding for ``"w"``.

    Returns:
        A context manager yielding the open temporary file.

    Raises:
        ValueError: ``mode`` is neither ``"w"`` nor ``"wb"``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    return _atomic_write(Path(path), mode, encoding)


@contextlib.contextmanager
def _atomic_write(target: Path, mode: str, encoding: str) -> Iterator[IO[Any]]:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = _open_temp(target)
    try:
        if mode == "wb":
            handle: IO[Any] = os.fdopen(fd, "wb")
        else:
            handle = os.fdopen(fd, "w", encoding=encoding, newline="")
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def read_json(path: Path, *, max_bytes: int | None = None) -> Any:
    """Parse the small JSON file at ``path`` (a config, an index, a description).

    Raises:
        ValueError: It holds more than ``max_bytes`` bytes (checked before reading), is not UTF-8, is not JSON, or
            is nested too deeply to parse (Python's ``RecursionError``); the message says which, without the path.
        OSError: It cannot be read.
    """
    if max_bytes is not None:
        size = path.stat().st_size
        if size > max_bytes:
            raise ValueError(f"it is {size} bytes, more than the {max_bytes} such a file may hold")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError("its JSON is nested too deeply to parse") from None


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`); return the path."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`); return the path."""
    with atomic_write(path, "w", encoding=encoding) as handle:
        handle.write(text)
    return Path(path)


# ----------------------------------------------------------------------------------------------------------
# hashes
# ----------------------------------------------------------------------------------------------------------


def hash_cache_path() -> Path:
    """Return the hash cache file this process uses (see the module docstring)."""
    folder = os.environ.get("DIFFSTUDIO_CACHE")
    if folder:
        return Path(folder).expanduser() / "hashes.json"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "diffstudio" / "hashes.json"


def _load_cache(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        return {}
    entries = data.get("entries")
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items() if isinstance(k, str) and isinstance(v, dict)}


def _store_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Add one entry, re-reading the file first so that entries other processes wrote are kept.

    Entries of files that no longer exist are dropped. Failures (read-only home, full disk) are ignored: the
    cache only saves time.
    """
    with _cache_lock:
        entries = _load_cache(path)
        entries[key] = entry
        entries = {k: v for k, v in entries.items() if os.path.exists(k)}
        payload = json.dumps({"version": _CACHE_VERSION, "entries": entries}, indent=0, sort_keys=True)
        with contextlib.suppress(OSError):
            atomic_write_text(path, payload)


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hub_blob_sha256(path: Path) -> str | None:
    """The SHA-256 a Hugging Face cache already states for ``path``, when it does.

    In the hub cache, ``snapshots/<commit>/<file>`` links to ``blobs/<name>``, and for files stored with Git
    LFS (every weight file) ``<name>`` is the content's SHA-256, checked by the client when it downloaded it.
    Smaller, non-LFS files are named by their git SHA-1 (40 hex digits) and are hashed normally.
    """
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.parent.name == "blobs" and _SHA256_HEX.fullmatch(target.name):
        return target.name
    return None


def file_sha256(path: str | os.PathLike[str], *, use_cache: bool = True) -> str:
    """Return the SHA-256 of a file's content as 64 lowercase hex digits.

    Args:
        path: The file (symbolic links are followed).
        use_cache: Look the result up in, and add it to, the persistent hash cache.

    Returns:
        The hex digest.

    Raises:
        FileNotFoundError: The file does not exist.
        IsADirectoryError: ``path`` is a folder.
    """
    given = Path(path)
    stated = _hub_blob_sha256(given)
    if stated is not None:
        return stated
    real = given.resolve()
    stat = real.stat()
    if real.is_dir():
        raise IsADirectoryError(f"cannot hash {given}: it is a folder")
    if not use_cache:
        return _hash_file(real)
    key = str(real)
    cache_file = hash_cache_path()
    entry = _load_cache(cache_file).get(key)
    if (
        entry is not None
        and entry.get("size") == stat.st_size
        and entry.get("mtime_ns") == stat.st_mtime_ns
        and isinstance(entry.get("sha256"), str)
    ):
        return str(entry["sha256"])
    digest = _hash_file(real)
    _store_cache(cache_file, key, {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest})
    return digest


def short_hash(path: str | os.PathLike[str], *, use_cache: bool = True) -> str:
    """Return the first 10 hex digits of the file's SHA-256: the "Model hash" A1111 and CivitAI show."""
    return file_sha256(path, use_cache=use_cache)[:10]
