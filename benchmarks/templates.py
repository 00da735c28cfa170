"""KV-cache template medium overhead: one FLUX.2 DiT step with a 512-token cache in every block vs without.

Usage::

    .venv/bin/python benchmarks/templates.py [--size medium|quick] [--device cpu|cuda] [--dtype float32|bfloat16]
        [--cache-tokens 512] [--repeat 5] [--threads 2]

``--size medium`` is the issue's configuration (the same as ``benchmarks/flux2.py``): a klein-style DiT of about
237M parameters (3 double + 10 single blocks, 8 heads of 128), 1024 image tokens and 512 text tokens, batch 1,
random weights. The cache comes from the KV-cache medium's own path (a template cache merged by
``diffstudio_template_sdk.media.merge_kv_caches`` from two templates of 256 tokens each, then handed to the DiT as
``kv_extension``, which is what ``flux2_extensions`` does). Each timed call is one DiT forward (one denoising
step of one CFG branch); the two variants alternate, one warm-up each, median of ``--repeat``. One JSON line
per figure; ``kv_cache_step_ratio`` (with / without, medians) has the target <= 1.10;
``kv_cache_step_ratio_best_of`` (fastest runs) is the figure to read on a machine shared with other work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from diffstudio_flux2.math import image_ids, text_ids
from diffstudio_flux2.model import Flux2
from diffstudio_flux2.params import Flux2Params
from diffstudio_template_sdk.media import merge_kv_caches

SIZES: dict[str, dict[str, int]] = {
    "medium": {"heads": 8, "depth": 3, "depth_single": 10, "image_side": 32, "text_tokens": 512},
    "quick": {"heads": 4, "depth": 1, "depth_single": 4, "image_side": 16, "text_tokens": 128},
}


def build(size: dict[str, int], device: str, dtype: torch.dtype) -> Flux2:
    params = Flux2Params(in_channels=128, context_in_dim=7680, hidden_size=size["heads"] * 128,
                         num_heads=size["heads"], depth=size["depth"], depth_single_blocks=size["depth_single"],
                         use_guidance_embed=False)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = Flux2(params)
    for p in model.parameters():  # keep activations in range with random weights
        torch.nn.init.normal_(p, std=0.02)
    return model.to(dtype).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Any, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--cache-tokens", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    size = SIZES[args.size]
    model = build(size, args.device, dtype)
    side, txt = size["image_side"], size["text_tokens"]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, side * side, 128, generator=gen).to(args.device, dtype)
    ctx = torch.randn(1, txt, 7680, generator=gen).to(args.device, dtype)
    x_ids, ctx_ids = image_ids(1, side, side, device=args.device), text_ids(1, txt, device=args.device)
    t = torch.full((1,), 0.5, device=args.device, dtype=dtype)
    heads, head_dim = model.num_heads, model.hidden_size // model.num_heads
    half = args.cache_tokens // 2
    caches = [
        {name: (torch.randn(1, n, heads, head_dim, generator=gen).to(args.device, dtype),
                torch.randn(1, n, heads, head_dim, generator=gen).to(args.device, dtype)) for name in model.block_names}
        for n in (half, args.cache_tokens - half)
    ]  # fmt: skip
    kv = merge_kv_caches(caches)
    runs: dict[str, list[float]] = {"without": [], "with": []}

    def step(with_cache: bool) -> None:
        with torch.inference_mode():
            model(x, x_ids, t, ctx, ctx_ids, None, kv_extension=kv if with_cache else None)

    step(False), step(True)  # warm-up
    for _ in range(args.repeat):
        runs["without"].append(timed(lambda: step(False), args.device))
        runs["with"].append(timed(lambda: step(True), args.device))
    without, with_cache = statistics.median(runs["without"]), statistics.median(runs["with"])
    config = {"size": args.size, "device": args.device, "dtype": str(dtype).removeprefix("torch."),
              "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1), "image_tokens": side * side,
              "text_tokens": txt, "cache_tokens_per_block": args.cache_tokens, "blocks": len(model.block_names),
              "threads": args.threads, "repeat": args.repeat}  # fmt: skip
    print(json.dumps({"figure": "dit_step_without_cache_ms", "value": round(without * 1e3, 2), **config}))
    print(json.dumps({"figure": "dit_step_with_cache_ms", "value": round(with_cache * 1e3, 2), **config}))
    ratio = with_cache / without
    print(json.dumps({"figure": "kv_cache_step_ratio", "value": round(ratio, 4), "target": 1.10,
                      "met": ratio <= 1.10, **config}))  # fmt: skip
    tokens = side * side + txt  # every block attends over [text, image]
    linear = 2 * tokens * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = len(model.block_names) * 4 * tokens * model.hidden_size
    estimate = (linear + attention * (tokens + args.cache_tokens)) / (linear + attention * tokens)
    print(json.dumps({"figure": "kv_cache_flops_ratio_estimate", "value": round(estimate, 4), **config}))
    best = min(runs["with"]) / min(runs["without"])  # less sensitive to other load on the machine
    print(json.dumps({"figure": "kv_cache_step_ratio_best_of", "value": round(best, 4), "target": 1.10,
                      "met": best <= 1.10, **config}))  # fmt: skip


if __name__ == "__main__":
    main()
