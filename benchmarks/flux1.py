"""FLUX.1 benchmark: diffstudio-flux1 against diffusers in the same run, on the same weights.

Usage::

    .venv/bin/python benchmarks/flux1.py [--quick] [--threads 2] [--repeat 3] [--only dit,load,single,pipeline]
        [--out DIR] [--dtype float32|bfloat16] [--diffusers-budget S]

The default (medium) configuration is the issue's: a FLUX.1 DiT of about 290M parameters (hidden 1024 = 8
heads of 128, 3 double + 11 single blocks, T5 width 4096, CLIP width 768), 1024 image tokens and 512 text
tokens, fp32, two threads. ``--quick`` (about 20M parameters, 256 + 128 tokens) finishes in a minute or two.
Folders are built once under ``--out``. One JSON line per figure; ratios are ours / diffusers (below 1 is
faster):

* ``dit_forward_ratio`` (target <= 0.9): ``Flux.forward`` vs ``FluxTransformer2DModel.forward`` on the same
  inputs, alternating, median of ``--repeat`` runs after a warm-up; the outputs' max abs difference beside it.
* ``cold_load_ratio_vs_from_pretrained`` (<= 1.0): a fresh process per run (imports done before the clock),
  files read once and then evicted from the page cache (``coldcache.py``: the caches below the VM start level),
  one discarded round, then each side first in alternate repeats, clock stopped once one element of every 4 KiB
  page of every weight has been read; ours loads the diffusers ``transformer/`` folder through
  ``FluxImagePipeline.from_pretrained``.
* ``cold_load_ratio_vs_from_single_file`` (<= 0.8): the same for the BFL single file vs diffusers'
  ``from_single_file``. diffusers' FLUX.1 single-file converter hard-codes FLUX.1-dev's width (3072) for the
  single blocks, so this figure uses a 3072-wide DiT (1 double + 1 single block, about 480M parameters).
  Each round also times ``coldcache.plain_read`` of the same file (no model: the cold-read yardstick) and the
  ratio line carries ``paired_ratio_median`` (the median of the rounds' own ratios), ``runs_s`` and each side's
  best over the plain read. The headline value stays the ratio of the best runs. ``warm_load_ratio_*`` (no
  target) repeat each pair with the files already in the page cache: the loaders' own work.
* ``pipeline_ratio`` (<= 1.0): a full 4-step text-to-image call (CLIP + T5 prompt encoding, 4 DiT steps, VAE
  decode, PIL) at 512 x 512 with the same initial noise, ``FluxImagePipeline`` vs ``FluxPipeline``. The text
  encoders and the 4-level VAE are tiny (built as in the plugin's tests) so the DiT dominates.

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
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from coldcache import paired_rounds, run_load, summary
from diffstudio.testing import import_file
from precision import DTYPES, diffusers_estimate, dit_precision_figures, estimated_pipeline_ratio

BENCH = "flux1"
PAGE = 4096
PROMPT = "a red circle on a blue background, soft light"
TESTS = Path(__file__).resolve().parents[1] / "plugins" / "flux1" / "tests"


@dataclass(frozen=True)
class Size:
    """DiT and workload size (``hidden = heads * 128``; image tokens form a square grid)."""

    name: str
    heads: int
    depth: int
    depth_single: int
    image_tokens: int
    text_tokens: int
    context: int = 4096
    pooled: int = 768


SIZES = {
    "medium": Size("medium", heads=8, depth=3, depth_single=11, image_tokens=1024, text_tokens=512),
    "quick": Size("quick", heads=2, depth=1, depth_single=2, image_tokens=256, text_tokens=128, context=512),
    "single": Size("single", heads=24, depth=1, depth_single=1, image_tokens=1024, text_tokens=512),
}


def emit(figure: str, value: float, unit: str, **extra: Any) -> None:
    print(json.dumps({"benchmark": BENCH, "figure": figure, "value": round(value, 4), "unit": unit, **extra}))
    sys.stdout.flush()


def ratio(figure: str, ours: float, theirs: float, target: str, **extra: Any) -> None:
    emit(figure, ours / theirs, "x", ours_s=round(ours, 4), diffusers_s=round(theirs, 4), target=target, **extra)


def _fixtures() -> Any:
    return import_file(TESTS / "fixtures_text.py")


# -- model folders ------------------------------------------------------------------------------------------


def build_repository(out: Path, size: Size, with_pipeline: bool = True) -> Path:
    """Write (once) ``transformer/``, ``flux1.safetensors`` and, with ``with_pipeline``, tiny text/VAE parts."""
    from diffstudio_flux1.convert import convert_diffusers_to_bfl_dit
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from safetensors.torch import load_file, save_file

    folder = out / f"flux1-{size.name}"
    spec = {**asdict(size), "pipeline": with_pipeline, "version": 1}
    if (folder / "spec.json").is_file() and json.loads((folder / "spec.json").read_text()) == spec:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    dit = FluxTransformer2DModel(
        in_channels=64, num_layers=size.depth, num_single_layers=size.depth_single, attention_head_dim=128,
        num_attention_heads=size.heads, joint_attention_dim=size.context, pooled_projection_dim=size.pooled,
        guidance_embeds=True,
    )  # fmt: skip
    dit.save_pretrained(folder / "transformer")
    state: dict[str, torch.Tensor] = {}
    for file in sorted((folder / "transformer").glob("*.safetensors")):
        state.update(load_file(file))
    save_file(
        {k: v.contiguous() for k, v in convert_diffusers_to_bfl_dit(state).items()}, str(folder / "flux1.safetensors")
    )
    if with_pipeline:
        fx = _fixtures()
        fx.build_clip_encoder(folder / "text_encoder", fx.build_clip_tokenizer(folder / "tokenizer"))
        _widen_text(fx, folder, size)
        AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=16, norm_num_groups=32,
            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        ).save_pretrained(folder / "vae")  # fmt: skip
        FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0).save_pretrained(folder / "scheduler")
        parts = {
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "image_encoder": [None, None],
            "feature_extractor": [None, None],
        }
        index = {"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1", **parts}
        (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    (folder / "spec.json").write_text(json.dumps(spec))
    return folder


def _widen_text(fx: Any, folder: Path, size: Size) -> None:
    """A one-layer T5 of width ``size.context`` and a CLIP of width ``size.pooled`` (the DiT's input widths)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    t5_vocab = fx.build_t5_tokenizer(folder / "tokenizer_2")
    t5 = T5EncoderModel(T5Config(vocab_size=t5_vocab, d_model=size.context, d_kv=64, d_ff=256, num_layers=1,
                                 num_heads=2, feed_forward_proj="gated-gelu", is_encoder_decoder=False))  # fmt: skip
    t5.save_pretrained(folder / "text_encoder_2")
    clip_cfg = CLIPTextConfig.from_pretrained(folder / "text_encoder")
    clip_cfg.hidden_size, clip_cfg.intermediate_size, clip_cfg.projection_dim = size.pooled, 256, size.pooled
    clip_cfg.num_attention_heads = 4
    CLIPTextModel(clip_cfg).save_pretrained(folder / "text_encoder")


def parameter_count(folder: Path) -> int:
    from diffstudio.loading import Checkpoint

    with Checkpoint.open(folder / "flux1.safetensors") as checkpoint:
        return sum(int(torch.Size(checkpoint.shape(k)).numel()) for k in checkpoint.keys())


# -- DiT forward ---------------------------------------------------------------------------------------------


def load_ours(paths: list[Path], runtime: Any = None, dtype: torch.dtype = torch.float32) -> Any:
    from diffstudio import ModelConfig
    from diffstudio_flux1.pipeline import FluxImagePipeline

    pipe = FluxImagePipeline.from_pretrained(
        torch_dtype=dtype,
        device="cpu",
        model_configs=[ModelConfig(path=str(p)) for p in paths],
        runtime=runtime,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_dit(
    folder: Path, size: Size, repeat: int, dtype: torch.dtype = torch.float32, budget_s: float = 600.0
) -> float | None:
    """Time the DiT forward; return diffusers' estimated seconds per forward when its run is skipped (bf16)."""
    from diffstudio_flux1.math import image_ids, text_ids
    from diffusers import FluxTransformer2DModel

    ours = load_ours([folder / "flux1.safetensors"], dtype=dtype).dit
    theirs = FluxTransformer2DModel.from_pretrained(str(folder / "transformer"), torch_dtype=dtype).eval()
    gen = torch.Generator().manual_seed(0)
    grid = int(round(size.image_tokens**0.5))
    inp = {
        "img": torch.randn(1, size.image_tokens, 64, generator=gen),
        "img_ids": image_ids(1, grid, grid)[0],
        "txt": torch.randn(1, size.text_tokens, size.context, generator=gen),
        "txt_ids": text_ids(1, size.text_tokens)[0],
        "timesteps": torch.tensor([0.7]),
        "y": torch.randn(1, size.pooled, generator=gen),
        "guidance": torch.tensor([3.5]),
    }
    inp = {k: v.to(dtype) if k in ("img", "txt", "y") else v for k, v in inp.items()}

    def run_ours() -> torch.Tensor:
        out: torch.Tensor = ours(**inp)
        return out

    def run_theirs() -> torch.Tensor:
        out: torch.Tensor = theirs(
            hidden_states=inp["img"], encoder_hidden_states=inp["txt"], pooled_projections=inp["y"],
            timestep=inp["timesteps"], img_ids=inp["img_ids"], txt_ids=inp["txt_ids"], guidance=inp["guidance"],
            return_dict=False,
        )[0]  # fmt: skip
        return out

    if dtype != torch.float32:
        hidden = size.heads * 128
        dit_precision_figures(BENCH, dtype, hidden, run_ours, run_theirs, repeat, budget_s,
                              image_tokens=size.image_tokens, text_tokens=size.text_tokens)  # fmt: skip
        return diffusers_estimate(run_ours, dtype, hidden, budget_s)
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    with torch.inference_mode():
        diff = (run_ours() - run_theirs()).abs().max().item()
        for _ in range(repeat):
            for name, fn in (("ours", run_ours), ("diffusers", run_theirs)):
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
    ratio("dit_forward_ratio", statistics.median(times["ours"]), statistics.median(times["diffusers"]), "<= 0.9",
          ours_min_s=round(min(times["ours"]), 4), diffusers_min_s=round(min(times["diffusers"]), 4),
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
    """Import everything, then time one load + touch (``ours_bfl``, ``ours_folder``, ``from_pretrained``, ...)."""
    from diffstudio.runtime import Runtime
    from diffstudio_flux1 import convert, loaders, model, pipeline  # noqa: F401  (imports before the clock)
    from diffusers import FluxTransformer2DModel

    torch.set_num_threads(2)
    runtime = Runtime()  # plugin discovery is a per-process cost, like diffusers' imports
    runtime.hooks.families_asked()
    started = time.perf_counter()
    if kind.startswith("ours"):
        dit = load_ours([folder / ("flux1.safetensors" if kind == "ours_bfl" else "transformer")], runtime).dit
    elif kind == "from_pretrained":
        dit = FluxTransformer2DModel.from_pretrained(str(folder / "transformer"), torch_dtype=torch.float32)
    else:
        dit = FluxTransformer2DModel.from_single_file(
            str(folder / "flux1.safetensors"), config=str(folder), subfolder="transformer", torch_dtype=torch.float32
        )
    loaded = time.perf_counter()
    touch(dit)
    return {"load_s": loaded - started, "total_s": time.perf_counter() - started}


def _env() -> dict[str, str]:
    threads = str(torch.get_num_threads())
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1"}


def bench_load(folder: Path, repeat: int, kinds: tuple[tuple[str, str], str, str]) -> None:
    (ours_kind, theirs_kind), figure, target = kinds
    single_file = ours_kind == "ours_bfl"

    def run(kind: str, cold: bool = True) -> dict[str, float]:
        return run_load(Path(__file__), kind, folder, folder / "flux1.safetensors", _env(), cold=cold)

    runs = paired_rounds((ours_kind, theirs_kind, *(["plain_read"] if single_file else [])), run, repeat)
    best = {kind: min(kind_runs, key=lambda r: r["total_s"]) for kind, kind_runs in runs.items()}
    gb = round((folder / "flux1.safetensors").stat().st_size / 1e9, 3)
    for kind, best_run in best.items():
        load_s = round(best_run.get("load_s", best_run["total_s"]), 4)
        emit(f"cold_load_{kind}_s", best_run["total_s"], "s", load_s=load_s, file_gb=gb)
    ratio(figure, best[ours_kind]["total_s"], best[theirs_kind]["total_s"], target, file_gb=gb,
          dit_parameters=parameter_count(folder),
          **summary(runs, ours_kind, theirs_kind, "plain_read" if single_file else None))  # fmt: skip
    warm = paired_rounds((ours_kind, theirs_kind), lambda kind: run(kind, cold=False), repeat)
    warm_best = {kind: min(r["total_s"] for r in kind_runs) for kind, kind_runs in warm.items()}
    ratio(f"warm_{figure[len('cold_'):]}", warm_best[ours_kind], warm_best[theirs_kind], "none",
          what="files already in the page cache: the loaders' own work, without the disk")  # fmt: skip


# -- full pipeline -------------------------------------------------------------------------------------------


def bench_pipeline(
    folder: Path, size: Size, repeat: int, dtype: torch.dtype = torch.float32, dit_estimate: float | None = None
) -> None:
    """4-step pipeline ours / diffusers; ``dit_estimate``: diffusers' DiT seconds when too slow to run (bf16)."""
    import numpy as np
    from diffstudio_flux1.math import pack_latents
    from diffusers import FluxPipeline

    ours = load_ours([folder / n for n in ("text_encoder", "text_encoder_2", "flux1.safetensors", "vae")], dtype=dtype)
    theirs = FluxPipeline.from_pretrained(str(folder), torch_dtype=dtype)
    theirs.set_progress_bar_config(disable=True)
    side = int(round(size.image_tokens**0.5)) * 16
    noise = pack_latents(torch.randn(1, 16, side // 8, side // 8, generator=torch.Generator().manual_seed(0))).to(dtype)
    common = {"height": side, "width": side, "num_inference_steps": 4}

    def run_ours() -> Any:
        return ours(PROMPT, latents=noise, t5_sequence_length=size.text_tokens, embedded_guidance=3.5, **common)

    def run_theirs() -> Any:
        return theirs(PROMPT, latents=noise, max_sequence_length=size.text_tokens, guidance_scale=3.5, **common).images[
            0
        ]

    name = "" if dtype == torch.float32 else "_" + str(dtype).removeprefix("torch.")
    if dit_estimate is not None:
        estimated_pipeline_ratio(ratio, f"pipeline_ratio{name}", run_ours, repeat, dit_estimate)
        return
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    with torch.inference_mode():
        first = np.asarray(run_ours(), dtype=np.float32) - np.asarray(run_theirs(), dtype=np.float32)
        for _ in range(repeat):
            for name, fn in (("ours", run_ours), ("diffusers", run_theirs)):
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
    ratio(f"pipeline_ratio{name}", statistics.median(times["ours"]), statistics.median(times["diffusers"]),
          "<= 0.8" if name else "<= 1.0",
          steps=4, image=f"{side}x{side}", image_tokens=size.image_tokens, text_tokens=size.text_tokens,
          max_pixel_diff=float(np.abs(first).max()))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model and 256 + 128 tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="dit,load,single,pipeline", help="comma-separated parts to run")
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
    size = SIZES["quick" if args.quick else "medium"]
    parts = set(args.only.split(","))
    started = time.perf_counter()
    folder = build_repository(args.out, size)
    emit("prepare_s", time.perf_counter() - started, "s", folder=str(folder), size=size.name,
         dit_parameters=parameter_count(folder), threads=args.threads, torch=torch.__version__)  # fmt: skip
    dtype = DTYPES[args.dtype]
    estimate = None
    if "dit" in parts:
        estimate = bench_dit(folder, size, args.repeat, dtype, args.diffusers_budget)
    if dtype != torch.float32:
        parts -= {"load", "single"}
    if "load" in parts:
        bench_load(
            folder, args.repeat, (("ours_folder", "from_pretrained"), "cold_load_ratio_vs_from_pretrained", "<= 1.0")
        )
    if "single" in parts:
        wide = folder if args.quick else build_repository(args.out, SIZES["single"], with_pipeline=False)
        if args.quick:
            emit("single_file_note", 0, "-", note="--quick: diffusers' from_single_file needs width 3072; skipped")
        else:
            bench_load(wide, args.repeat, (("ours_bfl", "from_single_file"), "cold_load_ratio_vs_from_single_file",
                                           "<= 0.8"))  # fmt: skip
    if "pipeline" in parts:
        bench_pipeline(folder, size, args.repeat, dtype, estimate)


if __name__ == "__main__":
    main()
