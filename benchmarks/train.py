"""Trainer overhead: ``diffstudio train`` steps versus a plain PyTorch loop doing the same work on the same model.

Usage::

    .venv/bin/python benchmarks/train.py [--quick] [--steps N] [--threads 2]

The model is the embedded shapes model's architecture (FLUX.2-klein DiT of the shapes recipe, random weights)
trained at 128 x 128 on a procedural shapes data set, full fine-tune of the DiT, split training's second stage
(``sft:train``: latents and prompt embeddings come from the stage-1 cache, so both sides time the DiT's
forward, backward and the AdamW step). The plain loop keeps the cached tensors in memory and calls the DiT
directly: noise, sigmas (logit-normal), ``x_t``, velocity MSE, ``backward``, ``step``, ``zero_grad``.

The trainer's time per step is ``(t(W + N) - t(W)) / N`` over two runs of ``W`` and ``W + N`` steps (the
load and start-up cancel out). At batch size 1 both sides are timed ``--repeat`` times, interleaved: the speed
of a shared VM drifts by tens of percent within minutes, so ``overhead`` is the median of the ratios of
neighbouring runs (``overhead_of_best_times`` compares the best of each). Both sides use the trainer's
optimizer (AdamW with PyTorch's fused kernel, see ``diffstudio.train.optim``), so ``overhead`` measures the
framework alone; the plain loop is also timed with ``torch.optim.AdamW``'s defaults, what a hand-written loop
usually runs. One JSON line per figure: ``step_seconds`` of both and their ``overhead`` ratio (target <= 1.05)
for batch size 1, and ``samples_per_second`` of the trainer for batch sizes 1, 4, 8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def build(root: Path, rows: int) -> dict[str, Any]:
    from diffstudio_flux2 import Flux2AutoEncoder
    from diffstudio_shapes.data import write_dataset
    from diffstudio_shapes.recipe.dit import write_random_dit
    from diffstudio_shapes.recipe.text import build_text
    from diffstudio_shapes.recipe.vae import VaeTraining, save_vae, vae_params

    build_text(root)
    torch.manual_seed(0)
    save_vae(Flux2AutoEncoder(vae_params()), root, {}, VaeTraining())
    write_random_dit(root / "dit.safetensors")
    write_dataset(root / "data", rows, 0, 128)
    return {
        "dataset_base_path": str(root / "data"),
        "dataset_metadata_path": str(root / "data" / "metadata.csv"),
        "model_paths": [str(root / "dit.safetensors"), str(root / "ae.safetensors"),
                        str(root / "text_encoder" / "model.safetensors")],
        "tokenizer_path": str(root / "tokenizer"), "height": 128, "width": 128, "trainable_models": ["dit"],
        "pipeline_args": {"max_sequence_length": 32}, "timestep_sampling": "logit_normal", "loss_weighting": "none",
        "learning_rate": 1e-4, "output_path": str(root / "train"), "log_every": 10**9,
    }  # fmt: skip


def trainer_seconds(options: dict[str, Any], steps: int, batch: int, output: Path, run: int = 0) -> float:
    from diffstudio.train import train

    out = output / f"b{batch}-{steps}-{run}"
    (out / "cache").parent.mkdir(parents=True, exist_ok=True)
    cache = Path(options["output_path"]) / "cache"
    (out / "cache").symlink_to(cache, target_is_directory=True)
    result = train(**{**options, "task": "sft:train", "batch_size": batch, "max_steps": steps,
                      "output_path": str(out), "num_epochs": 10**6})  # fmt: skip
    assert result.steps == steps, result.steps
    return float(result.seconds)


def plain_seconds(options: dict[str, Any], steps: int, batch: int, fused: bool = True) -> float:
    """The same DiT updates as a hand-written loop: cached tensors in memory, no framework in the step.

    ``fused``: the trainer's AdamW (PyTorch's fused kernel); False: ``torch.optim.AdamW`` with its defaults.
    """
    from diffstudio.runtime import Runtime
    from diffstudio.train.cache import SampleCache
    from diffstudio.train.config import TrainConfig
    from diffstudio.train.models import load_training_pipeline, own_memory
    from diffstudio.train.optim import adamw

    config = TrainConfig(**{**options, "model_paths": options["model_paths"][:1]})
    pipe = load_training_pipeline(config, Runtime(), "cpu")
    dit = pipe.dit
    own_memory(dit)
    dit.requires_grad_(True).train()
    cache = SampleCache(Path(options["output_path"]) / "cache")
    states = [cache.load(i) for i in range(batch)]
    x0 = torch.cat([s.shared["input_latents"] for s in states])
    image_ids = torch.cat([s.shared["image_ids"] for s in states])
    ctx = torch.cat([s.positive["prompt_embeds"] for s in states])
    ctx_ids = torch.cat([s.positive["text_ids"] for s in states])
    trained = [p for p in dit.parameters() if p.requires_grad]
    make = adamw if fused else torch.optim.AdamW
    optimizer = make(trained, lr=1e-4, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        sigma = torch.sigmoid(torch.randn(batch, generator=generator))
        noise = torch.randn(x0.shape, generator=generator)
        s = sigma.view(batch, 1, 1)
        velocity = dit((1 - s) * x0 + s * noise, image_ids, sigma, ctx, ctx_ids, None)
        loss = (velocity.float() - (noise - x0).float()).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per figure (4x at batch 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5, help="interleaved repeats at batch size 1")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps or (6 if args.quick else 30)
    warm = 3
    from diffstudio.train import train

    with tempfile.TemporaryDirectory(prefix="diffstudio-bench-train-") as folder:
        root = Path(folder)
        options = build(root, rows=8 * (warm + steps))
        train(**{**options, "task": "sft:data_process"})
        emit = {"benchmark": "train", "model": "shapes DiT (random), 128x128, full fine-tune, sft:train", "cpu": True}
        for batch in (1, 4, 8):
            if batch * (warm + steps) > 8 * (warm + steps):
                continue
            runs, plain, default_adam = [], [], []
            timed = steps * 4 if batch == 1 else steps  # the steps must outweigh the noise of two model loads
            for run in range(args.repeat if batch == 1 else 1):  # interleaved: the VM's speed drifts
                short = trainer_seconds(options, warm, batch, root, run)
                runs.append((trainer_seconds(options, warm + timed, batch, root, run) - short) / timed)
                if batch == 1:
                    plain.append(plain_seconds(options, timed, batch))
                    default_adam.append(plain_seconds(options, timed, batch, fused=False))
            per_step = min(runs)
            print(json.dumps({**emit, "figure": "samples_per_second", "batch_size": batch,
                              "trainer_step_seconds": round(per_step, 5),
                              "samples_per_second": round(batch / per_step, 2)}), flush=True)  # fmt: skip
            if batch == 1:
                best, best_default = min(plain), min(default_adam)
                paired = statistics.median(t / p for t, p in zip(runs, plain, strict=True))
                paired_default = statistics.median(d / t for t, d in zip(runs, default_adam, strict=True))
                print(json.dumps({**emit, "figure": "step_seconds", "batch_size": batch,
                                  "trainer_step_seconds": round(per_step, 5), "plain_step_seconds": round(best, 5),
                                  "overhead": round(paired, 4), "target": 1.05,
                                  "overhead_of_best_times": round(per_step / best, 4),
                                  "plain_default_adamw_step_seconds": round(best_default, 5),
                                  "speedup_vs_default_adamw": round(paired_default, 4),
                                  "runs": {"trainer": [round(x, 5) for x in runs],
                                           "plain": [round(x, 5) for x in plain],
                                           "plain_default_adamw": [round(x, 5) for x in default_adam]}}),
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
