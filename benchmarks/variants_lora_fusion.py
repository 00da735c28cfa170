"""LoRA-Fusion's per-step overhead: one FLUX.1 DiT step with n side-path LoRAs gated by the merger vs summed.

Usage::

    .venv/bin/python benchmarks/variants_lora_fusion.py [--quick] [--repeat 3] [--threads 2] [--rank 16]

A section of ``benchmarks/flux1_variants.py`` (``run(args) -> rows``) and runnable alone (one JSON line per row).
The medium configuration is the FLUX.1 benchmarks' (``benchmarks/flux1.py``): a DiT of hidden 1024 (8 heads of
128), 3 double + 11 single blocks, T5 width 4096, 1024 image + 512 text tokens, fp32, random weights. Every Linear
the merger gates (10 per double block, 3 per single block) gets ``n`` rank-``--rank`` LoRAs as side paths; the
merger has random gates. Figures (median of ``--repeat`` alternating runs after a warm-up; ``best_of_ratio`` is
fastest over fastest):

* ``lora_fusion_step_ratio`` with ``loras`` = 2 and 4 (target <= 1.15 with 2): the gated step over the plain
  side-path sum on the same LoRAs.
* ``lora_side_path_step_ratio``: the plain sum over the DiT without LoRAs (context for the figure above).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

SECTION = "lora_fusion"
SIZES = {
    "medium": {"heads": 8, "depth": 3, "single": 11, "img": 1024, "txt": 512, "context": 4096, "pooled": 768},
    "quick": {"heads": 2, "depth": 1, "single": 2, "img": 256, "txt": 128, "context": 512, "pooled": 768},
}


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _compare(first: Callable[[], Any], second: Callable[[], Any], repeat: int) -> tuple[float, float, float]:
    """Median seconds of each (alternating, after one warm-up each) and the best-of ratio."""
    _timed(first), _timed(second)
    a, b = [], []
    for _ in range(repeat):
        a.append(_timed(first))
        b.append(_timed(second))
    return statistics.median(a), statistics.median(b), min(a) / min(b)


def build(size: dict[str, int], device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[Any, dict[str, Any]]:
    """A random medium FLUX.1 DiT (ours) and one step's inputs, on ``device`` in ``dtype``."""
    from diffstudio_flux1.math import image_ids, text_ids
    from diffstudio_flux1.model import Flux
    from diffstudio_flux1.params import FluxParams

    torch.manual_seed(0)
    params = FluxParams(hidden_size=128 * size["heads"], num_heads=size["heads"], depth=size["depth"],
                        depth_single_blocks=size["single"], context_in_dim=size["context"],
                        vec_in_dim=size["pooled"])  # fmt: skip
    dit = Flux(params).eval().to(device, dtype)
    side = int(size["img"] ** 0.5)
    inputs = {
        "img": torch.randn(1, size["img"], 64), "img_ids": image_ids(1, side, side),
        "txt": torch.randn(1, size["txt"], size["context"]), "txt_ids": text_ids(1, size["txt"]),
        "timesteps": torch.tensor([0.7]), "y": torch.randn(1, size["pooled"]), "guidance": torch.tensor([3.5]),
    }  # fmt: skip
    inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
    return dit, inputs


def _attach(dit: Any, count: int, rank: int) -> list[str]:
    from diffstudio.dit.diffsynth_names import diffsynth_key
    from diffstudio.lora import LoraWeights, attach_lora
    from diffstudio.nn import delta_linears

    gen = torch.Generator().manual_seed(count)
    names = []
    for i in range(count):
        lora = {}
        for path, layer in delta_linears(dit):
            if diffsynth_key(path) is None:
                continue
            down = torch.randn(rank, layer.in_features, generator=gen) / layer.in_features**0.5
            up = 0.01 * torch.randn(layer.out_features, rank, generator=gen)
            lora[path] = LoraWeights(down.to(layer.weight), up.to(layer.weight), float(rank))
        attach_lora(dit, lora, f"lora_{i}")
        names.append(f"lora_{i}")
    return names


def run(args: Any) -> list[dict[str, Any]]:
    """The section's rows (JSON-able dicts); ``args`` may carry ``quick``, ``repeat``, ``threads``, ``rank``."""
    from diffstudio.dit.diffsynth_names import diffsynth_key
    from diffstudio.lora import detach_lora
    from diffstudio.nn import delta_linears
    from diffstudio_lora_fusion.model import FluxLoraFusion

    quick, repeat = bool(getattr(args, "quick", False)), int(getattr(args, "repeat", 3))
    rank = int(getattr(args, "rank", 16))
    threads = getattr(args, "threads", None)
    if threads:
        torch.set_num_threads(int(threads))
    device, dtype = str(getattr(args, "device", "cpu")), getattr(torch, str(getattr(args, "dtype", "float32")))
    name = "quick" if quick else "medium"
    size = SIZES[name]
    dit, inputs = build(size, device, dtype)
    dims = {str(diffsynth_key(p)): layer.out_features for p, layer in delta_linears(dit) if diffsynth_key(p)}
    fusion = FluxLoraFusion(dims).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in fusion.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    fusion.to(device, dtype)
    common = {"section": SECTION, "size": name, "threads": torch.get_num_threads(), "rank": rank, "device": device,
              "dtype": str(dtype).removeprefix("torch."),
              "gated_layers": len(dims), **size}  # fmt: skip
    rows: list[dict[str, Any]] = []

    def step() -> Any:
        return dit(**inputs)

    plain_s = statistics.median([_timed(step) for _ in range(max(repeat, 1))])
    for count in (2, 4):
        names = _attach(dit, count, rank)
        fusion.enable(dit)

        def gated() -> Any:
            return dit(**inputs)

        def summed_step() -> Any:
            fusion.disable(dit)
            try:
                return dit(**inputs)
            finally:
                fusion.enable(dit)

        gated_s, summed, best = _compare(gated, summed_step, repeat)
        rows.append({**common, "figure": "lora_fusion_step_ratio", "loras": count, "value": round(gated_s / summed, 4),
                     "unit": "x", "gated_s": round(gated_s, 4), "summed_s": round(summed, 4),
                     "best_of_ratio": round(best, 4), "target": "<= 1.15 with 2 LoRAs"})  # fmt: skip
        rows.append({**common, "figure": "lora_side_path_step_ratio", "loras": count,
                     "value": round(summed / plain_s, 4), "unit": "x", "summed_s": round(summed, 4),
                     "no_lora_s": round(plain_s, 4)})  # fmt: skip
        fusion.disable(dit)
        for each in names:
            detach_lora(dit, each)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    for row in run(parser.parse_args()):
        print(json.dumps(row))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
