"""Low-memory execution on CPU: load time, s/step and peak ``RssAnon`` per memory configuration.

    .venv/bin/python benchmarks/vram.py                   # about 1 GB bf16 DiT (official-layout files)
    .venv/bin/python benchmarks/vram.py --hidden 512 --depth 2 --single 6   # a quick run

A random FLUX.2 DiT (BFL single file, bf16) with the tiny Qwen3 text encoder, tokenizer and VAE of the plugin
tests is written once under ``--out``. Each configuration then runs in its own process (so ``RssAnon`` figures
are clean): load the pipeline, generate twice with 2 steps, and print one JSON line with the load time, the
seconds per step, ``RssAnon`` after loading and its peak during each call (sampled after every layer), both
absolute and above the process's baseline after imports. The all-resident fp32 run is the reference of the
ratios; ``max_abs_diff`` / ``cosine`` compare each run's final latents with it. On a machine with CUDA, add
``--device cuda`` for ``torch.cuda.max_memory_allocated`` figures (also a child per config).
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from diffstudio.testing import import_file

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "plugins" / "flux2" / "tests"
TEXT_WIDTH = 96  # 3 stacked hidden states of the tiny Qwen3 (width 32)
LATENT_CHANNELS = 32  # VAE z=8, 2x2 patchify


def rss_anon_mib() -> float:
    """This process's anonymous resident memory (``RssAnon`` of ``/proc/self/status``), in MiB."""
    with open("/proc/self/status", encoding="ascii") as handle:
        found = re.search(r"RssAnon:\s+(\d+) kB", handle.read())
    return int(found.group(1)) / 1024 if found else float("nan")


def _fixtures() -> ModuleType:
    return import_file(TESTS / "fixtures_text.py")


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


def run_child(repo: Path, config: str, limit: float | None, side: int, device: str, save: Path) -> dict[str, Any]:
    """Run ``config`` in a fresh interpreter and parse its JSON line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", config, "--repo", str(repo), "--side", str(side),
           "--device", device, "--save", str(save)]  # fmt: skip
    if limit is not None:
        cmd += ["--vram-limit", repr(limit)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def configurations(dit_gib: float) -> list[tuple[str, float | None]]:
    """(config, vram_limit in GiB) pairs: the seed's four configs, and limits of 0 / 25 % / 50 % of the DiT."""
    return [
        ("resident", None),
        ("cpu_offload", None),
        ("fp8", None),
        ("disk", 0.1),
        ("cpu_offload_limit_0", 0.0),
        ("cpu_offload_limit_25", 0.25 * dit_gib),
        ("cpu_offload_limit_50", 0.5 * dit_gib),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/diffstudio-vram-bench")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--single", type=int, default=20)
    parser.add_argument("--side", type=int, default=64, help="image side in pixels (4 pixels per token)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child")
    parser.add_argument("--repo")
    parser.add_argument("--vram-limit", type=float, default=None)
    parser.add_argument("--save")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    import torch

    repo = build_repo(Path(args.out), args.hidden, args.depth, args.single)
    dit_gib = (repo / "dit.safetensors").stat().st_size / 1024**3
    print(json.dumps({"figure": "checkpoint", "dit_bf16_gib": round(dit_gib, 3), "hidden": args.hidden}))
    reference: Any = None
    ref_figures: dict[str, Any] = {}
    for config, limit in configurations(dit_gib):
        save = Path(args.out) / f"latents-{config}.pt"
        figures = run_child(repo, config, limit, args.side, args.device, save)
        latents = torch.load(save)
        if reference is None:
            reference, ref_figures = latents, figures
        diff = (latents - reference).abs().max().item()
        cosine = torch.nn.functional.cosine_similarity(latents.flatten(), reference.flatten(), dim=0).item()
        figures.update(max_abs_diff=diff, cosine=round(cosine, 6))
        for key in ("rss_anon_after_load_mib", "rss_anon_peak_mib"):
            figures[key.replace("_mib", "_ratio")] = round(figures[key] / ref_figures[key], 3)
            above, above_ref = (figures[key] - figures["rss_anon_base_mib"],
                                ref_figures[key] - ref_figures["rss_anon_base_mib"])  # fmt: skip
            figures[key.replace("_mib", "_above_base_ratio")] = round(above / above_ref, 3)
        print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
