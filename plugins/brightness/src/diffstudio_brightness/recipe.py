"""The recipe that trains the shipped brightness weights on the embedded shapes model.

1. ``write_data``: shapes images (``diffstudio_shapes.data``) whose pixels are scaled by ``1 + 2 * SPAN * (s - 0.5)``
   (``s = 0.5`` leaves an image unchanged, 0 darkens it by ``SPAN``, 1 brightens it by ``SPAN``), one random
   ``s`` per row, written as ``images/*.png`` plus ``metadata.jsonl`` rows
   ``{"image", "prompt", "template_inputs": {"scale": s}}``. ``SPAN`` keeps every palette colour recognisable.
2. ``train_argv``: the ``diffstudio train`` arguments (split training: ``--task sft:data_process`` then
   ``--task sft:train``), trainable ``template_model``, saved under ``pipe.template_model.`` with the prefix removed.
3. ``install``: copy the trained data-only template's weights into the package (``weights/``).

Command line: ``python -m diffstudio_brightness.recipe data|train|install ...`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

SPAN = 0.2
"""Largest relative brightness change (at ``s = 0`` and ``s = 1``)."""

__all__ = ["SPAN", "brighten", "install", "main", "train_argv", "write_data"]


def brighten(image: Image.Image, scale: float) -> Image.Image:
    """Scale an RGB image's pixel values by ``1 + 2 * SPAN * (scale - 0.5)`` (clipped to 0..255)."""
    factor = 1.0 + 2.0 * SPAN * (float(scale) - 0.5)
    return image.point(lambda value: max(0, min(255, round(value * factor))))


def write_data(folder: str | Path, count: int, seed: int = 0, size: int = 128) -> Path:
    """Write ``count`` brightness rows (training split of the shapes captions); returns ``metadata.jsonl``."""
    from diffstudio_shapes.data import render, sample_specs

    root = Path(folder)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index, spec in enumerate(sample_specs(count, seed, split="train")):
        scale = round(random.Random(f"diffstudio-brightness/{seed}/{index}").random(), 4)
        name = f"images/{index:05d}.png"
        path = root / name
        if not path.is_file():
            brighten(render(spec, size), scale).save(path)
        rows.append({"image": name, "prompt": spec.caption, "template_inputs": {"scale": scale}})
    metadata = root / "metadata.jsonl"
    metadata.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return metadata


def model_paths(weights: str | Path) -> list[str]:
    """The embedded model's DiT, VAE and text encoder files under ``weights``."""
    root = Path(weights)
    return [str(root / "flux2-shapes.safetensors"), str(root / "ae.safetensors"),
            str(root / "text_encoder" / "model.safetensors")]  # fmt: skip


def train_argv(data: str | Path, output: str | Path, models: Sequence[str], tokenizer: str | Path, *,
               task: str = "sft", steps: int = 2000, learning_rate: float = 2e-3,
               template: str = "diffstudio/brightness", size: int = 128) -> list[str]:  # fmt: skip
    """``diffstudio train`` arguments for one stage (``task``: ``sft``, ``sft:data_process`` or ``sft:train``)."""
    data = Path(data)
    return [
        "--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "metadata.jsonl"),
        "--extra_inputs", "template_inputs", "--height", str(size), "--width", str(size),
        "--model_paths", json.dumps([str(m) for m in models]), "--tokenizer_path", str(tokenizer),
        "--template_model_id_or_path", template, "--trainable_models", "template_model",
        "--remove_prefix_in_ckpt", "pipe.template_model.", "--learning_rate", str(learning_rate),
        "--weight_decay", "0", "--num_epochs", "100", "--max_steps", str(steps), "--save_steps", str(steps),
        "--batch_size", "1", "--caption_dropout", "0.1", "--output_path", str(output), "--task", task,
        "--pipeline_args", json.dumps({"max_sequence_length": 32}),
    ]  # fmt: skip


def install(folder: str | Path, name: str = "brightness.safetensors") -> Path:
    """Copy a trained data-only template's ``model.safetensors`` into the package's ``weights/`` folder."""
    source = Path(folder) / "model.safetensors"
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist: give the data-only folder the trainer wrote (step-N/)")
    target = Path(__file__).with_name("weights") / name
    target.parent.mkdir(exist_ok=True)
    shutil.copyfile(source, target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """``data FOLDER [--count N]``, ``train DATA OUTPUT --weights W [--steps N]``, ``install FOLDER``."""
    parser = argparse.ArgumentParser(prog="python -m diffstudio_brightness.recipe")
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="write the brightness training data")
    data.add_argument("folder")
    data.add_argument("--count", type=int, default=2000)
    data.add_argument("--seed", type=int, default=0)
    train = commands.add_parser("train", help="split-train the template (both stages)")
    train.add_argument("data")
    train.add_argument("output")
    train.add_argument("--weights", required=True, help="the shapes model's weights folder")
    train.add_argument("--steps", type=int, default=2000)
    train.add_argument("--learning_rate", type=float, default=2e-3)
    put = commands.add_parser("install", help="copy trained weights into the package")
    put.add_argument("folder", help="the trainer's data-only output folder (OUTPUT/step-N)")
    args = parser.parse_args(argv)
    if args.command == "data":
        print(write_data(args.folder, args.count, args.seed))
    elif args.command == "train":
        from diffstudio.train import config_from_args
        from diffstudio.train import train as run_training

        options: dict[str, Any] = {"steps": args.steps, "learning_rate": args.learning_rate}
        for task in ("sft:data_process", "sft:train"):
            argv = train_argv(
                args.data,
                args.output,
                model_paths(args.weights),
                Path(args.weights) / "tokenizer",
                task=task,
                **options,
            )
            result = run_training(config_from_args(argv))
        print(json.dumps({"steps": result.steps, "losses": result.losses[-5:], "files": result.files}))
    else:
        print(install(args.folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
