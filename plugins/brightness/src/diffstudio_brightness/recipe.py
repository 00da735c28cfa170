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

import random
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import IO

from diffstudio_shapes.model import model_files
from diffstudio_template_sdk import recipe
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
    from diffstudio_shapes.data import ShapeSpec, render, sample_specs

    def draw(spec: ShapeSpec, scale: float, out: IO[bytes]) -> None:
        brighten(render(spec, size), scale).save(out, format="PNG")

    def rows() -> Iterator[recipe.DataRow]:
        for index, spec in enumerate(sample_specs(count, seed, split="train")):
            scale = round(random.Random(f"diffstudio-brightness/{seed}/{index}").random(), 4)
            yield recipe.DataRow(f"images/{index:05d}.png", spec.caption, {"scale": scale}, partial(draw, spec, scale))

    return recipe.write_rows(folder, rows())


def train_argv(data: str | Path, output: str | Path, models: Sequence[str], tokenizer: str | Path, *,
               task: str = "sft", steps: int = 2000, learning_rate: float = 2e-3,
               template: str = "diffstudio/brightness", size: int = 128) -> list[str]:  # fmt: skip
    """``diffstudio train`` arguments for one stage (``task``: ``sft``, ``sft:data_process`` or ``sft:train``)."""
    return recipe.train_argv(data, output, models, tokenizer, template=template, trainable="template_model",
                             task=task, steps=steps, learning_rate=learning_rate, size=size)  # fmt: skip


def install(folder: str | Path, name: str = "brightness.safetensors") -> Path:
    """Copy a trained data-only template's ``model.safetensors`` into the package's ``weights/`` folder."""
    return recipe.install_weights(folder, Path(__file__).with_name("weights") / name)


def main(argv: Sequence[str] | None = None) -> int:
    """``data FOLDER [--count N]``, ``train DATA OUTPUT --weights W [--steps N]``, ``install FOLDER``."""
    return recipe.recipe_main(argv, prog="python -m diffstudio_brightness.recipe", what="brightness",
                              write_data=write_data, train_arguments=train_argv, model_files=model_files,
                              install=install)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
