"""``diffstudio eval-shapes``: render captions with a model and score the images with the analyser."""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffstudio_shapes.analyse import score
from diffstudio_shapes.data import BASE_SHAPES, caption, sample_specs
from diffstudio_shapes.model import DEFAULTS


def evaluate(
    runtime: Any,
    *,
    count: int = 200,
    seed: int = 1,
    model: Sequence[str] | None = None,
    lora: str | None = None,
    shapes: Sequence[str] = BASE_SHAPES,
    split: str = "heldout",
    batch: int = 16,
    out: str | None = None,
    variety: int = 0,
    variety_seeds: int = 4,
    **options: Any,
) -> dict[str, Any]:
    """Generate one image per drawn caption and return the analyser's accuracies.

    Args:
        runtime: The plugin runtime.
        count: Captions to draw (``sample_specs(count, seed, split=split)``).
        seed: Seed of the caption draw; image ``i`` uses seed ``seed * 100_000 + i``.
        model: Model files (default: the embedded ``diffstudio/shapes``).
        lora: Optional LoRA file applied to the DiT as a side path.
        shapes: Shapes the captions use.
        split: ``"heldout"`` (combinations never trained on) or ``"train"``.
        batch: Prompts per pipeline call.
        out: Folder to also save the images in (with ``metadata.csv``).
        variety: Also render the first ``variety`` captions ``variety_seeds`` times each and report their mean
            pairwise pixel distance (:mod:`diffstudio_shapes.variety`); 0 skips it.
        variety_seeds: Images per caption for ``variety``.
        **options: Pipeline arguments over the model's defaults (other model files run with the embedded
            model's defaults too: they are shapes models, and the pipeline's own would draw 1024 x 1024).

    Returns:
        ``score``'s result plus ``count``, ``seconds`` and the arguments used.
    """
    from diffstudio.run_api import load_pipeline

    pipe, defaults = load_pipeline(runtime, list(model) if model else None)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        from diffstudio_flux2 import apply_lora

        apply_lora(pipe.dit, lora, name="eval")
    arguments = {**DEFAULTS, **defaults, **options}
    specs = sample_specs(count, seed=seed, shapes=shapes, split=split)
    captions = [caption(spec) for spec in specs]
    started = time.monotonic()
    images = []
    for start in range(0, count, batch):
        chunk = captions[start : start + batch]
        images.extend(pipe(chunk, seed=seed * 100_000 + start, **arguments))
    seconds = time.monotonic() - started
    if out is not None:
        folder = Path(out)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "prompt"])
            for i, (image, text) in enumerate(zip(images, captions)):
                image.save(folder / "images" / f"{i:05d}.png")
                writer.writerow([f"images/{i:05d}.png", text])
    result = score(specs, images)
    if variety > 0:
        from diffstudio_shapes.variety import seed_variety

        def generate(prompts: list[str], image_seed: int) -> Any:
            return pipe(prompts, seed=image_seed, **arguments)

        result.update(seed_variety(generate, captions[:variety], seeds=variety_seeds, seed=seed))
    result.update({"count": count, "seconds": round(seconds, 2), "arguments": arguments, "split": split})
    return result
