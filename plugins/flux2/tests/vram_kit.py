"""The low-memory test kit of FLUX.2: a tiny bf16 repository, the memory configurations, one measured run.

Shared by ``test_vram.py`` and ``benchmarks/vram.py`` (the benchmark loads this file; a test never imports a
benchmark, so the plugin's tests run in a venv that has only ``diffstudio-flux2`` and its test extra).

Run as a script, it measures one configuration in a fresh process and prints one JSON line (``RssAnon`` figures
are only clean in a process of their own)::

    python plugins/flux2/tests/vram_kit.py --child disk --repo DIR --side 32 --vram-limit 0.01
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from diffstudio.testing import import_file

TEXT_WIDTH = 96  # 3 stacked hidden states of the tiny Qwen3 (width 32)
LATENT_CHANNELS = 32  # VAE z=8, 2x2 patchify


def rss_anon_mib() -> float:
    """This process's anonymous resident memory (``RssAnon`` of ``/proc/self/status``), in MiB."""
    with open("/proc/self/status", encoding="ascii") as handle:
        found = re.search(r"RssAnon:\s+(\d+) kB", handle.read())
    return int(found.group(1)) / 1024 if found else float("nan")


def _fixtures() -> ModuleType:
    return import_file(Path(__file__).with_name("fixtures_text.py"))


def build_repo(out: Path, hidden: int, depth: int, single: int, seed: int = 0) -> Path:
    """Write ``dit.safetensors`` (bf16), ``vae.safetensors``, ``text_encoder/`` and ``tokenizer/`` under ``out``."""
    import torch
    from diffstudio_flux2.model import Flux2
    from diffstudio_flux2.params import AutoEncoderParams, Flux2Params
    from diffstudio_flux2.vae import Flux2AutoEncoder
    from safetensors.torch import load_file, save_file

    spec = {"hidden": hidden, "depth": depth, "single": single, "seed": seed}
    marker = out / "spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return out
    out.mkdir(parents=True, exist_ok=True)
    fx = _fixtures()
    vocab = fx.build_qwen3_tokenizer(out / "tokenizer")
    fx.build_qwen3_encoder(out / "text_encoder", vocab, seed=seed)
    for file in (out / "text_encoder").glob("*.safetensors"):  # every file bf16, like the official ones
        tensors = load_file(str(file))
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}, str(file))
    heads = max(1, hidden // 64)
    params = Flux2Params(
        in_channels=LATENT_CHANNELS, context_in_dim=TEXT_WIDTH, hidden_size=hidden, num_heads=heads, depth=depth,
        depth_single_blocks=single, axes_dim=(hidden // heads // 4,) * 4, mlp_ratio=3.0, use_guidance_embed=False,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        dit = Flux2(params)
    state = {}
    for name, p in dit.state_dict().items():
        if p.ndim == 1:
            value = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
        else:
            value = torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5
        state[name] = value.to(torch.bfloat16)
    save_file(state, str(out / "dit.safetensors"))
    del state
    vae = Flux2AutoEncoder(AutoEncoderParams(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8)).eval()
    with torch.no_grad():
        for name, b in vae.named_buffers():
            if name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    vae_state = {
        k: v.to(torch.bfloat16) if k.startswith(("encoder", "decoder")) else v for k, v in vae.state_dict().items()
    }
    save_file({k: v.contiguous() for k, v in vae_state.items()}, str(out / "vae.safetensors"))
    marker.write_text(json.dumps(spec))
    return out


def memory_fields(name: str, device: str) -> dict[str, Any]:
    """The ModelConfig memory fields of configuration ``name`` (computation float32 everywhere)."""
    import torch

    f32, bf16, fp8 = torch.float32, torch.bfloat16, torch.float8_e4m3fn
    compute = {"computation_device": device, "computation_dtype": f32}
    if name == "resident":
        return {}
    if name.startswith("cpu_offload"):
        return {"offload_device": "cpu", "offload_dtype": bf16, "onload_device": "cpu", "onload_dtype": bf16,
                "preparing_device": device, "preparing_dtype": bf16, **compute}  # fmt: skip
    if name == "fp8":
        return {"offload_device": "cpu", "offload_dtype": fp8, "onload_device": "cpu", "onload_dtype": fp8,
                "preparing_device": device, "preparing_dtype": fp8, **compute}  # fmt: skip
    if name == "disk":
        return {"offload_device": "disk", "offload_dtype": "disk", "onload_device": "disk", "onload_dtype": "disk",
                "preparing_device": device, "preparing_dtype": bf16, **compute}  # fmt: skip
    raise ValueError(f"unknown configuration {name!r}")


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Run one configuration in this process; return its figures (and save its final latents)."""
    import diffstudio_flux2.text_encoders  # noqa: F401  (imports transformers: part of the baseline)
    import torch
    from diffstudio import ModelConfig
    from diffstudio_flux2 import Flux2ImagePipeline
    from transformers import Qwen3Model  # noqa: F401

    torch.manual_seed(0)
    root = Path(args.repo)
    fields = memory_fields(args.child.split("_limit")[0], args.device)
    gc.collect()
    base = rss_anon_mib()
    start = time.perf_counter()
    pipe = Flux2ImagePipeline.from_pretrained(
        torch_dtype=torch.float32,
        device=args.device,
        model_configs=[
            ModelConfig(path=str(root / "text_encoder"), **fields),
            ModelConfig(path=str(root / "dit.safetensors"), **fields),
            ModelConfig(path=str(root / "vae.safetensors"), **fields),
        ],
        tokenizer_config=ModelConfig(path=str(root / "tokenizer")),
        vram_limit=args.vram_limit,
    )
    load_s = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    gc.collect()
    after_load = rss_anon_mib()
    peak = [after_load]

    def sample(*_: Any) -> None:
        peak[0] = max(peak[0], rss_anon_mib())

    for slot in ("text_encoder", "dit", "vae"):
        for module in pipe.loaded[slot].module.modules():
            module.register_forward_hook(sample)
    peaks, step_times, latents = [], [], None
    for _ in range(2):
        peak[0] = rss_anon_mib()
        stamps: list[float] = []

        def keep(p: Any, step: int, t: Any, tensors: dict[str, Any], stamps: list[float] = stamps) -> dict[str, Any]:
            stamps.append(time.perf_counter())
            return {}

        begin = time.perf_counter()
        latents = pipe("a red circle", seed=0, height=args.side, width=args.side, num_inference_steps=2,
                       max_sequence_length=32, output_type="latent", callback_on_step_end=keep)  # fmt: skip
        sample()
        peaks.append(peak[0])
        step_times.append((stamps[-1] - begin) / len(stamps))
    if args.save:
        torch.save(latents, args.save)
    cuda = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
    return {
        "config": args.child,
        "vram_limit_gib": args.vram_limit,
        "load_s": round(load_s, 3),
        "s_per_step": round(step_times[-1], 4),
        "s_per_step_first_call": round(step_times[0], 4),
        "rss_anon_base_mib": round(base, 1),
        "rss_anon_after_load_mib": round(after_load, 1),
        "rss_anon_peak_mib": round(peaks[0], 1),
        "rss_anon_peak_second_call_mib": round(peaks[1], 1),
        "cuda_max_allocated_mib": cuda,
        "report": {
            k: {f: v.get(f) for f in ("strategy", "resident_units", "streamed_units")}
            for k, v in pipe.vram_report().items()
        },  # fmt: skip
    }


def child_parser() -> argparse.ArgumentParser:
    """The arguments of one measured run (``--child CONFIG --repo DIR``...), shared with the benchmark's CLI."""
    parser = argparse.ArgumentParser(description="Measure one memory configuration of a tiny FLUX.2 repository.")
    parser.add_argument("--child", required=True, help="configuration: resident, cpu_offload[_limit_N], fp8, disk")
    parser.add_argument("--repo", required=True, help="a folder written by build_repo")
    parser.add_argument("--side", type=int, default=64, help="image side in pixels (4 pixels per token)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vram-limit", type=float, default=None)
    parser.add_argument("--save", help="write the final latents here (torch.save)")
    return parser


if __name__ == "__main__":
    print(json.dumps(child(child_parser().parse_args())))
