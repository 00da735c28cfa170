"""Checkpoint loading benchmark: lazy Checkpoint + meta-device assignment vs the naive load.

Usage::

    .venv/bin/python benchmarks/loading.py [--size-gb 1] [--dtype float32] [--shards 5] [--out DIR] [--cold]

Builds (or reuses, in ``DIR``; default: a folder under the system temp dir) a sharded safetensors folder
with a ``model.safetensors.index.json``, made of a stack of ``nn.Linear(4096, 4096)`` layers, then prints one
JSON line per figure:

* ``checkpoint_open_ms``: ``Checkpoint.open(folder)``, headers only (target < 50 ms).
* ``state_dict_views_ms`` vs ``safe_open_get_tensor_ms``: creating every memory-mapped tensor, ours vs
  ``safetensors.safe_open``.
* ``meta_assign_s`` vs ``baseline_load_s`` and ``meta_assign_ratio`` (target <= 0.5). Ours: open + build on
  meta + assign (zero copy). Baseline: ``safetensors.torch.load_file`` of every shard + the module built
  normally (random init) + ``load_state_dict``.
* ``*_touch_s``: the same followed by reading one element of every 4 KiB page of every weight, so the lazy
  path pays for its page faults; ``meta_assign_touch_ratio`` compares those.
* ``peak_rss_*_gb``: VmHWM of each approach, each in its own subprocess, with RssAnon/RssFile at the end and
  the peak above the process's RSS after imports (``attributable_gb``, the figure the 1.2x target applies
  to). Memory-mapped pages count in RSS (as RssFile) once touched.

Page cache: warm by default (the files were just written or read). ``--cold`` evicts the shard files from the
page cache (``posix_fadvise(DONTNEED)``, no root needed) before each run, so reads hit the disk.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import coldcache
import torch
from torch import nn

DIM = 4096
PAGE = 4096
BENCH = "loading"


class Stack(nn.Module):
    """``layers`` x ``nn.Linear(dim, dim)``: weights ``[dim, dim]``, biases ``[dim]``."""

    def __init__(self, layers: int, dim: int = DIM, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim, dtype=dtype) for _ in range(layers))


def emit(figure: str, value: float, unit: str, **extra: Any) -> None:
    print(json.dumps({"benchmark": BENCH, "figure": figure, "value": round(value, 4), "unit": unit, **extra}))
    sys.stdout.flush()


def proc_status() -> dict[str, float]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process in GB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(rest.split()[0]) * 1024 / 1e9
    return fields


# -- the checkpoint ------------------------------------------------------------------------------------------


def make_checkpoint(out: Path, size_gb: float, dtype_name: str, shards: int) -> Path:
    """Write (once) a sharded folder of about ``size_gb`` GB; returns it."""
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    layers = max(1, round(size_gb * 1e9 / (DIM * (DIM + 1) * itemsize)))
    shards = min(shards, layers)
    spec = {"layers": layers, "dim": DIM, "dtype": dtype_name, "shards": shards}
    folder = out / f"stack-{layers}x{DIM}-{dtype_name}-{shards}shards"
    if (folder / "spec.json").is_file() and json.loads((folder / "spec.json").read_text()) == spec:
        return folder
    partial = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=out))
    generator = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    per_shard = -(-layers // shards)
    total = 0
    for shard in range(shards):
        name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for layer in range(shard * per_shard, min(layers, (shard + 1) * per_shard)):
            weight = torch.randn(DIM, DIM, generator=generator).to(dtype)
            tensors[f"layers.{layer}.weight"] = weight
            tensors[f"layers.{layer}.bias"] = torch.randn(DIM, generator=generator).to(dtype)
        save_file(tensors, str(partial / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (partial / "spec.json").write_text(json.dumps(spec))
    if folder.exists():
        for old in folder.iterdir():
            old.unlink()
        folder.rmdir()
    partial.rename(folder)
    return folder


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def evict(folder: Path) -> None:
    """Drop the shard files' clean pages from the page cache (no root needed)."""
    coldcache.evict(shard_files(folder))


# -- workers (one approach per subprocess) -------------------------------------------------------------------


def touch(model: nn.Module) -> float:
    """Read one element of every 4 KiB page of every parameter; returns the (meaningless) sum."""
    total = 0.0
    with torch.no_grad():
        for parameter in model.parameters():
            flat = parameter.reshape(-1)
            total += float(flat[:: max(1, PAGE // flat.element_size())].float().sum())
    return total


def worker(kind: str, folder: Path) -> dict[str, float]:
    from diffstudio.loading import Checkpoint, build_on_meta, load_state_dict_into
    from safetensors.torch import load_file

    spec = json.loads((folder / "spec.json").read_text())
    dtype = getattr(torch, spec["dtype"])
    before = proc_status()
    started = time.perf_counter()
    if kind.startswith("meta"):
        checkpoint = Checkpoint.open(folder)
        model = build_on_meta(lambda: Stack(spec["layers"], spec["dim"], dtype))
        load_state_dict_into(model, checkpoint.state_dict())
    else:
        state: dict[str, torch.Tensor] = {}
        for file in shard_files(folder):
            state.update(load_file(str(file)))
        model = Stack(spec["layers"], spec["dim"], dtype)
        model.load_state_dict(state)
        del state
    loaded = time.perf_counter()
    if kind.endswith("touch"):
        touch(model)
    finished = time.perf_counter()
    after = proc_status()
    return {
        "load_s": loaded - started,
        "total_s": finished - started,
        "peak_gb": after["VmHWM"],
        "rss_gb": after["VmRSS"],
        "rss_anon_gb": after["RssAnon"],
        "rss_file_gb": after["RssFile"],
        "rss_after_imports_gb": before["VmRSS"],
    }


def run_worker(kind: str, folder: Path, cold: bool) -> dict[str, float]:
    if cold:
        evict(folder)
    command = [sys.executable, __file__, "--worker", kind, "--dir", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"worker {kind} failed:\n{result.stderr}")
    data: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


# -- in-process figures --------------------------------------------------------------------------------------


def header_figures(folder: Path, size_gb: float) -> None:
    from diffstudio.loading import Checkpoint
    from safetensors import safe_open

    times = []
    for _ in range(7):
        started = time.perf_counter()
        checkpoint = Checkpoint.open(folder)
        times.append(time.perf_counter() - started)
    emit(
        "checkpoint_open_ms",
        statistics.median(times) * 1e3,
        "ms",
        target="< 50",
        tensors=len(checkpoint),
        files=len(checkpoint.files),
        checkpoint_gb=round(checkpoint.nbytes / 1e9, 3),
    )
    started = time.perf_counter()
    views = checkpoint.state_dict()
    ours = time.perf_counter() - started
    started = time.perf_counter()
    reference = {}
    for file in shard_files(folder):
        with safe_open(str(file), framework="pt") as handle:
            reference.update({key: handle.get_tensor(key) for key in handle.keys()})
    theirs = time.perf_counter() - started
    assert len(views) == len(reference)
    emit("state_dict_views_ms", ours * 1e3, "ms", note="Checkpoint.state_dict(), no data read")
    emit("safe_open_get_tensor_ms", theirs * 1e3, "ms", note="safetensors.safe_open get_tensor, every tensor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--shards", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "diffstudio-bench")
    parser.add_argument("--repeat", type=int, default=2, help="runs per approach; the fastest is reported")
    parser.add_argument(
        "--cold", action="store_true", help="evict the files from the page cache before each run"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.dir)))
        return

    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    folder = make_checkpoint(args.out, args.size_gb, args.dtype, args.shards)
    size_gb = sum(f.stat().st_size for f in shard_files(folder)) / 1e9
    emit(
        "checkpoint_prepare_s",
        time.perf_counter() - started,
        "s",
        folder=str(folder),
        size_gb=round(size_gb, 3),
    )
    header_figures(folder, size_gb)

    cache = "cold" if args.cold else "warm"
    results: dict[str, dict[str, float]] = {}
    for kind in ("meta", "meta_touch", "baseline", "baseline_touch"):
        runs = [run_worker(kind, folder, args.cold) for _ in range(max(1, args.repeat))]
        best = min(runs, key=lambda r: r["total_s"])
        best["peak_gb"] = max(r["peak_gb"] for r in runs)
        results[kind] = best
    emit("meta_assign_s", results["meta"]["load_s"], "s", page_cache=cache, what="open + meta build + assign")
    emit(
        "baseline_load_s",
        results["baseline"]["load_s"],
        "s",
        page_cache=cache,
        what="load_file + init + copy",
    )
    emit("meta_assign_ratio", results["meta"]["load_s"] / results["baseline"]["load_s"], "x", target="<= 0.5")
    emit(
        "meta_assign_touch_s",
        results["meta_touch"]["total_s"],
        "s",
        page_cache=cache,
        what="+ read every page",
    )
    emit("baseline_load_touch_s", results["baseline_touch"]["total_s"], "s", page_cache=cache)
    emit(
        "meta_assign_touch_ratio",
        results["meta_touch"]["total_s"] / results["baseline_touch"]["total_s"],
        "x",
        target="<= 0.5",
    )
    for kind, result in results.items():
        attributable = result["peak_gb"] - result["rss_after_imports_gb"]
        emit(
            f"peak_rss_{kind}_gb",
            result["peak_gb"],
            "GB",
            attributable_gb=round(attributable, 3),
            attributable_over_checkpoint=round(attributable / size_gb, 3),
            rss_after_imports_gb=round(result["rss_after_imports_gb"], 3),
            end_rss_anon_gb=round(result["rss_anon_gb"], 3),
            end_rss_file_gb=round(result["rss_file_gb"], 3),
            checkpoint_gb=round(size_gb, 3),
            target="attributable <= 1.2x checkpoint" if kind.startswith("meta") else None,
        )


if __name__ == "__main__":
    main()
