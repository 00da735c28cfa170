"""A deterministic analyser of shapes images (numpy only): what colour, which shape, where, how big.

It scores generated images against their captions. The steps:

1. background: the median of the border pixels, named by the nearest palette colour;
2. region: pixels far from the background (half of the image's strong contrast), largest 4-connected component;
3. shape colour: the median of the region's most contrasting half (the interior, away from soft edges), nearest
   palette colour; then a soft coverage ``alpha`` per pixel (projection of ``pixel - background`` on
   ``shape - background``), which makes area, centroid and radial profile sub-pixel and blur-tolerant;
4. shape class, rotation-invariant: a zigzag is elongated and not convex (second-moment axis ratio, area over
   convex-hull area); otherwise the harmonics of the radial profile ``r(theta)`` decide (k = 3 triangle,
   4 square, 5 star, a flat profile a circle), which survive blur far better than fill ratios;
5. position: the quadrant of the centroid, ``center`` inside the central band; size: the radius implied by the
   area for the detected shape class, against :data:`~diffstudio_shapes.layouts.SIZE_THRESHOLD`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from diffstudio_shapes.data import ALL_SHAPES, PALETTE, parse_caption
from diffstudio_shapes.geometry import area_factor
from diffstudio_shapes.layouts import CENTER_BAND, SIZE_THRESHOLD

_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.array([PALETTE[name] for name in _PALETTE_NAMES], dtype=np.float64)
#: Below this colour distance (0..441) from the background nothing counts as a shape.
MIN_CONTRAST = 40.0
_BINS = 72
_HARMONICS = (2, 3, 4, 5, 6)
_AREA_FACTORS = {shape: area_factor(shape) for shape in ALL_SHAPES}
NONE = "none"

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]


@dataclass(frozen=True)
class Analysis:
    """What the analyser read off one image.

    Attributes:
        background: Palette name of the background.
        colour: Palette name of the shape (``"none"`` when no shape was found).
        shape: ``circle``, ``square``, ``triangle``, ``star``, ``zigzag`` or ``"none"``.
        position: ``top left``, ``top right``, ``bottom left``, ``bottom right``, ``center`` or ``"none"``.
        size: ``small``, ``large`` or ``"none"``.
        confidence: In [0, 1]: the smallest of the colour and shape margins (0 means a coin toss).
        diagnostics: Measured features (centroid, area, solidity, harmonics, ...), all plain floats.
    """

    background: str
    colour: str
    shape: str
    position: str
    size: str
    confidence: float
    diagnostics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            "background": self.background,
            "colour": self.colour,
            "shape": self.shape,
            "position": self.position,
            "size": self.size,
            "confidence": self.confidence,
            "diagnostics": dict(self.diagnostics),
        }


class CaptionLike(Protocol):
    """Anything with the caption words (a ``ShapeSpec`` or ``CaptionParts``)."""

    @property
    def shape(self) -> str: ...  # noqa: D102

    @property
    def colour(self) -> str: ...  # noqa: D102

    @property
    def background(self) -> str: ...  # noqa: D102

    @property
    def size(self) -> str | None: ...  # noqa: D102

    @property
    def position(self) -> str | None: ...  # noqa: D102


def _as_rgb(image: Image.Image | NDArray[Any]) -> FloatArray:
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.float64)
    else:
        array = np.asarray(image, dtype=np.float64)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = np.moveaxis(array, 0, -1)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        if array.ndim != 3 or array.shape[-1] not in (1, 3):
            raise ValueError(f"expected an RGB image (H, W, 3), got an array of shape {array.shape}")
        if array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=-1)
        if array.size and array.max() <= 1.0 and np.issubdtype(np.asarray(image).dtype, np.floating):
            array = array * 255.0
    if array.shape[0] < 8 or array.shape[1] < 8:
        raise ValueError(f"image too small to analyse: {array.shape[1]}x{array.shape[0]}")
    return array


def nearest_colour(rgb: Sequence[float] | FloatArray) -> tuple[str, float]:
    """Return the nearest palette colour and a margin in [0, 1] (1 - nearest / second-nearest distance)."""
    distances = np.sqrt(((_PALETTE_RGB - np.asarray(rgb, dtype=np.float64)) ** 2).sum(axis=1))
    order = np.argsort(distances, kind="stable")
    first, second = float(distances[order[0]]), float(distances[order[1]])
    return _PALETTE_NAMES[int(order[0])], 1.0 - first / max(second, 1e-9)


# -- regions --------------------------------------------------------------------------------------------------


def largest_component(mask: BoolArray) -> BoolArray:
    """The largest 4-connected component of a boolean mask (ties: the first in raster order).

    Runs of each row are joined with a union-find over runs, so the cost grows with the number of runs, not
    of pixels.
    """
    height, width = mask.shape
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    steps = np.diff(padded, axis=1)
    rows_start = [np.flatnonzero(steps[y] == 1) for y in range(height)]
    rows_end = [np.flatnonzero(steps[y] == -1) for y in range(height)]
    run_row: list[int] = []
    run_start: list[int] = []
    run_end: list[int] = []
    first_run: list[int] = []
    for y in range(height):
        first_run.append(len(run_row))
        run_row.extend([y] * len(rows_start[y]))
        run_start.extend(rows_start[y].tolist())
        run_end.extend(rows_end[y].tolist())
    first_run.append(len(run_row))
    if not run_row:
        return np.zeros_like(mask, dtype=bool)
    parent = list(range(len(run_row)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for y in range(1, height):
        i, i_stop = first_run[y - 1], first_run[y]
        j, j_stop = first_run[y], first_run[y + 1]
        while i < i_stop and j < j_stop:
            if run_start[i] < run_end[j] and run_start[j] < run_end[i]:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if run_end[i] <= run_end[j]:
                i += 1
            else:
                j += 1
    roots = [find(i) for i in range(len(run_row))]
    sizes: dict[int, int] = {}
    for root, start, end in zip(roots, run_start, run_end):
        sizes[root] = sizes.get(root, 0) + end - start
    best = max(sizes, key=lambda r: (sizes[r], -r))
    out = np.zeros_like(mask, dtype=bool)
    for root, y, start, end in zip(roots, run_row, run_start, run_end):
        if root == best:
            out[y, start:end] = True
    return out


def _dilate(mask: BoolArray, steps: int) -> BoolArray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def convex_hull_area(mask: BoolArray) -> float:
    """Area of the convex hull of a mask's pixel squares (monotone chain over the corners of edge pixels)."""
    inner = mask.copy()
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    ys, xs = np.nonzero(mask & ~inner if mask.shape[0] > 2 and mask.shape[1] > 2 else mask)
    if xs.size == 0:
        return 0.0
    corners = np.unique(
        np.concatenate([np.stack([xs + dx, ys + dy], axis=1) for dx in (0, 1) for dy in (0, 1)]), axis=0
    )
    points = [(float(x), float(y)) for x, y in corners]  # sorted by x, then y (np.unique)

    def cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[float, float]] = []
    for p in points:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple[float, float]] = []
    for p in reversed(points):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = lower[:-1] + upper[:-1]
    total = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(hull, [*hull[1:], hull[0]]))
    return abs(total) / 2


# -- features -------------------------------------------------------------------------------------------------


def _features(alpha: FloatArray, mask: BoolArray) -> dict[str, float]:
    """Rotation-invariant geometry of the soft region ``alpha`` (coverage in [0, 1]) around ``mask``."""
    ys, xs = np.nonzero(alpha > 0)
    weights = alpha[ys, xs]
    area = float(weights.sum())
    cx = float((weights * (xs + 0.5)).sum() / area)
    cy = float((weights * (ys + 0.5)).sum() / area)
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
    mxx, myy, mxy = (weights * dx * dx).sum() / area, (weights * dy * dy).sum() / area, (weights * dx * dy).sum() / area
    spread = math.sqrt(max((mxx - myy) ** 2 / 4 + mxy**2, 0.0))
    major, minor = (mxx + myy) / 2 + spread, max((mxx + myy) / 2 - spread, 1e-9)
    # Radial profile: the area of each angular wedge (pixels split 3x3 for sub-pixel angles) gives r(theta).
    offsets = np.array([-1 / 3, 0.0, 1 / 3])
    sx = np.broadcast_to(dx[:, None, None] + offsets[None, :, None], (dx.size, 3, 3)).ravel()
    sy = np.broadcast_to(dy[:, None, None] + offsets[None, None, :], (dy.size, 3, 3)).ravel()
    sw = np.repeat(weights / 9.0, 9)
    bins = ((np.arctan2(sy, sx) + math.pi) / (2 * math.pi) * _BINS).astype(np.int64) % _BINS
    wedge = np.bincount(bins, weights=sw, minlength=_BINS)
    radius = np.sqrt(2 * wedge / (2 * math.pi / _BINS))
    theta = (np.arange(_BINS) + 0.5) * 2 * math.pi / _BINS - math.pi
    mean_r = float(radius.mean())
    features = {
        "cx": cx,
        "cy": cy,
        "area": area,
        "solidity": area / max(convex_hull_area(mask), 1e-9),
        "circle_fill": area / (math.pi * float(radius.max()) ** 2),
        "elongation": math.sqrt(major / minor),
        "mean_radius": mean_r,
    }
    for k in _HARMONICS:
        coefficient = complex((radius * np.exp(-1j * k * theta)).sum())
        features[f"h{k}"] = 2 * abs(coefficient) / max(float(radius.sum()), 1e-9)
    return features


#: Radial-profile harmonic amplitude of the ideal shape (k: 3 triangle, 4 square, 5 star); scores are relative.
_IDEAL_HARMONIC = {"triangle": ("h3", 0.27), "square": ("h4", 0.139), "star": ("h5", 0.275)}
#: A polygon needs at least this fraction of its ideal harmonic; below it for all three, the shape is a circle.
POLYGON_THRESHOLD = 0.22
ZIGZAG_ELONGATION = 1.45
ZIGZAG_MAX_SOLIDITY = 0.92


def classify_shape(features: dict[str, float]) -> tuple[str, float]:
    """Name the shape from the region's features; return it and a margin in [0, 1].

    Zigzags are elongated and not convex (elongation >= 1.45, solidity < 0.92). Otherwise the radial profile
    decides: the strongest of the 3rd (triangle), 4th (square) and 5th (star) harmonic, each relative to its
    value for the ideal shape, names the polygon; when all three are below 0.22 the profile is flat: a circle.
    Harmonics survive blur far better than fill ratios (a blurred square fills its enclosing circle like a
    polygon with rounded corners, not like a circle).

    Args:
        features: At least ``elongation``, ``solidity``, ``h3``, ``h4``, ``h5``.

    Returns:
        The shape name and its margin (0: on a decision boundary, 1: far from every boundary).
    """
    elongation, solidity = features["elongation"], features["solidity"]
    zig = min(math.log(max(elongation, 1e-9) / ZIGZAG_ELONGATION) / 0.3, (ZIGZAG_MAX_SOLIDITY - solidity) / 0.1)
    if zig > 0:
        return "zigzag", min(1.0, zig)
    scores = {name: features[key] / ideal for name, (key, ideal) in _IDEAL_HARMONIC.items()}
    ranked = sorted(scores, key=lambda name: -scores[name])
    best, runner_up = scores[ranked[0]], scores[ranked[1]]
    polygon = math.log(max(best, 1e-9) / POLYGON_THRESHOLD)
    if polygon <= 0:
        return "circle", min(1.0, -polygon, -zig)
    distinct = math.log(max(best, 1e-9) / max(runner_up, 1e-9))
    return ranked[0], min(1.0, polygon, distinct, -zig)


# -- analysis -------------------------------------------------------------------------------------------------


def _position(cx: float, cy: float, width: int, height: int) -> str:
    fx, fy = cx / width - 0.5, cy / height - 0.5
    if abs(fx) < CENTER_BAND and abs(fy) < CENTER_BAND:
        return "center"
    return f"{'top' if fy < 0 else 'bottom'} {'left' if fx < 0 else 'right'}"


def analyse(image: Image.Image | NDArray[Any]) -> Analysis:
    """Analyse one RGB image of any size.

    Args:
        image: A PIL image, or an array ``(H, W, 3)`` (uint8 0..255 or float 0..1; ``(3, H, W)`` is accepted).

    Returns:
        The analysis; ``shape``, ``colour``, ``position`` and ``size`` are ``"none"`` when no region stands out
        from the background.
    """
    rgb = _as_rgb(image)
    height, width = rgb.shape[:2]
    ring = max(1, round(min(height, width) / 64))
    border = np.concatenate(
        [rgb[:ring].reshape(-1, 3), rgb[-ring:].reshape(-1, 3), rgb[:, :ring].reshape(-1, 3)]
        + [rgb[:, -ring:].reshape(-1, 3)]
    )
    background_rgb = np.median(border, axis=0)
    background, background_margin = nearest_colour(background_rgb)
    offset = rgb - background_rgb
    distance = np.sqrt((offset**2).sum(axis=-1))
    peak = float(np.percentile(distance, 99.5))
    diagnostics = {"background_margin": background_margin, "contrast": peak}
    if peak < MIN_CONTRAST:
        return Analysis(background, NONE, NONE, NONE, NONE, 0.0, diagnostics)
    region = largest_component(distance > max(MIN_CONTRAST / 2, peak / 2))
    inside = distance[region]
    interior = region & (distance >= np.median(inside))
    shape_rgb = np.median(rgb[interior], axis=0)
    colour, colour_margin = nearest_colour(shape_rgb)
    direction = shape_rgb - background_rgb
    alpha = np.clip(offset @ direction / max(float(direction @ direction), 1e-9), 0.0, 1.0)
    mask = largest_component(alpha >= 0.5)
    if not mask.any():
        mask = region
    alpha = np.where(_dilate(mask, max(2, round(2 * min(height, width) / 64))), alpha, 0.0)
    features = _features(alpha, mask)
    shape, shape_margin = classify_shape(features)
    side = math.sqrt(width * height)
    radius = math.sqrt(features["area"] / _AREA_FACTORS[shape]) / side
    size = "small" if radius < SIZE_THRESHOLD else "large"
    position = _position(features["cx"], features["cy"], width, height)
    diagnostics.update(features)
    diagnostics.update(
        {
            "colour_margin": colour_margin,
            "shape_margin": shape_margin,
            "radius": radius,
            "x": features["cx"] / width,
            "y": features["cy"] / height,
        }
    )
    confidence = max(0.0, min(background_margin, colour_margin, shape_margin))
    return Analysis(background, colour, shape, position, size, confidence, diagnostics)


def score(
    specs: Sequence[CaptionLike | str],
    images: Sequence[Image.Image | NDArray[Any]] | Sequence[Analysis],
) -> dict[str, Any]:
    """Score images against the captions they were generated from.

    Args:
        specs: ``ShapeSpec`` / ``CaptionParts`` objects or caption strings, one per image.
        images: The images (or their :class:`Analysis` when already analysed).

    Returns:
        A JSON-serialisable dict: ``count``; ``accuracy`` with ``colour``, ``background``, ``shape`` (all
        images), ``position`` (images whose caption names a position), ``size`` (images whose caption names a
        size), ``all`` (every criterion the caption names right); ``counted`` (denominators); ``confusion``
        ``{expected: {found: n}}`` for the shape class; and ``position_confusion``.
    """
    if len(specs) != len(images):
        raise ValueError(f"score needs one spec per image, got {len(specs)} specs and {len(images)} images")
    hits = {"colour": 0, "background": 0, "shape": 0, "position": 0, "size": 0, "all": 0}
    counted = {"colour": 0, "background": 0, "shape": 0, "position": 0, "size": 0, "all": 0}
    confusion: dict[str, dict[str, int]] = {}
    position_confusion: dict[str, dict[str, int]] = {}
    for spec, item in zip(specs, images):
        words: CaptionLike = parse_caption(spec) if isinstance(spec, str) else spec
        found = item if isinstance(item, Analysis) else analyse(item)
        checks = {"colour": (words.colour, found.colour), "background": (words.background, found.background)}
        checks["shape"] = (words.shape, found.shape)
        if words.position is not None:
            checks["position"] = (words.position, found.position)
            row = position_confusion.setdefault(words.position, {})
            row[found.position] = row.get(found.position, 0) + 1
        if words.size is not None:
            checks["size"] = (words.size, found.size)
        for key, (expected, got) in checks.items():
            counted[key] += 1
            hits[key] += int(expected == got)
        counted["all"] += 1
        hits["all"] += int(all(expected == got for expected, got in checks.values()))
        row = confusion.setdefault(words.shape, {})
        row[found.shape] = row.get(found.shape, 0) + 1
    accuracy = {key: (hits[key] / counted[key] if counted[key] else None) for key in hits}
    return {
        "count": len(specs),
        "accuracy": accuracy,
        "counted": counted,
        "confusion": confusion,
        "position_confusion": position_confusion,
    }
