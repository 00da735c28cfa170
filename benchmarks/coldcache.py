"""Cold-cache preparation shared by the load benchmarks (``flux1.py``, ``flux2.py``).

"Cold" here means: the weight files are not in this machine's page cache, so the load reads them through the
block device. On a virtual machine that device has caches of its own (the host's page cache, the storage
backend's), which this process cannot evict. Their state decided the figures: measured on the benchmark VM
(0.95 GB BFL file, page cache emptied before every run, with ``fincore`` confirming 0 resident pages), the same
diffstudio load took 0.37-0.55 s when the file had last been read by a diffstudio run and 1.0-1.3 s right after a
diffusers run, and the load benchmark always ran diffusers right after diffstudio on the same file.

:func:`level_and_evict` therefore reads every file once, sequentially, before evicting it: each timed run then
starts from the same state (blocks warm below the VM, cold in its page cache), whichever side ran before it.
The load benchmarks also alternate which side runs first in each repeat.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["evict", "level_and_evict", "weight_files"]

CHUNK = 16 << 20


def weight_files(paths: Iterable[Path]) -> list[Path]:
    """The files of ``paths``: a file stands for itself, a folder for the files directly inside it."""
    return [file for path in paths for file in ([path] if path.is_file() else sorted(path.iterdir())) if file.is_file()]


def evict(paths: Iterable[Path]) -> None:
    """Drop the files of ``paths`` from the page cache (``POSIX_FADV_DONTNEED``)."""
    for file in weight_files(paths):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def level_and_evict(paths: Iterable[Path]) -> None:
    """Read the files of ``paths`` once (levelling the caches below this machine), then :func:`evict` them."""
    files = weight_files(paths)
    buffer = bytearray(CHUNK)
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    evict(files)
