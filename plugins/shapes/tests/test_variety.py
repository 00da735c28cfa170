from __future__ import annotations

import numpy as np
import pytest
from diffstudio_shapes.data import ShapeSpec, render
from diffstudio_shapes.variety import pairwise_distance, seed_variety
from PIL import Image


def _solid(value: int, size: int = 8) -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8))


def test_pairwise_distance_is_the_mean_over_pairs() -> None:
    images = [_solid(0), _solid(51), _solid(255)]
    expected = np.mean([51 / 255, 1.0, 204 / 255])
    assert pairwise_distance(images) == pytest.approx(expected)
    assert pairwise_distance([_solid(7), _solid(7)]) == 0.0
    with pytest.raises(ValueError, match="at least two"):
        pairwise_distance([_solid(0)])
    with pytest.raises(ValueError, match="one size"):
        pairwise_distance([_solid(0), _solid(0, size=4)])


def test_seed_variety_renders_each_caption_seeds_times() -> None:
    calls: list[tuple[list[str], int]] = []

    def generate(prompts: list[str], seed: int) -> list[Image.Image]:
        calls.append((prompts, seed))
        # a shape moved by the image's index: shifted pictures of one caption differ
        return [
            render(ShapeSpec("square", "red", "blue", cx=0.4 + 0.05 * i, radius=0.2), 32) for i in range(len(prompts))
        ]

    result = seed_variety(generate, ["a", "b"], seeds=3, seed=2)
    assert calls == [(["a"] * 3, 250_000), (["b"] * 3, 250_001)]
    assert result["variety_captions"] == 2 and result["variety_seeds"] == 3
    assert result["variety"] > 0.01 and result["variety_min"] == result["variety"]
    with pytest.raises(ValueError, match="at least 2"):
        seed_variety(generate, ["a"], seeds=1)
