"""The ``--dtype`` part of the FLUX benchmarks: matmul peaks, forward FLOPs and the emulated-bf16 guard.

Used by ``flux1.py`` and ``flux2.py``. The fraction of peak a DiT forward reaches is its FLOPs (torch's flop
counter, one forward) over its median time, divided by the rate of a square matmul of the model's width in the
same dtype, measured in the same run. On a CPU without native bf16 (``diffstudio.devices.cpu_compute_path``)
torch's bf16 GEMM is emulated, hundreds of times slower than float32: there ours computes bf16 linears in float32
(bf16 storage and outputs) while diffusers runs torch's bf16 kernels, so the fraction is of THIS machine's bf16
matmul rate (it can exceed 1), and a diffusers bf16 run estimated to take longer than ``--diffusers-budget``
seconds (its FLOPs at the measured bf16 rate) is skipped and reported as an estimate instead.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def matmul_rate(width: int, dtype: torch.dtype, repeat: int = 3, budget_s: float = 60.0) -> dict[str, float]:
    """GFLOP/s of a ``width x width`` matmul in ``dtype`` (best of ``repeat`` after a warm-up; fewer if slow)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(width, width, generator=gen).to(dtype)
    b = torch.randn(width, width, generator=gen).to(dtype)
    flops = 2.0 * width**3
    times: list[float] = []
    spent = 0.0
    for i in range(repeat + 1):
        started = time.perf_counter()
        torch.mm(a, b)
        elapsed = time.perf_counter() - started
        spent += elapsed
        if i:
            times.append(elapsed)
        if spent > budget_s and times:
            break
        if i == 0 and elapsed > budget_s / 2:  # emulated bf16: the warm-up is already a measurement
            times.append(elapsed)
            break
    best = min(times)
    return {"gflops": flops / best / 1e9, "seconds": best, "width": width, "runs": len(times)}


def forward_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call of ``fn`` by torch's flop counter (matmuls, attention; elementwise ops not counted).

    oneDNN is switched off for the count: diffstudio's ``linear`` then runs ``F.linear``, which the counter sees.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.backends.mkldnn.flags(enabled=False):  # oneDNN's linear op has no flop formula
        fn()
    return float(counter.get_total_flops())


def emulated_bf16(dtype: torch.dtype) -> bool:
    """True when ``dtype`` is bf16 on a CPU that only emulates it."""
    from diffstudio.devices import emulated_bf16 as emulated

    return emulated("cpu", dtype)


def cpu_path() -> dict[str, Any]:
    """The CPU compute path as reported by diffstudio (for the JSON lines)."""
    from diffstudio.devices import cpu_compute_path

    path = cpu_compute_path()
    return {"cpu_path": path.path, "cpu_reason": path.reason}


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    """Wall seconds of ``repeat`` calls (the caller warms up)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def emit(bench: str, figure: str, value: float, unit: str, **extra: Any) -> None:
    """One JSON line."""
    print(json.dumps({"benchmark": bench, "figure": figure, "value": round(value, 4), "unit": unit, **extra}))
    sys.stdout.flush()


def dit_precision_figures(
    bench: str,
    dtype: torch.dtype,
    width: int,
    run_ours: Callable[[], torch.Tensor],
    run_theirs: Callable[[], torch.Tensor],
    repeat: int,
    diffusers_budget_s: float,
    **extra: Any,
) -> None:
    """Emit the DiT forward figures for a non-default dtype: peaks, ours/diffusers, fraction of peak.

    Lines: ``matmul_peak_<dtype>`` and ``matmul_peak_float32`` (GFLOP/s, square matmul of ``width``),
    ``dit_forward_<dtype>_s`` (ours), ``dit_forward_ratio_<dtype>`` (ours / diffusers, or an estimate when the
    diffusers run is skipped) and ``dit_forward_peak_fraction_<dtype>``.
    """
    name = str(dtype).removeprefix("torch.")
    peak = matmul_rate(width, dtype)
    fp32 = matmul_rate(width, torch.float32)
    emit(bench, f"matmul_peak_{name}", peak["gflops"], "GFLOP/s", width=width, seconds=round(peak["seconds"], 4),
         **cpu_path())  # fmt: skip
    emit(bench, "matmul_peak_float32", fp32["gflops"], "GFLOP/s", width=width, seconds=round(fp32["seconds"], 4))
    with torch.inference_mode():
        flops = forward_flops(run_ours)  # also the warm-up
        ours = timed(run_ours, repeat)
        estimate = flops / (peak["gflops"] * 1e9)
        ours_s = statistics.median(ours)
        emit(bench, f"dit_forward_{name}_s", ours_s, "s", min_s=round(min(ours), 4), flops=flops,
             gflops=round(flops / ours_s / 1e9, 2), runs=repeat, **extra)  # fmt: skip
        fraction = flops / ours_s / 1e9 / peak["gflops"]
        emit(bench, f"dit_forward_peak_fraction_{name}", fraction, "x", target=">= 0.85",
             of=f"this machine's {name} matmul rate at width {width}",
             float32_peak_fraction=round(flops / ours_s / 1e9 / fp32["gflops"], 4))  # fmt: skip
        if estimate > diffusers_budget_s:
            emit(bench, f"dit_forward_ratio_{name}", ours_s / estimate, "x", target="<= 0.75", estimated=True,
                 ours_s=round(ours_s, 4), diffusers_estimated_s=round(estimate, 1),
                 note=f"diffusers not run: its {flops:.3g} FLOPs at the measured {name} matmul rate would take "
                 f"longer than --diffusers-budget {diffusers_budget_s:g} s")  # fmt: skip
            return
        diff = (run_ours().float() - run_theirs().float()).abs().max().item()  # diffusers' warm-up
        wall: dict[str, list[float]] = {"ours": [], "diffusers": []}
        for _ in range(repeat):
            wall["ours"] += timed(run_ours, 1)
            wall["diffusers"] += timed(run_theirs, 1)
        a, b = statistics.median(wall["ours"]), statistics.median(wall["diffusers"])
        emit(bench, f"dit_forward_ratio_{name}", a / b, "x", target="<= 0.75", ours_s=round(a, 4),
             diffusers_s=round(b, 4), min_ratio=round(min(wall["ours"]) / min(wall["diffusers"]), 4),
             max_abs_diff=diff, runs=repeat)  # fmt: skip


def diffusers_estimate(run_ours: Callable[[], Any], dtype: torch.dtype, width: int, budget_s: float) -> float | None:
    """Seconds diffusers' emulated-bf16 DiT forward would take (FLOPs / bf16 matmul rate), when 4 of them are
    over ``budget_s``; None when diffusers can simply be run (float32, native bf16, or fast enough)."""
    if not emulated_bf16(dtype):
        return None
    with torch.inference_mode():
        estimate = forward_flops(run_ours) / (matmul_rate(width, dtype, repeat=1)["gflops"] * 1e9)
    return estimate if 4 * estimate > budget_s else None


def estimated_pipeline_ratio(
    ratio: Callable[..., None], figure: str, run_ours: Callable[[], Any], repeat: int, dit_estimate: float
) -> None:
    """Emit ``figure`` for a 4-step pipeline whose diffusers run is skipped (emulated bf16).

    Ours is timed (median of ``repeat`` after a warm-up) and compared with diffusers' 4 DiT forwards at the
    measured bf16 matmul rate, a lower bound of its time, so the ratio is an upper bound. ``ratio`` is the
    benchmark's ``ratio(figure, ours_s, theirs_s, target, **extra)`` line writer.
    """
    with torch.inference_mode():
        run_ours()
        ours_s = statistics.median(timed(run_ours, repeat))
    ratio(figure, ours_s, 4 * dit_estimate, "<= 0.8", estimated=True, steps=4,
          note="diffusers not run (emulated bf16): its 4 DiT forwards at the measured bf16 matmul rate, a "
          "lower bound of its time, so the ratio is an upper bound")  # fmt: skip
