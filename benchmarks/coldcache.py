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

:func:`plain_read` is the yardstick both loaders are measured against: a fresh process that maps the file and
reads one byte of every 4 KiB page from two threads, with no model at all (``python coldcache.py FILE``). On the
benchmark VM a cold page costs its disk read plus the first CPU touch of a page the host has just filled, and
both scale with bytes, not with the loader; a loader can only approach this figure, not beat it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = [
    "evict", "level_and_evict", "paired_rounds", "plain_read", "read_through", "run_load", "run_plain_read",
    "summary",
    "weight_files",
]  # fmt: skip

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


def read_through(paths: Iterable[Path]) -> list[Path]:
    """Read the files of ``paths`` once, sequentially (they end up in the page cache); return the files."""
    files = weight_files(paths)
    buffer = bytearray(CHUNK)
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    return files


def level_and_evict(paths: Iterable[Path]) -> None:
    """Read the files of ``paths`` once (levelling the caches below this machine), then :func:`evict` them."""
    evict(read_through(paths))


PAGE = 4096
READ_CHUNK = 64 << 20


def plain_read(file: Path, threads: int = 2) -> float:
    """Seconds to map ``file`` and read one byte of every page, ``READ_CHUNK`` ranges spread over ``threads``."""
    import torch

    size = file.stat().st_size
    started = time.perf_counter()
    storage = torch.UntypedStorage.from_file(str(file), shared=False, nbytes=size)
    data = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (size,), (1,))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda start: int(data[start : start + READ_CHUNK][::PAGE].sum()), range(0, size, READ_CHUNK)))
    return time.perf_counter() - started


def run_plain_read(file: Path, env: dict[str, str] | None = None) -> dict[str, float]:
    """:func:`plain_read` of ``file`` in a fresh process (torch imported before the clock starts)."""
    command = [sys.executable, __file__, str(file)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode:
        raise RuntimeError(f"plain read of {file} failed:\n{result.stderr[-4000:]}")
    data: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


def run_load(
    script: Path, kind: str, folder: Path, single_file: Path, env: dict[str, str], *, cold: bool = True
) -> dict[str, float]:
    """One load run in a fresh process, from a levelled and evicted cache (``cold=False``: files read in first).

    ``kind`` is a worker of ``script`` (``script --worker kind --dir folder`` prints its figures as the last JSON
    line), or ``plain_read``: :func:`plain_read` of ``single_file``, no model. The files prepared are
    ``single_file`` and ``folder / "transformer"``.
    """
    files = [single_file, folder / "transformer"]
    if cold:
        level_and_evict(files)
    else:
        read_through(files)
    if kind == "plain_read":
        return run_plain_read(single_file, env)
    command = [sys.executable, str(script), "--worker", kind, "--dir", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode:
        raise RuntimeError(f"load worker {kind} failed:\n{result.stderr[-4000:]}")
    data: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


def paired_rounds(
    kinds: Sequence[str], run: Callable[[str], dict[str, float]], repeat: int
) -> dict[str, list[dict[str, float]]]:
    """Run every kind once per round, ``repeat`` rounds, rotating which goes first; return the runs per kind.

    One untimed round runs first: the first process after other work was the slowest of its stage in every
    load benchmark run on the benchmark VM (FLUX.1 folder 8.4 s against 1.0-1.1 s after it, BFL file 24.5 s
    against 2.15 s), and round 0 always starts with the same side. ``run(kind)`` must start from a levelled,
    evicted cache itself (:func:`level_and_evict`).
    """
    runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    for kind in kinds:
        run(kind)  # warm-up, discarded
    for round_ in range(repeat):
        shift = round_ % len(kinds)
        for kind in [*kinds[shift:], *kinds[:shift]]:
            runs[kind].append(run(kind))
    return runs


def summary(
    runs: dict[str, list[dict[str, float]]], ours: str, theirs: str, floor: str | None = None
) -> dict[str, object]:
    """Figures beside a best-of ratio: the ratio of each round's pair and their median, every run's seconds,
    and (with ``floor``) each side's best over the best plain read."""
    totals = {kind: [r["total_s"] for r in kind_runs] for kind, kind_runs in runs.items()}
    paired = [a / b for a, b in zip(totals[ours], totals[theirs], strict=True)]
    figures: dict[str, object] = {
        "paired_ratio_median": round(statistics.median(paired), 4),
        "paired_ratios": [round(r, 3) for r in paired],
        "runs_s": {kind: [round(t, 3) for t in values] for kind, values in totals.items()},
    }
    if floor is not None:
        floor_s = min(totals[floor])
        figures |= {
            "plain_read_s": round(floor_s, 4),
            "ours_over_plain_read": round(min(totals[ours]) / floor_s, 3),
            "diffusers_over_plain_read": round(min(totals[theirs]) / floor_s, 3),
        }
    return figures


if __name__ == "__main__":
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    print(json.dumps({"total_s": plain_read(Path(sys.argv[1]))}))
