"""Step-caching benchmark (issue 23): TeaCache / First-Block-Cache against no cache, in the same process.

Usage::

    .venv/bin/python benchmarks/cache.py [--captions 200] [--settings teacache:0.2,teacache:0.4,fbcache:0.1]
        [--only shapes,medium,pipeline] [--batch 16] [--threads 2]
    .venv/bin/python benchmarks/cache.py --only pipeline --model DIR [--height 1024 --width 1024 --steps 28]
        [--settings teacache:0.25,teacache:0.4,teacache:0.6] [--device cuda --dtype bfloat16]

One JSON line per setting:

* ``shapes`` (the embedded model, a real trained FLUX.2-klein-architecture model, with its shipped
  ``flux2-shapes.teacache.json`` coefficients; 20 steps, CFG 3, 128 x 128, held-out captions as ``eval-shapes``
  draws them): ``speedup`` = uncached seconds / cached seconds end to end (prompt encoding, denoising, VAE decode),
  the two timed in alternation batch by batch so that load on a shared machine hits both alike; mean
  ``computed_steps`` of the positive branch; ``psnr_db`` (mean over images, and the minimum) of the cached image
  against the uncached one with the same seed; the analyser's ``accuracy`` (colour, shape, position, ...) and its
  difference to uncached (``accuracy_delta``).
* ``medium`` (the medium FLUX.1 DiT of ``benchmarks/flux1.py``, random weights: speed and computed steps only):
  20 Euler steps of ``predict_velocity`` on random conditioning; TeaCache uses the FLUX.1-dev polynomial (forced:
  random weights have no calibration) and FBCache its threshold.
* ``pipeline`` (any text-to-image model, e.g. FLUX.1-dev on a GPU; what ``benchmarks/gpu/cache.sh`` runs):
  seconds per image and PSNR against no cache for each setting.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

BENCH = "cache"
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = (
    "a photograph of a lighthouse on a cliff at sunset",
    "a bowl of fruit on a wooden table, soft light",
    "a red fox in a snowy forest",
    "a city street at night in the rain, neon signs",
)


def emit(**row: Any) -> None:
    print(json.dumps({"benchmark": BENCH, **row}))
    sys.stdout.flush()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def cache_arguments(setting: str | None) -> dict[str, Any]:
    return {} if setting is None else {"step_cache": setting}


# ------------------------------------------------------------------------------------------------------------
# shapes: the embedded trained model
# ------------------------------------------------------------------------------------------------------------


def bench_shapes(args: argparse.Namespace, settings: list[str]) -> None:
    from diffstudio.run_api import load_pipeline
    from diffstudio.runtime import Runtime
    from diffstudio_shapes.analyse import score
    from diffstudio_shapes.data import caption, sample_specs
    from diffstudio_shapes.model import DEFAULTS

    pipe, defaults = load_pipeline(Runtime(), None)
    pipe.set_progress_bar_config(disable=True)
    arguments = {**DEFAULTS, **defaults}
    specs = sample_specs(args.captions, seed=1, split="heldout")
    captions = [caption(spec) for spec in specs]
    runs: list[str | None] = [None, *settings]
    seconds = dict.fromkeys(runs, 0.0)
    images: dict[str | None, list[Any]] = {s: [] for s in runs}
    computed: dict[str | None, list[int]] = {s: [] for s in runs}
    pipe(captions[:2], seed=0, **{**arguments, "num_inference_steps": 2})  # warm-up
    for start in range(0, len(captions), args.batch):
        chunk = captions[start : start + args.batch]
        order = runs if (start // args.batch) % 2 == 0 else list(reversed(runs))
        for setting in order:
            began = time.perf_counter()
            out = pipe(chunk, seed=100_000 + start, **arguments, **cache_arguments(setting))
            seconds[setting] += time.perf_counter() - began
            images[setting].extend(out)
            report = pipe.last_run.step_cache
            computed[setting].append(arguments["num_inference_steps"] if report is None else report["computed_steps"])
    base_score = score(specs, images[None])["accuracy"]
    reference = [np.asarray(image) for image in images[None]]
    emit(model="shapes", setting="off", captions=len(captions), steps=arguments["num_inference_steps"],
         seconds=round(seconds[None], 2), speedup=1.0, computed_steps=arguments["num_inference_steps"],
         accuracy=base_score, threads=torch.get_num_threads())  # fmt: skip
    for setting in settings:
        values = [psnr(np.asarray(image), ref) for image, ref in zip(images[setting], reference)]
        finite = [v for v in values if math.isfinite(v)]
        accuracy = score(specs, images[setting])["accuracy"]
        delta = {k: None if v is None or base_score[k] is None else round(v - base_score[k], 4)
                 for k, v in accuracy.items()}  # fmt: skip
        emit(model="shapes", setting=setting, captions=len(captions), steps=arguments["num_inference_steps"],
             seconds=round(seconds[setting], 2), speedup=round(seconds[None] / seconds[setting], 3),
             computed_steps=round(statistics.mean(computed[setting]), 2),
             psnr_db=round(statistics.mean(finite), 2) if finite else math.inf,
             psnr_min_db=round(min(finite), 2) if finite else math.inf, identical=len(values) - len(finite),
             accuracy=accuracy, accuracy_delta=delta)  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# medium FLUX.1 DiT, random weights
# ------------------------------------------------------------------------------------------------------------


def bench_medium(args: argparse.Namespace, settings: list[str]) -> None:
    from diffstudio.cache import FLUX1_DEV
    from diffstudio.cache.hooks import FirstBlockCache, TeaCache
    from diffstudio.cache.spec import parse_cache_spec
    from diffstudio.pipeline.state import PipelineState
    from diffstudio_flux1.math import image_ids, text_ids
    from diffstudio_flux1.model import Flux
    from diffstudio_flux1.params import FluxParams
    from diffstudio_flux1.pipeline import FluxImagePipeline

    side = int(math.isqrt(args.medium_tokens))
    params = FluxParams(hidden_size=1024, num_heads=8, depth=3, depth_single_blocks=11, axes_dim=(16, 56, 56))
    torch.manual_seed(0)
    model = Flux(params).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    pipe = FluxImagePipeline(torch_dtype=torch.float32, device="cpu")
    pipe.set_component("dit", model)
    gen = torch.Generator().manual_seed(1)
    shared = {"latents": torch.randn(1, side * side, 64, generator=gen), "image_ids": image_ids(1, side, side),
              "prompt_emb": torch.randn(1, args.medium_text, 4096, generator=gen),
              "text_ids": text_ids(1, args.medium_text), "pooled_prompt_emb": torch.randn(1, 768, generator=gen),
              "guidance": torch.full((1,), 3.5)}  # fmt: skip
    sigmas = torch.linspace(1.0, 0.0, args.steps + 1)

    def generate(setting: str | None) -> tuple[float, int]:
        state = PipelineState(shared=dict(shared))
        spec = parse_cache_spec(setting)
        hook: Any = None
        if spec is not None:
            hook = TeaCache(spec.threshold, FLUX1_DEV, args.steps) if spec.kind == "teacache" else None
            hook = hook or FirstBlockCache(spec.threshold)
            state.positive["stack_hook"] = hook
        began = time.perf_counter()
        with torch.no_grad():
            for i in range(args.steps):
                v = pipe.predict_velocity(state.view("positive"), i, sigmas[i] * 1000)
                state.shared["latents"] = state.shared["latents"] + (sigmas[i + 1] - sigmas[i]) * v
        return time.perf_counter() - began, args.steps if hook is None else sum(hook.computed)

    base, _ = generate(None)
    emit(model="flux1-medium", setting="off", steps=args.steps, seconds=round(base, 2), speedup=1.0,
         computed_steps=args.steps, image_tokens=side * side, text_tokens=args.medium_text)  # fmt: skip
    for setting in settings:
        took, ran = generate(setting)
        emit(model="flux1-medium", setting=setting, steps=args.steps, seconds=round(took, 2),
             speedup=round(base / took, 3), computed_steps=ran, image_tokens=side * side,
             text_tokens=args.medium_text, coefficients="flux1-dev (forced: random weights)")  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# any pipeline (FLUX.1-dev on a GPU)
# ------------------------------------------------------------------------------------------------------------


def bench_pipeline(args: argparse.Namespace, settings: list[str]) -> None:
    from diffstudio.run_api import load_pipeline
    from diffstudio.runtime import Runtime

    pipe, defaults = load_pipeline(Runtime(), args.model, device=args.device, torch_dtype=args.dtype)
    pipe.set_progress_bar_config(disable=True)
    given = {"height": args.height, "width": args.width, "num_inference_steps": args.steps}
    arguments = {**defaults, **{k: v for k, v in given.items() if v is not None}}
    prompts = list(PROMPTS[: args.prompts])
    sync = torch.cuda.synchronize if str(pipe.device).startswith("cuda") else (lambda: None)
    pipe(prompts[0], seed=0, **{**arguments, "num_inference_steps": 2})  # warm-up
    reference: list[np.ndarray] = []
    for setting in [None, *settings]:
        took, values, ran = [], [], []
        for index, prompt in enumerate(prompts):
            sync()
            began = time.perf_counter()
            image = pipe(prompt, seed=index, **arguments, **cache_arguments(setting))
            sync()
            took.append(time.perf_counter() - began)
            report = pipe.last_run.step_cache
            ran.append(arguments.get("num_inference_steps", 0) if report is None else report["computed_steps"])
            array = np.asarray(image)
            if setting is None:
                reference.append(array)
            else:
                values.append(psnr(array, reference[index]))
        finite = [v for v in values if math.isfinite(v)]
        emit(model=",".join(args.model or ["embedded"]), setting=setting or "off", prompts=len(prompts),
             height=arguments.get("height"), width=arguments.get("width"), steps=arguments.get("num_inference_steps"),
             s_per_image=round(statistics.mean(took), 3), computed_steps=round(statistics.mean(ran), 2),
             psnr_db=None if setting is None else (round(statistics.mean(finite), 2) if finite else math.inf),
             device=str(pipe.device))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="shapes,medium", help="shapes, medium and/or pipeline (comma-separated)")
    parser.add_argument("--settings", default=None, help="comma-separated KIND:THRESHOLD settings to compare")
    parser.add_argument("--captions", type=int, default=200, help="held-out captions for shapes (default 200)")
    parser.add_argument("--batch", type=int, default=16, help="prompts per call for shapes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--steps", type=int, default=None, help="steps (medium: 20; pipeline: the model's)")
    parser.add_argument("--medium-tokens", type=int, default=1024, help="image tokens of the medium run (square)")
    parser.add_argument("--medium-text", type=int, default=512, help="text tokens of the medium run")
    parser.add_argument("--model", action="append", help="pipeline: model files / folder / id")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=4, help="pipeline: prompts (1-4)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)
    only = {part.strip() for part in args.only.split(",") if part.strip()}
    defaults = {
        "shapes": "teacache:0.15,teacache:0.3,teacache:0.5,teacache:0.8,fbcache:0.05,fbcache:0.1",
        "medium": "teacache:0.25,teacache:0.4,teacache:0.6,fbcache:0.05,fbcache:0.1",
        "pipeline": "teacache:0.25,teacache:0.4,teacache:0.6",
    }
    for name, run in (("shapes", bench_shapes), ("medium", bench_medium), ("pipeline", bench_pipeline)):
        if name in only:
            settings = [s for s in (args.settings or defaults[name]).split(",") if s]
            if name == "medium" and args.steps is None:
                args.steps = 20
            run(args, settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
