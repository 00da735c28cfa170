"""The lazy :class:`Checkpoint` view over one or more weight files.

Opening a checkpoint reads only the safetensors headers (names, dtypes, shapes, offsets, metadata) and does
not import torch. Tensors are produced on demand as zero-copy CPU views of a private, read-only-on-disk memory
map of each file (one map per file, shared by all its tensors): the data is paged in from the page cache when
it is first touched, and writing to a tensor changes only this process's copy of the page, never the file.

Files that change while mapped: the operating system kills a process with SIGBUS when it touches a mapped page
that lies past the end of a file that was truncated after it was mapped, and no Python code can catch that. So
every file's size is checked against the size its header was validated with before each tensor is handed out
(:class:`CheckpointChangedError` otherwise), and diffstudio writes every file it produces to a temporary name
and renames it (:mod:`diffstudio._io`), which leaves the old inode, and every map of it, intact. What remains is
a file truncated in place by another program *after* its tensors were handed out (and before they were copied
or used): load such files from a folder nothing else writes to, or copy them first.
"""

from __future__ import annotations

import difflib
import os
import re
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from diffstudio.errors import CheckpointError, SafetensorsFormatError
from diffstudio.loading.pickle_policy import check_pickle_allowed, is_pickle_path, load_pickle_state_dict
from diffstudio.loading.safetensors_header import read_header
from diffstudio.loading.sources import CheckpointSource, ShardIndex, ShardIndexError, resolve_source

if TYPE_CHECKING:
    import torch

__all__ = [
    "Checkpoint",
    "CheckpointChangedError",
    "DuplicateTensorError",
    "TensorNotFoundError",
    "UnsupportedDtypeError",
    "tensors_view",
]

# safetensors dtype string -> name of the torch dtype attribute
_TORCH_DTYPES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "C64": "complex64",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
}
_INT64_MAX = 2**63 - 1
_SAFETENSORS_DTYPES = {torch_name: st_name for st_name, torch_name in _TORCH_DTYPES.items()}


class DuplicateTensorError(CheckpointError):
    """The same tensor name appears in more than one file of a checkpoint."""


class TensorNotFoundError(CheckpointError, KeyError):
    """A tensor name is not in the checkpoint."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnsupportedDtypeError(CheckpointError):
    """A tensor's dtype (or a dimension beyond 64-bit signed sizes) has no torch equivalent in this torch build."""


class CheckpointChangedError(SafetensorsFormatError):
    """A file changed size between reading its header and memory-mapping it."""


@dataclass(frozen=True)
class _Entry:
    """Where one tensor lives.

    ``offset`` is the absolute file offset of the data (-1 for tensors loaded from a pickle file).
    """

    dtype: str
    shape: tuple[int, ...]
    file: int
    offset: int
    nbytes: int


def _natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders ``blocks.2`` before ``blocks.10``."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part)


class Checkpoint:
    """A lazy, read-only view of the tensors in one or more weight files.

    Build it with :meth:`open`. Only headers are read at open time; :meth:`tensor` and :meth:`state_dict`
    return memory-mapped CPU tensors without copying.

    Attributes:
        source: Human-readable description of what was opened, for messages.
        files: The weight files, absolute, in a stable order.
    """

    def __init__(
        self,
        source: str,
        files: tuple[Path, ...],
        entries: dict[str, _Entry],
        metadata: dict[str, str],
        file_sizes: tuple[int, ...],
        pickled: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.source = source
        self.files = files
        self._entries = entries
        self._keys = sorted(entries)
        self._metadata = metadata
        self._file_sizes = file_sizes
        self._pickled: dict[str, torch.Tensor] = pickled or {}
        self._storages: dict[int, torch.UntypedStorage] = {}

    # -- construction ----------------------------------------------------------------------------------------

    @classmethod
    def open(cls, source: CheckpointSource, *, allow_pickle: bool = False) -> Checkpoint:
        """Open a checkpoint, reading only its headers.

        Args:
            source: A ``.safetensors`` file; a list/tuple of files (shards); a folder (its
                ``*.safetensors.index.json`` if present, else every ``*.safetensors`` directly inside it);
                a ``*.index.json`` file; or a glob string (``*``, ``?``, ``[``).
            allow_pickle: Opt in to ``.bin/.pt/.pth/.ckpt`` files, loaded with ``torch.load(weights_only=True,
                mmap=True)`` on torch >= 2.6 only.

        Returns:
            The lazy view.

        Raises:
            PickleRefusedError: a pickle file without ``allow_pickle=True`` (or on torch < 2.6).
            SafetensorsFormatError: a file is truncated or corrupt (a subclass says how).
            DuplicateTensorError: a tensor name appears in two files.
            ShardIndexError: an index names a missing shard, or disagrees with the shards' contents.
            CheckpointError: other subclasses for missing paths, unsupported files, folders without weights.
        """
        resolved = resolve_source(source)
        for file in resolved.files:
            if is_pickle_path(file):
                check_pickle_allowed(file, allow_pickle)
        entries: dict[str, _Entry] = {}
        metadata: dict[str, str] = {}
        sizes: list[int] = []
        pickled: dict[str, torch.Tensor] = {}
        duplicates: list[str] = []
        for index, file in enumerate(resolved.files):
            if is_pickle_path(file):
                tensors = load_pickle_state_dict(file)
                sizes.append(file.stat().st_size)
                found = {name: _pickle_entry(t, index) for name, t in tensors.items()}
            else:
                header = read_header(file)
                sizes.append(header.file_size)
                for key, value in header.metadata.items():
                    metadata.setdefault(key, value)
                found = {
                    name: _Entry(info.dtype, info.shape, index, header.data_start + info.begin, info.nbytes)
                    for name, info in header.tensors.items()
                }
                tensors = {}
            for name, entry in found.items():
                if name in entries:
                    duplicates.append(f"{name!r} in {resolved.files[entries[name].file]} and {file}")
                    continue
                entries[name] = entry
                if name in tensors:
                    pickled[name] = tensors[name]
        if duplicates:
            raise DuplicateTensorError(
                f"The checkpoint {resolved.description} holds {len(duplicates)} tensor name(s) in more "
                "than one "
                f"file: {'; '.join(duplicates[:10])}{' ...' if len(duplicates) > 10 else ''}. The files are "
                "probably two variants of the same weights (e.g. fp16 and fp32, or an old and a new "
                "download); "
                f"pass only the files of one variant."
            )
        for shard_index in resolved.indexes:
            _check_index(shard_index, entries, resolved.files)
        return cls(resolved.description, resolved.files, entries, metadata, tuple(sizes), pickled)

    # -- container protocol ----------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Return all tensor names, sorted."""
        return list(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, {len(self)} tensors, {self.nbytes / 1e9:.3f} GB)"

    # -- header information ----------------------------------------------------------------------------------

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._keys, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise TensorNotFoundError(f"The checkpoint {self.source} has no tensor {name!r}.{hint}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Return the shape of tensor ``name`` (``()`` for a scalar)."""
        return self._entry(name).shape

    def dtype_name(self, name: str) -> str:
        """Return the safetensors dtype string of tensor ``name``, e.g. ``"BF16"``."""
        return self._entry(name).dtype

    def torch_dtype(self, name: str) -> torch.dtype:
        """Return the torch dtype of tensor ``name`` (imports torch).

        Raises:
            UnsupportedDtypeError: the dtype (e.g. ``F4``) has no equivalent in the installed torch.
        """
        import torch

        entry = self._entry(name)
        if name in self._pickled:
            return self._pickled[name].dtype
        attribute = _TORCH_DTYPES.get(entry.dtype)
        dtype = getattr(torch, attribute, None) if attribute else None
        if not isinstance(dtype, torch.dtype):
            raise UnsupportedDtypeError(
                f"Tensor {name!r} in {self.files[entry.file]} has dtype {entry.dtype}, which torch "
                f"{torch.__version__} cannot represent. Upgrade torch or convert the checkpoint."
            )
        return dtype

    @property
    def nbytes(self) -> int:
        """Total size of all tensor data in bytes."""
        return sum(entry.nbytes for entry in self._entries.values())

    @property
    def metadata(self) -> dict[str, str]:
        """The merged ``__metadata__`` of all files (for a key in several files, the first file's value)."""
        return dict(self._metadata)

    def file_of(self, name: str) -> Path:
        """Return the file that holds tensor ``name``."""
        return self.files[self._entry(name).file]

    def has_prefix(self, prefix: str) -> bool:
        """Return True when some tensor name starts with ``prefix``."""
        position = bisect_left(self._keys, prefix)
        return position < len(self._keys) and self._keys[position].startswith(prefix)

    def keys_matching(self, pattern: str | re.Pattern[str]) -> list[str]:
        """Return the sorted names in which ``pattern`` is found (``re.search``; anchor with ``^``/``$``)."""
        compiled = re.compile(pattern) if isinstance(pattern, str) else pattern
        return [name for name in self._keys if compiled.search(name)]

    def telling_keys(self, limit: int = 8) -> list[str]:
        """Return a short, informative sample of tensor names with shapes, for error messages.

        Names are grouped by their leading components (at the first depth where they differ, with block
        numbers folded together), the ``limit`` largest groups are kept, and each is shown by its largest
        tensor in the first block, e.g. ``double_blocks.0.img_mlp.0.weight [12288, 3072] (342 tensors)``.

        Args:
            limit: Most entries to return.

        Returns:
            Lines ``"<name> [<shape>]"``, sorted by name, plus the group size when it exceeds one.
        """
        if not self._keys or limit <= 0:
            return []
        split = [name.split(".") for name in self._keys]
        depth = 1
        while depth < 4 and len({tuple(parts[:depth]) for parts in split}) == 1:
            depth += 1
        groups: dict[tuple[str, ...], list[str]] = {}
        for name, parts in zip(self._keys, split):
            head = parts[: depth + 1] if len(parts) > depth and parts[depth].isdigit() else parts[:depth]
            group = tuple("#" if part.isdigit() else part for part in head)
            groups.setdefault(group, []).append(name)
        largest = sorted(groups.values(), key=lambda names: (-len(names), _natural_key(names[0])))[:limit]
        lines = []
        for names in largest:
            best = min(
                names,
                key=lambda n: (
                    -_numel(self._entries[n].shape),
                    -len(self._entries[n].shape),
                    _natural_key(n),
                ),
            )
            count = f" ({len(names)} tensors)" if len(names) > 1 else ""
            lines.append(f"{best} {list(self._entries[best].shape)}{count}")
        return sorted(lines, key=_natural_key)

    # -- tensors ---------------------------------------------------------------------------------------------

    def _check_unchanged(self, file: int) -> int:
        """Return the file's size after checking it is still the size its header was validated against.

        A memory-mapped file that shrinks kills the process with SIGBUS on the next touch of a page past its new
        end; this check, made before every tensor is handed out, turns a file that is being rewritten (a download
        cache, a checkpoint written in place) into a typed error instead. Pages already handed out stay mapped:
        see :class:`Checkpoint`.
        """
        path = self.files[file]
        try:
            size = os.stat(path).st_size
        except OSError as exc:
            raise CheckpointChangedError(
                f"{path} can no longer be read ({exc.strerror}) after its header was read; it was moved or deleted. "
                "Open the checkpoint again."
            ) from None
        if size != self._file_sizes[file]:
            raise CheckpointChangedError(
                f"{path} changed size from {self._file_sizes[file]} to {size} bytes after its header was read; it "
                "is being written or was replaced. Wait for the download to finish, then open it again."
            )
        return size

    def _storage(self, file: int) -> torch.UntypedStorage:
        import torch

        size = self._check_unchanged(file)
        storage = self._storages.get(file)
        if storage is None:
            path = self.files[file]
            mapped = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
            storage = cast("torch.UntypedStorage", mapped)
            self._storages[file] = storage
        return storage

    def tensor(self, name: str) -> torch.Tensor:
        """Return tensor ``name`` as a CPU tensor backed by the file's memory map (no copy).

        Writing to the tensor is copy-on-write: the file is never modified. A tensor whose data offset is not
        a
        multiple of its element size (possible only in hand-made files) is copied into aligned memory.

        Raises:
            TensorNotFoundError: no such tensor.
            UnsupportedDtypeError: its dtype has no torch equivalent.
        """
        import torch

        entry = self._entry(name)
        pickled = self._pickled.get(name)
        if pickled is not None:
            return pickled
        dtype = self.torch_dtype(name)
        if any(dim > _INT64_MAX for dim in entry.shape):  # valid safetensors when another dimension is 0
            raise UnsupportedDtypeError(
                f"Tensor {name!r} in {self.files[entry.file]} has shape {list(entry.shape)}, with a dimension "
                "beyond torch's 64-bit signed sizes; torch cannot represent it. Re-export the checkpoint."
            )
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=dtype)
        storage = self._storage(entry.file)
        itemsize = dtype.itemsize
        if entry.offset % itemsize:
            raw = torch.empty(0, dtype=torch.uint8).set_(storage, entry.offset, (entry.nbytes,), (1,))
            return raw.clone().view(dtype).reshape(entry.shape)
        strides = _contiguous_strides(entry.shape)
        return torch.empty(0, dtype=dtype).set_(storage, entry.offset // itemsize, entry.shape, strides)

    def state_dict(self, names: Iterable[str] | None = None, *, prefetch: bool = True) -> dict[str, torch.Tensor]:
        """Return ``{name: tensor}`` for ``names`` (default: all, sorted), memory-mapped like ``tensor``.

        With ``prefetch`` (the default) their pages are first read in parallel (:meth:`prefetch`): a caller
        that asks for a state dict is about to read all of it.
        """
        wanted = self._keys if names is None else list(names)
        if prefetch:
            self.prefetch(wanted)
        return {name: self.tensor(name) for name in wanted}

    def prefetch(self, names: Iterable[str] | None = None) -> int:
        """Read the pages of ``names`` (default: all) into the page cache from several threads, and wait.

        The tensors stay memory-mapped; later touches are page-cache hits instead of one read-ahead window per
        fault in module order (:mod:`diffstudio.loading.readahead` has the figures and the cases it skips).

        Returns:
            Bytes read: 0 for small requests, pickle checkpoints, more than half the available memory, or
            ``DIFFSTUDIO_READAHEAD=0``.

        Raises:
            TensorNotFoundError: a name is not in the checkpoint.
        """
        from diffstudio.loading.readahead import read_in_parallel

        ranges: dict[int, list[tuple[int, int]]] = {}
        for name in self._keys if names is None else names:
            entry = self._entry(name)
            if entry.offset >= 0 and entry.nbytes and name not in self._pickled:
                ranges.setdefault(entry.file, []).append((entry.offset, entry.nbytes))
        return read_in_parallel((self._storage(file), spans) for file, spans in sorted(ranges.items()))

    def close(self) -> None:
        """Drop this view's memory maps; tensors already returned keep theirs alive."""
        self._storages.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides: list[int] = []
    step = 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))


def _pickle_entry(tensor: Any, file: int) -> _Entry:
    torch_name = str(tensor.dtype).removeprefix("torch.")
    dtype = _SAFETENSORS_DTYPES.get(torch_name, f"torch.{torch_name}")
    return _Entry(dtype, tuple(tensor.shape), file, -1, tensor.numel() * tensor.element_size())


def _check_index(index: ShardIndex, entries: dict[str, _Entry], files: tuple[Path, ...]) -> None:
    """Check that every tensor is in the shard ``index`` names, and every tensor of its shards is listed."""
    problems: list[str] = []
    for name, shard in index.weight_map.items():
        entry = entries.get(name)
        if entry is None:
            problems.append(f"{name!r} is listed in {shard.name} but no shard holds it")
        elif files[entry.file] != shard:
            problems.append(f"{name!r} is listed in {shard.name} but is in {files[entry.file].name}")
    shards = set(index.shards)
    for name, entry in entries.items():
        if files[entry.file] in shards and name not in index.weight_map:
            problems.append(f"{name!r} in {files[entry.file].name} is not listed in the index")
    if problems:
        more = f" ... ({len(problems)} problems)" if len(problems) > 10 else ""
        raise ShardIndexError(
            f"The shard index {index.path} disagrees with its shards: {'; '.join(problems[:10])}{more}. The "
            f"index and the shards come from different versions or a download is incomplete; download the "
            f"model again."
        )


def tensors_view(source: str, tensors: dict[str, torch.Tensor], files: tuple[Path, ...] = ()) -> Checkpoint:
    """A :class:`Checkpoint` over tensors already in memory: one part of a file that holds several components.

    A plugin that splits one file into components (e.g. a decoder file holding a whole DiT beside its adapter)
    converts the part a family owns and hands this view to ``load_model``, so the family builds its module from
    it as from a file of its own.

    Args:
        source: What the tensors are, for messages (e.g. ``"edit_decoder.bin [DiT part]"``).
        tensors: Names mapped to CPU tensors (they are used as they are: no copy).
        files: The file(s) they came from (a ``config.json`` beside the first is read as the component's).

    Returns:
        The view; its tensors are served from ``tensors``.
    """
    entries = {name: _pickle_entry(tensor, 0) for name, tensor in tensors.items()}
    size = sum(entry.nbytes for entry in entries.values())
    return Checkpoint(source, tuple(files), entries, {}, (size,), dict(tensors))
