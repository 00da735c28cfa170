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

The repository, the configurations and the measured run live in ``plugins/flux2/tests/vram_kit.py``, which the
plugin's ``test_vram.py`` shares (a test never imports a benchmark).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from diffstudio.testing import import_file

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "plugins" / "flux2" / "tests"
KIT = import_file(TESTS / "vram_kit.py")  # the repository, the configurations and one measured run
build_repo = KIT.build_repo
memory_fields = KIT.memory_fields
child = KIT.child


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
