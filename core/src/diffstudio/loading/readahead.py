"""Reading a checkpoint's pages in parallel before a model touches them one fault at a time.

A memory-mapped tensor is read from disk by page faults when it is first touched. Each fault reads at most the
device's read-ahead window (often 128 KiB), one tensor after another in module order, so a cold load is one
slow stream. :func:`read_in_parallel` instead touches one byte per page of the requested byte ranges from
a few threads (torch reductions release the GIL), which keeps several streams in flight. The tensors stay
memory-mapped: the pages land in the (reclaimable) page cache and nothing is copied.

Measured on the 2-core benchmark VM, caches below the VM levelled, page cache empty, paired runs:

* FLUX.2 medium BFL file (0.95 GB): model-order faults 1.03-1.38 s; 8 threads on 32 MiB chunks 0.75-1.03 s;
  4 threads on 64 MiB chunks 0.66-0.83 s; diffusers' ``from_single_file`` 0.92-1.22 s;
* FLUX.1 3072-wide BFL file (2.18 GB): model-order faults 1.50-1.93 s; 8 threads 1.22-1.53 s; 4 threads on
  64 MiB chunks 1.36-1.43 s; diffusers 1.32-2.18 s.

The load benchmarks' ratios move more with the disk's state than with these settings (FLUX.1 BFL file, five runs
this session: 0.74 to 1.00 of diffusers).

Skipped for small requests (faults are cheap there), when the bytes exceed half of the memory the system
reports available (the faults then read only what is used), and when ``DIFFSTUDIO_READAHEAD=0`` is set.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from diffstudio._env import switch_on

if TYPE_CHECKING:
    import torch

__all__ = ["MIN_BYTES", "THREADS", "available_memory_bytes", "coalesce", "read_ahead_enabled", "read_in_parallel"]

THREADS = 4
"""Reader threads (I/O-bound). In paired runs 4 threads on 64 MiB chunks beat 8 and 16 on 32 MiB and 8 on 8 MiB
for the 0.95 GB FLUX.2 file, and were level with 6 and 8 for the 2.18 GB FLUX.1 file."""

MIN_BYTES = 64 << 20
"""Requests smaller than this are left to the page faults."""

CHUNK_BYTES = 64 << 20
"""Each thread reads ranges of at most this size at a time."""

MERGE_GAP_BYTES = 1 << 20
"""Ranges closer than this are read as one (the gap is read too; cheaper than another stream)."""

PAGE = 4096


def read_ahead_enabled() -> bool:
    """False when ``DIFFSTUDIO_READAHEAD`` is ``0``, ``false``, ``no`` or ``off``."""
    return switch_on("DIFFSTUDIO_READAHEAD")


def available_memory_bytes() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` in bytes, or None where the system does not report it."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def coalesce(ranges: Iterable[tuple[int, int]], gap: int = MERGE_GAP_BYTES) -> list[tuple[int, int]]:
    """Merge ``(offset, length)`` byte ranges, sorted by offset, that overlap or lie within ``gap`` bytes.

    Empty ranges are dropped. Example: ``[(0, 10), (12, 5), (100, 1)]`` with ``gap=4`` gives ``[(0, 17),
    (100, 1)]``.
    """
    merged: list[tuple[int, int]] = []
    for offset, length in sorted(r for r in ranges if r[1] > 0):
        if merged and offset <= merged[-1][0] + merged[-1][1] + gap:
            start, previous = merged[-1]
            merged[-1] = (start, max(previous, offset + length - start))
        else:
            merged.append((offset, length))
    return merged


def _chunks(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    return [(start, min(size, offset + length - start)) for offset, length in ranges
            for start in range(offset, offset + length, size)]  # fmt: skip


def _touch(storage: torch.UntypedStorage, offset: int, length: int) -> None:
    import torch

    pages = torch.empty(0, dtype=torch.uint8).set_(storage, offset, (length,), (1,))
    pages[::PAGE].sum()  # one byte per page; the reduction runs without the GIL


def read_in_parallel(requests: Iterable[tuple[torch.UntypedStorage, list[tuple[int, int]]]]) -> int:
    """Fault in the given byte ranges of memory-mapped storages from :data:`THREADS` threads; wait for them.

    Args:
        requests: ``(storage, [(offset, length), ...])`` per mapped file; ranges are coalesced per storage.

    Returns:
        The bytes read (0 when skipped: small, larger than half the available memory, or turned off).
    """
    plan = [(storage, coalesce(ranges)) for storage, ranges in requests]
    total = sum(length for _, ranges in plan for _, length in ranges)
    if not read_ahead_enabled() or total < MIN_BYTES:
        return 0
    available = available_memory_bytes()
    if available is not None and total > available // 2:
        return 0
    work = [(storage, start, length) for storage, ranges in plan for start, length in _chunks(ranges, CHUNK_BYTES)]
    with ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="diffstudio-readahead") as pool:
        for _ in pool.map(lambda job: _touch(*job), work):
            pass
    return total
