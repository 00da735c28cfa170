"""FLUX.2 benchmark: diffstudio-flux2 against diffusers in the same run, on the same weights.

Usage::

    .venv/bin/python benchmarks/flux2.py [--size medium|quick] [--quick] [--threads 2] [--repeat 3]
        [--only dit,load,pipeline,startup] [--out DIR] [--dtype float32|bfloat16] [--diffusers-budget S]

``--size medium`` (the default) is the issue's configuration: a klein-style DiT of about 237M parameters
(3 double + 10 single blocks, 8 heads of 128), 1024 image tokens and 512 text tokens, fp32, two threads.
``--quick`` (``--size quick``: 25M parameters, 256 + 128 tokens) finishes in a couple of minutes. The model
folders are built once under ``--out`` (see ``flux2_models.py``). One JSON line per figure; ratios are
ours / diffusers, so below 1 is faster (in-process comparisons also give the ratio of the fastest runs,
``min_ratio``, and of process CPU time, ``cpu_ratio``, which a busy shared machine disturbs less):

* ``dit_forward_ratio`` (target <= 0.9): ``Flux2.forward`` vs ``Flux2Transformer2DModel.forward`` on the same
  inputs, in this process, alternating, median of ``--repeat`` timed runs after a warm-up each; the outputs'
  max abs difference is reported beside it.
* ``cold_load_ratio_vs_from_pretrained`` (<= 1.0) and ``cold_load_ratio_vs_from_single_file`` (<= 0.8): every
  run is a fresh process whose imports and plugin discovery (``Runtime()``) are done before the clock starts;
  the files are read once and then evicted from the page cache (``posix_fadvise(DONTNEED)``; ``coldcache.py``
  says why they are read first); one discarded round, then each side goes first in alternate repeats; the clock
  stops once one element of every 4 KiB page of every weight has been read. Ours loads the diffusers
  ``transformer/`` folder and the BFL file through ``Flux2ImagePipeline.from_pretrained``; diffusers runs
  ``from_pretrained`` on the folder and ``from_single_file`` on the BFL file. Best of ``--repeat``. Each BFL
  round also times ``coldcache.plain_read`` of the file (no model: the cold-read yardstick). Both ratio lines
  carry ``paired_ratio_median`` (the median of the rounds' own ratios) and ``runs_s``, the BFL line also each
  side's best over the plain read. ``warm_load_ratio_vs_from_single_file`` (no target) repeats the BFL pair
  with the file already in the page cache: the loaders' own work.
* ``pipeline_ratio`` (<= 1.0): a full 4-step text-to-image call (prompt encoding, 4 DiT steps, VAE decode, PIL)
  with the same initial noise, ``Flux2ImagePipeline`` vs ``Flux2KleinPipeline`` built from the same folder.
* ``startup_ratio`` (<= 0.7): wall time from process start to a saved PNG for a script that loads a tiny klein
  repository and renders one 4-step 128x128 image, ours vs the same script written with diffusers. Best of
  ``--repeat`` after one warm-up run each (warm page cache for both).

``--dtype bfloat16`` (only ``dit`` and ``pipeline``; see ``precision.py``): ``matmul_peak_bfloat16`` and
``matmul_peak_float32`` (square matmul of the DiT width, this run), ``dit_forward_bfloat16_s``,
``dit_forward_ratio_bfloat16`` (target <= 0.75), ``dit_forward_peak_fraction_bfloat16`` (>= 0.85) and
``pipeline_ratio_bfloat16`` (<= 0.8), both sides loaded in bf16. On a CPU that only emulates bf16 a diffusers run
longer than ``--diffusers-budget`` seconds (estimated from its FLOPs at the measured bf16 rate) is skipped and the
ratio is reported against that estimate (``estimated: true``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from coldcache import paired_rounds, run_load, summary
from flux2_models import SIZES, Size, build_repository, parameter_count
from precision import DTYPES, diffusers_estimate, dit_precision_figures, estimated_pipeline_ratio

BENCH = "flux2"
PAGE = 4096
PROMPT = "a red circle on a blue background, soft light"


def emit(figure: str, value: float, unit: str, **extra: Any) -> None:
    print(json.dumps({"benchmark": BENCH, "figure": figure, "value": round(value, 4), "unit": unit, **extra}))
    sys.stdout.flush()


def ratio(figure: str, ours: float, theirs: float, target: str, **extra: Any) -> None:
    emit(figure, ours / theirs, "x", ours_s=round(ours, 4), diffusers_s=round(theirs, 4), target=target, **extra)


def timed_runs(runs: dict[str, Any], repeat: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Alternate the callables ``repeat`` times; return wall and CPU seconds (all threads) per name.

    CPU time is reported beside wall time because the benchmark machines are shared: another process's load
    stretches the wall time of whichever side happens to run then, much less the CPU time it uses.
    """
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - cpu_started)
    return wall, cpu


def compare(figure: str, runs: dict[str, Any], repeat: int, target: str, **extra: Any) -> None:
    """Time ``runs["ours"]`` against ``runs["diffusers"]`` and emit the median ratio with min and CPU ratios."""
    wall, cpu = timed_runs(runs, repeat)
    ours, theirs = statistics.median(wall["ours"]), statistics.median(wall["diffusers"])
    ratio(figure, ours, theirs, target,
          min_ratio=round(min(wall["ours"]) / min(wall["diffusers"]), 4),
          cpu_ratio=round(statistics.median(cpu["ours"]) / statistics.median(cpu["diffusers"]), 4),
          ours_min_s=round(min(wall["ours"]), 4), diffusers_min_s=round(min(wall["diffusers"]), 4),
          runs=repeat, **extra)  # fmt: skip


# -- DiT forward ---------------------------------------------------------------------------------------------


def dit_inputs(size: Size, seed: int = 0) -> dict[str, Any]:
    from diffstudio_flux2.math import image_ids, text_ids
    from flux2_models import LATENT_CHANNELS, TEXT_WIDTH

    gen = torch.Generator().manual_seed(seed)
    grid = int(round(size.image_tokens**0.5))
    return {
        "x": torch.randn(1, size.image_tokens, LATENT_CHANNELS, generator=gen),
        "x_ids": image_ids(1, grid, grid),
        "timesteps": torch.tensor([0.7]),
        "ctx": torch.randn(1, size.text_tokens, TEXT_WIDTH, generator=gen),
        "ctx_ids": text_ids(1, size.text_tokens),
    }


def load_ours_dit(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    from diffstudio import ModelConfig
    from diffstudio_flux2.pipeline import Flux2ImagePipeline

    pipe = Flux2ImagePipeline.from_pretrained(
        torch_dtype=dtype, device="cpu", model_configs=[ModelConfig(path=str(path))]
    )
    return pipe.dit


def bench_dit(
    folder: Path, size: Size, repeat: int, dtype: torch.dtype = torch.float32, budget_s: float = 600.0
) -> float | None:
    """Time the DiT forward; return diffusers' estimated seconds per forward when its run is skipped (bf16)."""
    from diffusers import Flux2Transformer2DModel

    ours = load_ours_dit(folder / "flux2.safetensors", dtype)
    theirs = Flux2Transformer2DModel.from_pretrained(str(folder / "transformer"), torch_dtype=dtype).eval()
    inputs = {k: v.to(dtype) if k in ("x", "ctx") else v for k, v in dit_inputs(size).items()}

    def run_ours() -> torch.Tensor:
        out: torch.Tensor = ours(**inputs)
        return out

    def run_theirs() -> torch.Tensor:
        out: torch.Tensor = theirs(
            hidden_states=inputs["x"],
            encoder_hidden_states=inputs["ctx"],
            timestep=inputs["timesteps"],
            img_ids=inputs["x_ids"],
            txt_ids=inputs["ctx_ids"],
            guidance=None,
            return_dict=False,
        )[0]
        return out

    if dtype != torch.float32:
        dit_precision_figures(BENCH, dtype, size.hidden, run_ours, run_theirs, repeat, budget_s,
                              image_tokens=size.image_tokens, text_tokens=size.text_tokens)  # fmt: skip
        return diffusers_estimate(run_ours, dtype, size.hidden, budget_s)
    with torch.inference_mode():
        diff = (run_ours() - run_theirs()).abs().max().item()  # also the warm-up
        compare("dit_forward_ratio", {"ours": run_ours, "diffusers": run_theirs}, repeat, "<= 0.9",
                max_abs_diff=diff, image_tokens=size.image_tokens, text_tokens=size.text_tokens)  # fmt: skip
    return None


# -- cold load (one process per run) ------------------------------------------------------------------------


def touch(model: torch.nn.Module) -> float:
    """Read one element of every 4 KiB page of every parameter and buffer."""
    total = 0.0
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            flat = tensor.reshape(-1)
            total += float(flat[:: max(1, PAGE // flat.element_size())].float().sum())
    return total


def load_worker(kind: str, folder: Path) -> dict[str, float]:
    """Import everything, then time one load + touch. ``kind``: ours_bfl, ours_folder, from_pretrained, ..."""
    from diffstudio import ModelConfig
    from diffstudio.runtime import Runtime
    from diffstudio_flux2.pipeline import Flux2ImagePipeline
    from diffusers import Flux2Transformer2DModel

    torch.set_num_threads(2)
    runtime = Runtime()  # plugin discovery is a per-process cost, like diffusers' imports (as in flux1.py)
    started = time.perf_counter()
    model: torch.nn.Module
    if kind.startswith("ours"):
        path = folder / ("flux2.safetensors" if kind == "ours_bfl" else "transformer")
        model = Flux2ImagePipeline.from_pretrained(
            torch_dtype=torch.float32, device="cpu", model_configs=[ModelConfig(path=str(path))], runtime=runtime
        ).dit
    elif kind == "from_pretrained":
        model = Flux2Transformer2DModel.from_pretrained(str(folder / "transformer"), torch_dtype=torch.float32)
    else:
        model = Flux2Transformer2DModel.from_single_file(
            str(folder / "flux2.safetensors"), config=str(folder), subfolder="transformer", torch_dtype=torch.float32
        )
    loaded = time.perf_counter()
    touch(model)
    return {"load_s": loaded - started, "total_s": time.perf_counter() - started}


def run_load_worker(kind: str, folder: Path, *, cold: bool = True) -> dict[str, float]:
    """One run of ``kind`` in a fresh process (``coldcache.run_load``; ``plain_read``: the file alone)."""
    return run_load(Path(__file__), kind, folder, folder / "flux2.safetensors", _env(), cold=cold)


def bench_load(folder: Path, repeat: int) -> None:
    size_gb = round((folder / "flux2.safetensors").stat().st_size / 1e9, 3)

    def run(kind: str) -> dict[str, float]:
        return run_load_worker(kind, folder)

    folder_runs = paired_rounds(("ours_folder", "from_pretrained"), run, repeat)
    bfl_runs = paired_rounds(("ours_bfl", "from_single_file", "plain_read"), run, repeat)
    best = {kind: min(runs, key=lambda r: r["total_s"]) for kind, runs in {**folder_runs, **bfl_runs}.items()}
    for kind, best_run in best.items():
        load_s = round(best_run.get("load_s", best_run["total_s"]), 4)
        emit(f"cold_load_{kind}_s", best_run["total_s"], "s", load_s=load_s, file_gb=size_gb)
    ratio("cold_load_ratio_vs_from_pretrained", best["ours_folder"]["total_s"], best["from_pretrained"]["total_s"],
          "<= 1.0", what="diffusers transformer/ folder, both sides",
          **summary(folder_runs, "ours_folder", "from_pretrained"))  # fmt: skip
    ratio("cold_load_ratio_vs_from_single_file", best["ours_bfl"]["total_s"], best["from_single_file"]["total_s"],
          "<= 0.8", what="BFL single file, both sides",
          **summary(bfl_runs, "ours_bfl", "from_single_file", "plain_read"))  # fmt: skip
    warm = paired_rounds(("ours_bfl", "from_single_file"), lambda k: run_load_worker(k, folder, cold=False), repeat)
    warm_best = {kind: min(r["total_s"] for r in runs) for kind, runs in warm.items()}
    ratio("warm_load_ratio_vs_from_single_file", warm_best["ours_bfl"], warm_best["from_single_file"], "none",
          what="BFL single file already in the page cache: the loaders' own work, without the disk")  # fmt: skip


# -- full pipeline -------------------------------------------------------------------------------------------


def our_pipeline(folder: Path, dtype: torch.dtype = torch.float32) -> Any:
    from diffstudio import ModelConfig
    from diffstudio_flux2.pipeline import Flux2ImagePipeline

    pipe = Flux2ImagePipeline.from_pretrained(
        torch_dtype=dtype,
        device="cpu",
        model_configs=[
            ModelConfig(path=str(folder / "text_encoder")),
            ModelConfig(path=str(folder / "flux2.safetensors")),
            ModelConfig(path=str(folder / "vae")),
        ],
        tokenizer_config=ModelConfig(path=str(folder / "tokenizer")),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_pipeline(
    folder: Path, size: Size, repeat: int, dtype: torch.dtype = torch.float32, dit_estimate: float | None = None
) -> None:
    """4-step pipeline ours / diffusers; ``dit_estimate``: diffusers' DiT seconds when too slow to run (bf16)."""
    import numpy as np
    from diffstudio_flux2.math import pack_latents
    from diffusers import Flux2KleinPipeline
    from flux2_models import LATENT_CHANNELS, PIXELS_PER_TOKEN

    ours = our_pipeline(folder, dtype)
    theirs = Flux2KleinPipeline.from_pretrained(str(folder), torch_dtype=dtype)
    theirs.set_progress_bar_config(disable=True)
    side = size.side
    noise = torch.randn(1, LATENT_CHANNELS, side // PIXELS_PER_TOKEN, side // PIXELS_PER_TOKEN,
                        generator=torch.Generator().manual_seed(0)).to(dtype)  # fmt: skip
    common = {"height": side, "width": side, "num_inference_steps": 4, "max_sequence_length": size.text_tokens}

    def run_ours() -> Any:
        return ours(PROMPT, latents=pack_latents(noise), **common)

    def run_theirs() -> Any:
        return theirs(prompt=PROMPT, latents=noise, guidance_scale=1.0, **common).images[0]

    name = "" if dtype == torch.float32 else "_" + str(dtype).removeprefix("torch.")
    if dit_estimate is not None:
        estimated_pipeline_ratio(ratio, f"pipeline_ratio{name}", run_ours, repeat, dit_estimate)
        return
    with torch.inference_mode():
        first = np.asarray(run_ours(), dtype=np.float32) - np.asarray(run_theirs(), dtype=np.float32)
        compare(f"pipeline_ratio{name}", {"ours": run_ours, "diffusers": run_theirs}, repeat,
                "<= 1.0" if not name else "<= 0.8", steps=4,
                image=f"{side}x{side}", image_tokens=size.image_tokens, text_tokens=size.text_tokens,
                max_pixel_diff=float(np.abs(first).max()))  # fmt: skip


# -- process start to saved PNG ------------------------------------------------------------------------------

OURS_SCRIPT = """
import torch
from diffstudio import ModelConfig
from diffstudio_flux2 import Flux2ImagePipeline

root = {root!r}
pipe = Flux2ImagePipeline.from_pretrained(
    torch_dtype=torch.float32,
    device="cpu",
    model_configs=[
        ModelConfig(path=root + "/text_encoder"),
        ModelConfig(path=root + "/transformer"),
        ModelConfig(path=root + "/vae"),
    ],
    tokenizer_config=ModelConfig(path=root + "/tokenizer"),
)
image = pipe("a red circle on a blue background", seed=0, num_inference_steps=4, height=128, width=128)
image.save({png!r})
"""

DIFFUSERS_SCRIPT = """
import torch
from diffusers import Flux2KleinPipeline

pipe = Flux2KleinPipeline.from_pretrained({root!r}, torch_dtype=torch.float32)
image = pipe(
    prompt="a red circle on a blue background", generator=torch.Generator().manual_seed(0), num_inference_steps=4,
    height=128, width=128, guidance_scale=1.0,
).images[0]
image.save({png!r})
"""


def _env() -> dict[str, str]:
    threads = str(torch.get_num_threads())
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1"}


def run_script(script: str, png: Path) -> float:
    png.unlink(missing_ok=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, env=_env())
    elapsed = time.perf_counter() - started
    if result.returncode or not png.is_file():
        raise RuntimeError(f"script failed:\n{result.stderr[-4000:]}")
    return elapsed


def bench_startup(out: Path, repeat: int) -> None:
    small = build_repository(out, SIZES["small"])
    work = Path(tempfile.mkdtemp(prefix="flux2-startup-", dir=out))
    scripts = {
        "ours": OURS_SCRIPT.format(root=str(small), png=str(work / "ours.png")),
        "diffusers": DIFFUSERS_SCRIPT.format(root=str(small), png=str(work / "diffusers.png")),
    }
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    for name, script in scripts.items():  # warm-up: page cache, compiled bytecode
        run_script(script, work / f"{name}.png")
    for _ in range(repeat):
        for name, script in scripts.items():
            times[name].append(run_script(script, work / f"{name}.png"))
    ratio("startup_ratio", min(times["ours"]), min(times["diffusers"]), "<= 0.7",
          what="process start to saved PNG, tiny klein, 4 steps, 128x128",
          ours_median_s=round(statistics.median(times["ours"]), 4),
          diffusers_median_s=round(statistics.median(times["diffusers"]), 4))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", default="medium", choices=["medium", "quick"])
    parser.add_argument("--quick", action="store_true", help="same as --size quick")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="dit,load,pipeline,startup", help="comma-separated parts to run")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "diffstudio-bench")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dit and pipeline dtype")
    parser.add_argument("--diffusers-budget", type=float, default=600.0, help="seconds (emulated bf16, see above)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(load_worker(args.worker, args.dir)))
        return
    size = SIZES["quick" if args.quick else args.size]
    parts = set(args.only.split(","))
    started = time.perf_counter()
    folder = build_repository(args.out, size)
    emit("prepare_s", time.perf_counter() - started, "s", folder=str(folder), size=size.name,
         dit_parameters=parameter_count(folder), threads=args.threads, torch=torch.__version__)  # fmt: skip
    dtype = DTYPES[args.dtype]
    estimate = None
    if "dit" in parts:
        estimate = bench_dit(folder, size, args.repeat, dtype, args.diffusers_budget)
    if "load" in parts and dtype == torch.float32:
        bench_load(folder, args.repeat)
    if "pipeline" in parts:
        bench_pipeline(folder, size, args.repeat, dtype, estimate)
    if "startup" in parts and dtype == torch.float32:
        bench_startup(args.out, args.repeat)


if __name__ == "__main__":
    main()
