"""Variety across seeds: how different the pictures of one caption are (``eval-shapes --variety N``).

A model that draws the same picture for every seed has learned the caption's mean, not its distribution. The
figure is the mean pairwise pixel distance: for each caption, ``seeds`` images from one call (one noise draw
each), the mean absolute difference of every pair of images in ``[0, 1]`` RGB, averaged over the pairs and then
over the captions. Only numpy and Pillow here; the pipeline is passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations
from typing import Any

import numpy as np
from PIL import Image


def pairwise_distance(images: Sequence[Image.Image]) -> float:
    """Mean absolute pixel difference over every pair of ``images`` (RGB in ``[0, 1]``; needs at least two)."""
    if len(images) < 2:
        raise ValueError(f"pairwise_distance needs at least two images, got {len(images)}.")
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0 for image in images]
    shapes = {array.shape for array in arrays}
    if len(shapes) != 1:
        raise ValueError(f"pairwise_distance needs images of one size, got {sorted(shapes)}.")
    return float(np.mean([np.abs(a - b).mean() for a, b in combinations(arrays, 2)]))


def seed_variety(
    generate: Callable[[list[str], int], Sequence[Image.Image]],
    captions: Sequence[str],
    *,
    seeds: int = 4,
    seed: int = 1,
) -> dict[str, Any]:
    """Render each caption ``seeds`` times and return the mean pairwise pixel distance.

    Args:
        generate: ``generate(prompts, seed) -> images``, one image per prompt, each prompt its own noise.
        captions: The captions.
        seeds: Images per caption (at least 2).
        seed: Caption ``i`` is rendered with seed ``seed * 100_000 + 50_000 + i``.

    Returns:
        ``{"variety": mean distance, "variety_min": the least varied caption's, "variety_captions": count,
        "variety_seeds": seeds}``.
    """
    if seeds < 2:
        raise ValueError(f"seeds must be at least 2 to compare pictures, got {seeds}.")
    per_caption = []
    for index, text in enumerate(captions):
        images = generate([text] * seeds, seed * 100_000 + 50_000 + index)
        per_caption.append(pairwise_distance(images))
    return {
        "variety": round(float(np.mean(per_caption)), 5) if per_caption else 0.0,
        "variety_min": round(float(np.min(per_caption)), 5) if per_caption else 0.0,
        "variety_captions": len(per_caption),
        "variety_seeds": seeds,
    }
