"""LoRA-encoder encoding time for one LoRA: the published sizes (304 layers, 4096 wide, 4865 tokens) on random weights.

Usage::

    .venv/bin/python benchmarks/variants_lora_encoder.py [--size official|small] [--rank 16] [--repeat 2]
        [--threads 2] [--device cpu|cuda] [--dtype float32|bfloat16]

A section of ``benchmarks/flux1_variants.py`` (``run(args) -> rows``) and runnable alone (one JSON line per row).
``official`` is DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev's architecture (about 701M parameters: 304 layer blocks of
16 probes, 13 projections to 4096, one CLIP layer of 32 x 128 heads and MLP 8192) with random weights, and one
random rank-``--rank`` LoRA on all 304 FLUX.1-dev layers, written as a kohya file. Figures:

* ``lora_encoder_encode_s``: the encoder forward for one LoRA (median of ``--repeat`` after a warm-up), the LoRA
  already read (what every generation after the first and every training step costs).
* ``lora_encoder_file_s``: reading the kohya file, converting it to the canonical fused form and encoding, uncached
  (the first use of a file).
* ``lora_encoder_params``: the encoder's parameter count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SECTION = "lora_encoder"


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def build(size: str, device: str, dtype: torch.dtype) -> Any:
    """A random LoRA encoder (built on meta, then filled; no slow default init) of the ``size`` sizes."""
    from diffstudio_lora_encoder.model import FluxLoraEncoder, LoraEncoderParams

    if size == "official":
        params = LoraEncoderParams.official()
    else:  # a quarter-width model over 2 + 4 blocks of a FLUX.1 DiT of hidden 768 (a smoke run)
        full = LoraEncoderParams.official(double=2, single=4)
        shrink = {3072: 768, 9216: 2304, 12288: 3072, 18432: 4608, 21504: 5376, 15360: 3840}
        layers = tuple(s.__class__(s.key, s.type, shrink[s.d_in], shrink[s.d_out]) for s in full.layers)
        params = LoraEncoderParams(layers, 1024, 16, 1, 1, 2048, 8)
    with torch.device("meta"):
        model = FluxLoraEncoder(params)
    model = model.to_empty(device=device)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if p.ndim < 2 else p.shape[-1] ** -0.5
            value = torch.randn(p.shape, generator=gen) * scale
            if "norm" in name and name.endswith("weight"):
                value = value * 0.1 + 1.0
            p.copy_(value)
    return model.to(dtype).eval()


def _lora_file(model: Any, rank: int, folder: Path) -> Path:
    from diffstudio.dit.diffsynth_names import bfl_path
    from diffstudio.lora import LoraWeights
    from diffstudio.runtime import Runtime
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    lora = {str(bfl_path(s.key)): LoraWeights(torch.randn(rank, s.d_in, generator=gen) * s.d_in**-0.5,
                                              torch.randn(s.d_out, rank, generator=gen) * 0.1, float(rank))
            for s in model.layers}  # fmt: skip
    fmt = {f.name: f for f in Runtime().hooks.lora_formats()}["flux1/kohya"]
    tensors, metadata = fmt.from_canonical(lora)
    path = folder / "lora.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or None)
    return path


def run(args: Any) -> list[dict[str, Any]]:
    """The section's rows; ``args`` may carry ``size``, ``rank``, ``repeat``, ``threads``, ``device``, ``dtype``."""
    from diffstudio.runtime import Runtime
    from diffstudio_lora_encoder.inputs import encoder_pairs
    from diffstudio_lora_encoder.units import encode_loras

    size, rank, repeat = str(getattr(args, "size", "official")), int(getattr(args, "rank", 16)), int(
        getattr(args, "repeat", 2)
    )  # fmt: skip
    if getattr(args, "quick", False):
        size = "small"
    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))
    device, dtype = str(getattr(args, "device", "cpu")), getattr(torch, str(getattr(args, "dtype", "float32")))
    runtime = Runtime()
    model = build(size, device, dtype)
    count = sum(p.numel() for p in model.parameters())
    common = {"section": SECTION, "size": size, "rank": rank, "device": device, "dtype": str(dtype)[6:],
              "threads": torch.get_num_threads(), "layers": len(model.layers),
              "tokens": 1 + len(model.layers) * model.params.num_embeds_per_lora}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = _lora_file(model, rank, Path(tmp))
        cold = _timed(lambda: encode_loras(model, runtime, path))
        pairs = encoder_pairs(model, runtime, [path], "error")[0]
        _timed(lambda: model(pairs))
        warm = statistics.median([_timed(lambda: model(pairs)) for _ in range(max(repeat, 1))])
    return [
        {**common, "figure": "lora_encoder_encode_s", "value": round(warm, 4), "unit": "s"},
        {**common, "figure": "lora_encoder_file_s", "value": round(cold, 4), "unit": "s"},
        {**common, "figure": "lora_encoder_params", "value": count, "unit": "parameters"},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", default="official", choices=["official", "small"])
    parser.add_argument("--quick", action="store_true", help="the small size (a smoke run)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    for row in run(parser.parse_args()):
        print(json.dumps(row))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
