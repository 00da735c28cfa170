from __future__ import annotations

import csv
import hashlib
import io
import re

import numpy as np
import pytest
from diffstudio.errors import ConfigError
from diffstudio_shapes.data import (
    ALL_SHAPES,
    BASE_SHAPES,
    COLOURS,
    PALETTE,
    POSITION_WORDS,
    ShapeSpec,
    all_captions,
    caption,
    combinations,
    is_heldout,
    outline,
    parse_caption,
    read_specs,
    render,
    sample_specs,
    write_dataset,
)
from diffstudio_shapes.layouts import DEFAULT_SIZE_RANGE, POSITION_JITTER, QUADRANT_OFFSET, SIZE_RANGES, SIZE_THRESHOLD

CAPTION = re.compile(
    r"^an? (?:(small|large) )?(red|green|blue|yellow|purple|orange|white|black) (circle|square|triangle|star|zigzag)"
    r"(?: at the (?:top|bottom) (?:left|right)| in the center)? on an? "
    r"(red|green|blue|yellow|purple|orange|white|black) background$"
)


def _png(image: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # type: ignore[attr-defined]
    return buffer.getvalue()


def test_palette_is_well_separated() -> None:
    assert 6 <= len(PALETTE) <= 8
    rgb = np.array(list(PALETTE.values()), dtype=float)
    gaps = np.sqrt(((rgb[:, None] - rgb[None]) ** 2).sum(-1)) + np.eye(len(rgb)) * 1e9
    assert gaps.min() > 90


def test_specs_are_deterministic_and_prefix_stable() -> None:
    first = sample_specs(50, 3, shapes=ALL_SHAPES)
    assert first == sample_specs(50, 3, shapes=ALL_SHAPES)
    assert sample_specs(80, 3, shapes=ALL_SHAPES)[:50] == first  # spec i does not depend on count
    assert sample_specs(50, 4, shapes=ALL_SHAPES) != first
    assert sample_specs(50, 3, shapes=ALL_SHAPES, split="heldout") != first


def test_images_are_deterministic_byte_for_byte() -> None:
    specs = sample_specs(12, 0, shapes=ALL_SHAPES)
    for size in (64, 128):
        one = [hashlib.sha256(_png(render(s, size))).hexdigest() for s in specs]
        two = [hashlib.sha256(_png(render(s, size))).hexdigest() for s in sample_specs(12, 0, shapes=ALL_SHAPES)]
        assert one == two
        assert len(set(one)) == len(one)


def test_pinned_streams() -> None:
    # The streams are part of the data set's identity: string-seeded random.Random and a fixed draw order.
    def first(layout: str) -> list[tuple[str, float, float, float, float]]:
        specs = sample_specs(3, 0, layout=layout)
        return [(s.caption, round(s.cx, 6), round(s.cy, 6), round(s.radius, 6), round(s.rotation, 6)) for s in specs]

    assert first("anchored") == [
        ("a green circle on a yellow background", 0.493718, 0.495215, 0.212076, 0.0),
        ("a large yellow circle at the top right on a white background", 0.720225, 0.28541, 0.253171, 0.0),
        ("a small blue circle at the bottom left on a red background", 0.27191, 0.715906, 0.17132, 0.0),
    ]
    assert first("scattered") == [  # data set generator v1, which the VAE recipe trains on
        ("a black triangle in the center on a green background", 0.461811, 0.481052, 0.260083, 1.276351),
        ("an orange triangle at the top left on a green background", 0.233395, 0.34519, 0.241561, 2.697613),
        ("a small red star on a black background", 0.54215, 0.342866, 0.202134, 6.15336),
    ]
    with pytest.raises(ConfigError, match="layout"):
        sample_specs(1, 0, layout="grid")


def test_caption_grammar_and_parse_round_trip() -> None:
    specs = sample_specs(300, 1, shapes=ALL_SHAPES, position_rate=0.6, size_rate=0.6)
    for spec in specs:
        text = spec.caption
        assert CAPTION.match(text), text
        assert parse_caption(text) == spec.parts
    assert caption(ShapeSpec("circle", "red", "blue", "small", "top left")) == (
        "a small red circle at the top left on a blue background"
    )
    assert caption(ShapeSpec("star", "green", "yellow")) == "a green star on a yellow background"
    assert caption(ShapeSpec("star", "orange", "white", None, "center")) == (
        "an orange star in the center on a white background"
    )
    assert caption(ShapeSpec("square", "black", "orange", "large")) == "a large black square on an orange background"
    words = {(s.size, s.position) for s in specs}
    assert any(size is None for size, _ in words) and any(pos is None for _, pos in words)
    assert {pos for _, pos in words} >= set(POSITION_WORDS)


@pytest.mark.parametrize(
    "text",
    ["a red circle on a red background", "an red circle on a blue background", "a red blob on a blue background"],
)
def test_parse_caption_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_caption(text)


def test_spec_validation() -> None:
    with pytest.raises(ConfigError, match="must differ"):
        ShapeSpec("circle", "red", "red")
    with pytest.raises(ConfigError, match="Unknown shape"):
        ShapeSpec("hexagon", "red", "blue")
    with pytest.raises(ConfigError, match="split"):
        sample_specs(1, 0, split="test")


def test_heldout_split_is_disjoint_and_compositional() -> None:
    train, heldout = set(combinations(BASE_SHAPES, "train")), set(combinations(BASE_SHAPES, "heldout"))
    assert not train & heldout
    assert len(train | heldout) == len(BASE_SHAPES) * len(COLOURS) * (len(COLOURS) - 1)
    assert len(heldout) == 28
    for shape, colour, background in heldout:
        assert is_heldout(shape, colour, background)
        assert any(t[0] == shape and t[1] == colour for t in train)
        assert any(t[0] == shape and t[2] == background for t in train)
        assert any(t[1] == colour and t[2] == background for t in train)
    assert {t[0] for t in heldout} == set(BASE_SHAPES)
    assert {t[1] for t in heldout} == set(COLOURS) and {t[2] for t in heldout} == set(COLOURS)
    train_specs = sample_specs(2000, 0)
    heldout_specs = sample_specs(1000, 0, split="heldout")
    assert all(not is_heldout(s.shape, s.colour, s.background) for s in train_specs)
    assert all(is_heldout(s.shape, s.colour, s.background) for s in heldout_specs)
    held_captions = {s.caption for s in heldout_specs}
    assert len(held_captions) >= 200
    assert not held_captions & {s.caption for s in train_specs}
    assert len(combinations(("zigzag",), "heldout")) == 7
    every = [caption(parts) for parts in all_captions(BASE_SHAPES, "heldout")]
    assert len(every) == len(set(every)) == 504
    assert held_captions <= set(every)
    assert not set(every) & {caption(parts) for parts in all_captions(BASE_SHAPES, "train")}


def test_geometry_follows_the_words() -> None:
    """Centres sit at their word's anchor (the centre without a position word), radii in their word's range."""
    for spec in sample_specs(600, 2, shapes=ALL_SHAPES, position_rate=0.8, size_rate=0.8):
        low, high = SIZE_RANGES[spec.size] if spec.size else DEFAULT_SIZE_RANGE
        assert low - 1e-9 <= spec.radius <= high + 1e-9
        dx, dy = spec.cx - 0.5, spec.cy - 0.5
        if spec.position in (None, "center"):
            assert max(abs(dx), abs(dy)) <= POSITION_JITTER + 1e-9
        else:
            assert abs(abs(dx) - QUADRANT_OFFSET) <= POSITION_JITTER + 1e-9
            assert abs(abs(dy) - QUADRANT_OFFSET) <= POSITION_JITTER + 1e-9
            assert (dy < 0) == spec.position.startswith("top") and (dx < 0) == spec.position.endswith("left")
        xs, ys = zip(*outline(spec, 1))
        assert min(xs) > 0 and min(ys) > 0 and max(xs) < 1 and max(ys) < 1, spec
        assert spec.rotation == 0  # upright by default
    assert SIZE_RANGES["small"][1] < SIZE_THRESHOLD < SIZE_RANGES["large"][0]
    tilted = sample_specs(200, 3, rotation_jitter=10.0)
    assert all(abs(s.rotation) <= 10.0 for s in tilted) and any(s.rotation != 0 for s in tilted)


def test_render_draws_the_spec() -> None:
    spec = ShapeSpec("square", "red", "blue", cx=0.3, cy=0.7, radius=0.2)
    image = np.asarray(render(spec, 64))
    assert image.shape == (64, 64, 3)
    assert tuple(image[0, 0]) == PALETTE["blue"]
    assert tuple(image[int(0.7 * 64), int(0.3 * 64)]) == PALETTE["red"]
    red = (np.abs(image.astype(int) - PALETTE["red"]).sum(-1) < 10).sum()
    assert abs(red - (0.4 * 64) ** 2) < 0.1 * (0.4 * 64) ** 2
    edge = np.asarray(render(ShapeSpec("circle", "white", "black", radius=0.3), 64))[32, :, 0]
    assert len(set(edge.tolist())) > 2  # anti-aliased: intermediate values on the edge


def _listing(folder: object) -> dict[str, int]:
    from pathlib import Path

    root = Path(str(folder))
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_write_dataset_resumes_and_repairs(tmp_path: object) -> None:
    from pathlib import Path

    root = Path(str(tmp_path)) / "ds"
    report = write_dataset(root, 12, 5, 32, shapes=ALL_SHAPES)
    assert (report.written, report.skipped, report.count) == (12, 0, 12)
    with open(root / "metadata.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["image"] for r in rows] == [f"images/{i:05d}.png" for i in range(12)]
    specs = sample_specs(12, 5, shapes=ALL_SHAPES)
    assert [r["prompt"] for r in rows] == [s.caption for s in specs]
    assert read_specs(root) == specs
    assert all((root / r["image"]).is_file() for r in rows)
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]
    before = _listing(root)
    again = write_dataset(root, 12, 5, 32, shapes=ALL_SHAPES)
    assert (again.written, again.skipped) == (0, 12)
    assert _listing(root) == before  # nothing rewritten, not even the CSV
    (root / "images" / "00003.png").unlink()
    (root / "images" / ".00004.png.tmp-999").write_bytes(b"partial")  # left by a killed run
    repaired = write_dataset(root, 12, 5, 32, shapes=ALL_SHAPES)
    assert (repaired.written, repaired.skipped) == (1, 11)
    assert not (root / "images" / ".00004.png.tmp-999").exists()
    assert (root / "images" / "00003.png").read_bytes() == _png(render(specs[3], 32))
    bigger = write_dataset(root, 15, 5, 32, shapes=ALL_SHAPES)
    assert (bigger.written, bigger.skipped) == (3, 12)
    with pytest.raises(ConfigError, match="seed"):
        write_dataset(root, 15, 6, 32, shapes=ALL_SHAPES)
    with pytest.raises(ConfigError, match="size"):
        write_dataset(root, 15, 5, 64, shapes=ALL_SHAPES)


def test_position_jitter_moves_only_the_centres() -> None:
    """A wider jitter keeps every word and radius of spec ``i`` and moves its centre within the new bound."""
    plain = sample_specs(400, 4, position_rate=0.8, size_rate=0.8)
    wide = sample_specs(400, 4, position_rate=0.8, size_rate=0.8, position_jitter=0.035)
    assert [s.caption for s in wide] == [s.caption for s in plain]
    moved = 0.0
    for a, b in zip(plain, wide):
        anchor_x = (
            0.5
            if b.position in (None, "center")
            else 0.5 + (QUADRANT_OFFSET if b.position.endswith("right") else -QUADRANT_OFFSET)
        )
        anchor_y = (
            0.5
            if b.position in (None, "center")
            else 0.5 + (QUADRANT_OFFSET if b.position.startswith("bottom") else -QUADRANT_OFFSET)
        )
        assert max(abs(b.cx - anchor_x), abs(b.cy - anchor_y)) <= 0.035 + 1e-9
        # the same draws, scaled: 3.5x the default jitter's offset from the anchor, unless the centre had to
        # move inward to keep the shape inside the image
        pulled = abs(b.cx - anchor_x) < 3.5 * abs(a.cx - anchor_x) - 1e-9
        assert pulled or abs((b.cx - anchor_x) - 3.5 * (a.cx - anchor_x)) < 1e-9
        assert not pulled or b.size == "large"
        moved = max(moved, abs(b.cx - anchor_x))
        assert a.radius == b.radius or b.size == "large"  # a large quadrant shape may shrink toward the border
        xs, ys = zip(*outline(b, 1))
        assert min(xs) > 0 and min(ys) > 0 and max(xs) < 1 and max(ys) < 1, b
    assert moved > 0.03  # the bound is reached, not only respected
    assert sample_specs(50, 4, position_jitter=POSITION_JITTER) == sample_specs(50, 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"position_jitter": -0.01}, "position_jitter must be in"),
        ({"position_jitter": 0.2}, "position_jitter must be in"),
        ({"position_jitter": 0.02, "layout": "scattered"}, "anchored layout only"),
    ],
)
def test_position_jitter_is_checked(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        sample_specs(3, 0, **kwargs)  # type: ignore[arg-type]


def test_position_jitter_is_recorded_and_guards_the_folder(tmp_path: object) -> None:
    import json
    from pathlib import Path

    root = Path(str(tmp_path)) / "ds"
    write_dataset(root, 4, 5, 32)
    assert "position_jitter" not in json.loads((root / "dataset.json").read_text())  # older folders stay valid
    with pytest.raises(ConfigError, match="position_jitter"):
        write_dataset(root, 4, 5, 32, position_jitter=0.035)
    wide = Path(str(tmp_path)) / "wide"
    write_dataset(wide, 4, 5, 32, position_jitter=0.035)
    assert json.loads((wide / "dataset.json").read_text())["position_jitter"] == 0.035
    assert read_specs(wide) == sample_specs(4, 5, position_jitter=0.035)
    assert write_dataset(wide, 4, 5, 32, position_jitter=0.035).skipped == 4
