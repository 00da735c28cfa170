"""FLUX.1 seed variants benchmark (issue 24): Flex.2, and the LoRA encoder and LoRA fusion when their modules exist.

Usage::

    .venv/bin/python benchmarks/flux1_variants.py [--quick] [--threads 2] [--repeat 5] [--only flex,lora_encoder,fusion]
        [--out DIR]

The medium configuration is ``benchmarks/flux1.py``'s (hidden 1024 = 8 heads of 128, 3 double + 11 single blocks,
T5 width 4096, CLIP width 768, 1024 image tokens = 512 x 512 pixels, 512 text tokens), fp32, two threads; ``--quick``
is its small one. One JSON line per figure. Sections:

* ``flex``: ``flex_step_ratio`` (target <= 1.02), one Flex.2 denoising step through ``FluxImagePipeline.
  predict_velocity`` (the ``flex_conditioning`` unit's per-call hook picks the conditioning with or without the
  control image, the DiT concatenates it to the latents) over the same DiT called directly on a ready 196-channel
  input; steps before and after the control stop alternate with the plain calls, median of ``--repeat`` each.
  ``conditioning_overhead_s`` times what the Flex step adds (hook, merge, channel concatenation) over 200
  repetitions, and ``overhead_bound_ratio`` is ``1 + overhead / fastest plain step``: the ratio without timing
  noise (the outputs are identical, ``max_abs_diff_step0`` 0).
* ``lora_encoder``: ``benchmarks/variants_lora_encoder.py``'s ``run(args)`` (encoding time for one LoRA).
* ``fusion``: ``benchmarks/variants_lora_fusion.py``'s ``run(args)`` (per-step overhead with 2 and 4 LoRAs).

A section whose module is not there is skipped with a ``skipped`` line. Each section module exposes
``run(args) -> list[dict]`` (the figures, without the ``benchmark`` key) and receives this script's arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffstudio.testing import import_file

BENCH = "flux1_variants"
HERE = Path(__file__).resolve().parent
SECTIONS = {"flex": None, "lora_encoder": "variants_lora_encoder.py", "fusion": "variants_lora_fusion.py"}


def emit(record: dict[str, Any]) -> None:
    """Print one figure as a JSON line."""
    print(json.dumps({"benchmark": BENCH, **record}))
    sys.stdout.flush()


def _timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


# -- flex ---------------------------------------------------------------------------------------------------


def build_flex(out: Path, size: Any) -> Path:
    """A Flex.2-shaped BFL DiT (196 input channels, guidance embedder) of ``size``, written once."""
    from diffstudio_flux1.convert import convert_diffusers_to_bfl_dit
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    path = out / f"flex-{size.name}.safetensors"
    if path.is_file():
        return path
    torch.manual_seed(1)
    dit = FluxTransformer2DModel(
        in_channels=196, out_channels=64, num_layers=size.depth, num_single_layers=size.depth_single,
        attention_head_dim=128, num_attention_heads=size.heads, joint_attention_dim=size.context,
        pooled_projection_dim=size.pooled, guidance_embeds=True,
    )  # fmt: skip
    state = {k: v.contiguous() for k, v in convert_diffusers_to_bfl_dit(dit.state_dict()).items()}
    save_file(state, str(path.with_suffix(".tmp")))
    path.with_suffix(".tmp").rename(path)
    return path


def run_flex(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``flex_step_ratio``: a Flex.2 step through the pipeline over the bare 196-channel DiT call."""
    from diffstudio.dit.extensions import DitCall, call_extensions
    from PIL import Image

    flux1 = import_file(HERE / "flux1.py")
    size = flux1.SIZES["quick" if args.quick else "medium"]
    base = flux1.build_repository(args.out, size)
    dit_path = build_flex(args.out, size)
    pipe = flux1.load_ours([dit_path, base / "vae", base / "text_encoder", base / "text_encoder_2"])
    assert pipe.dit.in_channels == 196 and pipe.loaded["dit"].claim.model_type == "flux1-dit/flex"
    side = 16 * int(round(size.image_tokens**0.5))
    control = Image.fromarray(
        (torch.rand(side, side, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()
    )
    steps = 4
    inputs = pipe.call_inputs("a red circle", height=side, width=side, num_inference_steps=steps, seed=0,
                              t5_sequence_length=size.text_tokens, flex_control_image=control)  # fmt: skip
    with torch.inference_mode():
        state = pipe.prepare(inputs)
    view = state.view("positive")
    assert "flex" in view["call_hooks"], "the control stops within the schedule: the per-call hook must be used"
    timesteps = state.shared["timesteps"]
    latents = view["latents"]
    t = (timesteps[0] / 1000).expand(1).to(latents.dtype)
    txt, y, guidance = view["prompt_emb"], view["pooled_prompt_emb"], view["guidance"]
    call = DitCall(latents, view["image_ids"], txt, view["text_ids"], t, y, guidance, 0)
    full = torch.cat([latents, call_extensions(view, lambda: call)["img_cond"]], dim=-1)  # (1, L, 196)

    def flex_step(step: int) -> Callable[[], Any]:
        return lambda: pipe.predict_velocity(view, step, timesteps[step])

    def plain_step() -> Any:
        return pipe.dit(full, view["image_ids"], txt, view["text_ids"], t, y, guidance)

    times: dict[str, list[float]] = {"flex": [], "plain": []}
    with torch.inference_mode():
        same = (pipe.predict_velocity(view, 0, timesteps[0]) - plain_step()).abs().max().item()
        plain_step()
        for i in range(args.repeat):
            step = (0, steps - 1)[i % 2]  # before and after the control stop
            for name, fn in (("flex", flex_step(step)), ("plain", plain_step)):
                times[name].append(_timed(fn))
        # what a Flex step adds to the bare call: the hook, the merge and the channel concatenation (cheap, so
        # timed over many repetitions; a load-independent bound on the ratio next to the noisy step timings)
        extra = []
        for _ in range(200):
            started = time.perf_counter()
            cond = call_extensions(view, lambda: call)["img_cond"]
            torch.cat([latents, cond.expand(latents.shape[0], -1, -1)], dim=-1)
            extra.append(time.perf_counter() - started)
    flex_s, plain_s = statistics.median(times["flex"]), statistics.median(times["plain"])
    overhead_s = statistics.median(extra)
    return [{
        "figure": "flex_step_ratio", "value": round(flex_s / plain_s, 4), "unit": "x", "target": "<= 1.02",
        "flex_s": round(flex_s, 4), "plain_196_s": round(plain_s, 4), "max_abs_diff_step0": same,
        "ratio_of_min": round(min(times["flex"]) / min(times["plain"]), 4), "conditioning_overhead_s": overhead_s,
        "overhead_bound_ratio": round(1 + overhead_s / min(times["plain"]), 6),
        "flex_runs_s": [round(x, 4) for x in times["flex"]], "plain_runs_s": [round(x, 4) for x in times["plain"]],
        "image_tokens": size.image_tokens, "text_tokens": size.text_tokens, "size": size.name,
        "threads": args.threads, "repeat": args.repeat,
    }]  # fmt: skip


# -- sections from other modules ----------------------------------------------------------------------------


def _section(name: str) -> Callable[[argparse.Namespace], list[dict[str, Any]]] | None:
    """The section's ``run``: ``flex`` is here; the others come from their module beside this file, if present."""
    if name == "flex":
        return run_flex
    file = HERE / str(SECTIONS[name])
    if not file.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", file)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(HERE))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(HERE))
    run: Callable[[argparse.Namespace], list[dict[str, Any]]] = module.run
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small FLUX.1 configuration of benchmarks/flux1.py")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ", ".join(SECTIONS))
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "diffstudio-bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))  # flux1.py imports coldcache from here
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    for name in wanted:
        run = _section(name)
        if run is None:
            emit({"figure": f"{name}_skipped", "value": 0, "unit": "-", "note": f"{SECTIONS[name]} is not there"})
            continue
        started = time.perf_counter()
        try:
            records = run(args)
        except Exception as exc:  # one section's failure does not hide the others' figures
            emit({"section": name, "figure": f"{name}_failed", "value": 0, "unit": "-", "error": repr(exc)[:500]})
            continue
        for record in records:
            emit({"section": name, **record})
        emit({"section": name, "figure": f"{name}_section_s", "value": round(time.perf_counter() - started, 2),
              "unit": "s"})  # fmt: skip


if __name__ == "__main__":
    main()
