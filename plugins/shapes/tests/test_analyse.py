from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
from diffstudio_shapes.analyse import Analysis, analyse, largest_component, score
from diffstudio_shapes.data import ALL_SHAPES, PALETTE, ShapeSpec, render, sample_specs
from PIL import Image, ImageFilter

COUNT = 240
SPECS = sample_specs(COUNT, 11, shapes=ALL_SHAPES, position_rate=0.7, size_rate=0.7)
Degrade = Callable[[Image.Image, int, int], Image.Image]


def blur_noise(image: Image.Image, size: int, seed: int) -> Image.Image:
    """Gaussian blur of sigma 1.5 px per 64 px of side, then Gaussian noise of sigma 6/255."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5 * size / 64)), dtype=np.float64)
    noisy = blurred + np.random.default_rng(seed).normal(0.0, 6.0, blurred.shape)
    return Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8))


def down_up(image: Image.Image, size: int, seed: int) -> Image.Image:
    half = image.resize((size // 2, size // 2), Image.Resampling.BILINEAR)
    return half.resize((size, size), Image.Resampling.BILINEAR)


def both(image: Image.Image, size: int, seed: int) -> Image.Image:
    return blur_noise(down_up(image, size, seed), size, seed)


DEGRADATIONS: dict[str, Degrade | None] = {"clean": None, "blur_noise": blur_noise, "down_up": down_up, "both": both}
RESULTS: dict[tuple[int, str], dict[str, object]] = {}


@pytest.fixture(scope="module", params=[64, 128], ids=lambda s: f"{s}px")
def rendered(request: pytest.FixtureRequest) -> tuple[int, list[Image.Image]]:
    return request.param, [render(spec, request.param) for spec in SPECS]


@pytest.mark.parametrize("name", list(DEGRADATIONS))
def test_analyser_accuracy(rendered: tuple[int, list[Image.Image]], name: str) -> None:
    size, images = rendered
    degrade = DEGRADATIONS[name]
    inputs = images if degrade is None else [degrade(image, size, i) for i, image in enumerate(images)]
    result = score(SPECS, inputs)
    json.dumps(result)  # JSON-serialisable
    RESULTS[(size, name)] = result
    accuracy = result["accuracy"]
    assert isinstance(accuracy, dict)
    print(f"\n{size}px {name}: " + ", ".join(f"{k}={v:.3f}" for k, v in accuracy.items()))
    assert result["counted"]["position"] >= 100 and result["counted"]["size"] >= 100  # type: ignore[index]
    colour_floor, shape_floor = (0.99, 0.99) if name == "clean" else (0.95, 0.9)
    assert accuracy["colour"] >= colour_floor and accuracy["background"] >= colour_floor, accuracy
    assert accuracy["position"] >= colour_floor, accuracy
    assert accuracy["shape"] >= shape_floor, (accuracy, result["confusion"])
    assert accuracy["size"] >= shape_floor, accuracy


def test_analysis_fields_and_diagnostics() -> None:
    spec = ShapeSpec("triangle", "purple", "white", "large", "bottom right", cx=0.7, cy=0.7, radius=0.28)
    found = analyse(render(spec, 96))
    assert (found.shape, found.colour, found.background, found.position, found.size) == (
        "triangle",
        "purple",
        "white",
        "bottom right",
        "large",
    )
    assert 0.0 < found.confidence <= 1.0
    assert abs(found.diagnostics["x"] - 0.7) < 0.01 and abs(found.diagnostics["y"] - 0.7) < 0.01
    assert json.loads(json.dumps(found.to_json()))["shape"] == "triangle"


def test_analyser_inputs() -> None:
    spec = ShapeSpec("star", "yellow", "blue", cx=0.3, cy=0.3, radius=0.25)
    image = render(spec, 64)
    as_uint8 = analyse(np.asarray(image))
    as_float = analyse(np.asarray(image, dtype=np.float32) / 255.0)
    as_chw = analyse(np.moveaxis(np.asarray(image), -1, 0))
    assert as_uint8.shape == as_float.shape == as_chw.shape == "star"
    wide = Image.new("RGB", (160, 96), PALETTE["black"])
    wide.paste(render(ShapeSpec("circle", "green", "black", radius=0.3), 96), (0, 0))
    found = analyse(wide)
    assert (found.shape, found.colour, found.position) == ("circle", "green", "top left")


def test_blank_image_has_no_shape() -> None:
    found = analyse(Image.new("RGB", (64, 64), PALETTE["orange"]))
    assert found.background == "orange"
    assert (found.shape, found.colour, found.position, found.size) == ("none",) * 4
    assert found.confidence == 0.0


def test_largest_component() -> None:
    mask = np.zeros((10, 12), dtype=bool)
    mask[1:3, 1:3] = True  # 4 pixels
    mask[5:9, 4] = True  # 4 pixels, touches the next one
    mask[8, 5:11] = True  # 6 pixels
    mask[0, 11] = True
    out = largest_component(mask)
    assert out.sum() == 10 and out[5, 4] and out[8, 10] and not out[1, 1]
    diagonal = np.eye(5, dtype=bool)  # 4-connectivity: diagonal pixels are separate
    assert largest_component(diagonal).sum() == 1
    assert not largest_component(np.zeros((4, 4), dtype=bool)).any()


def test_score_counts_and_confusion() -> None:
    specs = [
        ShapeSpec("circle", "red", "blue", "small", "top left", cx=0.3, cy=0.3, radius=0.19),
        ShapeSpec("square", "white", "black", None, None, radius=0.2),
    ]
    analyses = [
        Analysis("blue", "red", "circle", "top left", "large", 1.0),
        Analysis("black", "white", "circle", "center", "small", 1.0),
    ]
    result = score(specs, analyses)
    assert result["accuracy"] == {
        "colour": 1.0,
        "background": 1.0,
        "shape": 0.5,
        "position": 1.0,
        "size": 0.0,
        "all": 0.0,
    }
    assert result["counted"]["position"] == 1 and result["counted"]["size"] == 1
    assert result["confusion"] == {"circle": {"circle": 1}, "square": {"circle": 1}}
    from_captions = score([s.caption for s in specs], [render(s, 64) for s in specs])
    assert from_captions["accuracy"]["all"] == 1.0
    with pytest.raises(ValueError, match="one spec per image"):
        score(specs, analyses[:1])
