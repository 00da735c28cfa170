"""The recipe that trains the shipped colour-shift weights on the embedded shapes model.

1. ``write_data``: shapes captions (``diffstudio_shapes.data``) whose image shows the shape in a target colour
   drawn per row (any palette colour but the background's, the caption's own colour included), written as
   ``images/*.png`` plus ``metadata.jsonl`` rows ``{"image", "prompt", "template_inputs": {"colour": name}}``;
   the prompt keeps the caption's colour, so the template learns to override it.
2. ``train_argv``: the ``diffstudio train`` arguments (split training: ``--task sft:data_process`` then
   ``--task sft:train``), trainable ``template_model.up`` (the per-colour up matrices), saved under
   ``pipe.template_model.`` with the prefix removed.
3. ``install``: copy the trained data-only template's weights into the package (``weights/``).

Command line: ``python -m diffstudio_colour_shift.recipe data|train|install ...`` (see ``--help``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import IO

from diffstudio_shapes.model import model_files
from diffstudio_template_sdk import recipe

__all__ = ["install", "main", "train_argv", "write_data"]


def write_data(folder: str | Path, count: int, seed: int = 0, size: int = 128) -> Path:
    """Write ``count`` colour-shift rows (training split of the shapes captions); returns ``metadata.jsonl``."""
    from diffstudio_shapes.data import COLOURS, ShapeSpec, render, sample_specs

    def draw(spec: ShapeSpec, out: IO[bytes]) -> None:
        render(spec, size).save(out, format="PNG")

    def rows() -> Iterator[recipe.DataRow]:
        for index, spec in enumerate(sample_specs(count, seed, split="train")):
            choices = [c for c in COLOURS if c != spec.background]
            target = random.Random(f"diffstudio-colour-shift/{seed}/{index}").choice(choices)
            drawn = partial(draw, replace(spec, colour=target))
            yield recipe.DataRow(f"images/{index:05d}.png", spec.caption, {"colour": target}, drawn)

    return recipe.write_rows(folder, rows())


def train_argv(data: str | Path, output: str | Path, models: Sequence[str], tokenizer: str | Path, *,
               task: str = "sft", steps: int = 2000, learning_rate: float = 2e-3,
               template: str = "diffstudio/colour-shift", size: int = 128) -> list[str]:  # fmt: skip
    """``diffstudio train`` arguments for one stage (``task``: ``sft``, ``sft:data_process`` or ``sft:train``)."""
    return recipe.train_argv(data, output, models, tokenizer, template=template, trainable="template_model.up",
                             task=task, steps=steps, learning_rate=learning_rate, size=size)  # fmt: skip


def install(folder: str | Path, name: str = "colour-shift.safetensors") -> Path:
    """Copy a trained data-only template's ``model.safetensors`` into the package's ``weights/`` folder."""
    return recipe.install_weights(folder, Path(__file__).with_name("weights") / name)


def main(argv: Sequence[str] | None = None) -> int:
    """``data FOLDER [--count N]``, ``train DATA OUTPUT --weights W [--steps N]``, ``install FOLDER``."""
    return recipe.recipe_main(argv, prog="python -m diffstudio_colour_shift.recipe", what="colour-shift",
                              write_data=write_data, train_arguments=train_argv, model_files=model_files,
                              install=install)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
